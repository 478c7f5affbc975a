"""``simopen``: plain kernel simultaneous open, the baseline. Both sides bind
the announced port and connect() to the other's, again and again until the
slot ends (a new socket only after a RST); when the SYNs cross, the kernel completes the handshake itself
(LAB-NOTES 4). No privilege needed."""

from __future__ import annotations

from fastpunch.punch.base import Attempt, PunchContext, kernel_connect, sleep_until

NAME = "simopen"


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    sleep_until(start)
    return kernel_connect(ctx, deadline, attempt, 0.05, "kernel simultaneous open")
