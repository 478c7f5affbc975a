"""``simopen``: plain kernel simultaneous open, the baseline. Both sides bind
the announced port and connect() to the other's, again and again until the
slot ends (a new socket only after a RST); when the SYNs cross, the kernel completes the handshake itself
(LAB-NOTES 4). No privilege needed."""

from __future__ import annotations

import errno
import select
import socket
import time

from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, sleep_until

NAME = "simopen"


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    sleep_until(start)
    start = time.time()
    last = None
    while time.time() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ctx.local_ip, ctx.local_port))
            s.setblocking(False)
            rc = s.connect_ex((ctx.peer_ip, ctx.peer_port))
            attempt.sent += 1
            attempt.events.append((round(time.time() - start, 3), "connect()"))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, errno.errorcode.get(rc, str(rc)))
            # one socket for as long as it lives: the kernel resends the SYN
            # itself, and a socket closed mid-open loses a crossing SYN-ACK
            _, w, _ = select.select([], [s], [], max(0.0, deadline - time.time()))
            if w:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    attempt.seen += 1
                    s.setblocking(True)
                    return s
                raise OSError(err, errno.errorcode.get(err, str(err)))
            raise OSError(errno.ETIMEDOUT, "no answer before the slot ended")
        except OSError as exc:
            last = exc
            attempt.events.append((round(time.time() - start, 3), f"failed: {exc.strerror or exc}"))
            s.close()
            time.sleep(0.05)
    raise PunchFailed("timeout", f"kernel simultaneous open did not complete ({last})")
