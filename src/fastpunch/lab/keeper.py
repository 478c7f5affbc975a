"""The process that owns a lab made by ``fastpunch lab up``.

A lab must outlive the command that asked for it, so ``lab up`` starts this
keeper in its own session. The keeper builds the lab (its pid is in every
name, so the stale sweep recognises a crashed keeper's lab), writes the
state file the other commands read, and tears everything down on SIGTERM,
SIGINT or SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from fastpunch.lab.topology import Lab

# Where `lab up` records running labs (FASTPUNCH_LAB_STATE moves it, for tests).
STATE_DIR = os.environ.get("FASTPUNCH_LAB_STATE", "/run/fastpunch/labs")


def state_path(pid: int) -> str:
    return os.path.join(STATE_DIR, f"{pid}.json")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    owner = os.getpid()

    def stop(signum, frame):
        # pyroute2 forks helpers (netns.create) and stops them with a signal:
        # they inherit this handler and must just exit, not tear down our lab.
        if os.getpid() != owner:
            os._exit(0)
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
    path = state_path(os.getpid())
    lab = Lab(**spec)
    try:
        lab.up()
        state = {**lab.describe(), "keeper": os.getpid(), "spec": spec}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)         # readers never see half a file
        while True:
            signal.pause()
    except Exception as exc:  # reported to `lab up`, which is waiting for the state file
        import traceback

        with open(path + ".error", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        with open(os.path.join(STATE_DIR, f"{os.getpid()}.log"), "w") as f:
            traceback.print_exc(file=f)
        return 1
    finally:
        lab.down()
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
