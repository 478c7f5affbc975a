"""Direct connections: the punching strategies, the one driver that runs the
crafted ones, and the planner.

Every strategy follows one protocol (``strategy.Strategy``: a name, a
budget, whether it needs crafted segments, ``run``); those that *race*
contribute candidate pairs to the one sans-IO punch machine of an attempt
(``fastpunch.proto.punch``), which ``driver.Race`` feeds from one raw
receiver. ``planner.punch`` runs the CCS's plan: the crafted race at once,
the others in lockstep slots, the relay in parallel. Every stage yields an
:class:`Attempt` record, with per-pair packet counts.
"""

from fastpunch.punch.base import Attempt as Attempt
from fastpunch.punch.base import PunchContext as PunchContext
from fastpunch.punch.base import PunchFailed as PunchFailed
from fastpunch.punch.base import Report as Report
from fastpunch.punch.base import Side as Side

__all__ = ["Attempt", "PunchContext", "PunchFailed", "Report", "Side"]
