"""Direct connections: the punching strategies and the planner that runs them.

Each strategy is its own module with one entry point,
``run(ctx: PunchContext, deadline: float) -> socket.socket``, that either
returns a connected kernel socket or raises :class:`PunchFailed` with a
reason; :mod:`fastpunch.punch.planner` runs them in the order the CCS's plan
gives, in lockstep on both sides (same time slots from the common start
time), with the relay joined in parallel after a deadline. Every attempt
yields an :class:`Attempt` record.
"""

from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, Report

__all__ = ["Attempt", "PunchContext", "PunchFailed", "Report"]
