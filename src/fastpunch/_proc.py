"""Whether a process still lives, for sweeps of resources named by pid."""

from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as dead: it holds nothing, and
    kill(pid, 0) would still succeed on it until its parent reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state letter follows the parenthesised command name, which may hold spaces
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")
