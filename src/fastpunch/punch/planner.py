"""Run the CCS's plan: strategies in order, in lockstep on both sides, relay
joined in parallel after a deadline and used only when nothing direct worked.

Lockstep: both sides got the same plan and the same start time from the CCS,
so strategy *i* runs on both in the same slot
``[start + sum(budgets before i), ... + budget_i)`` without another message.
A side that cannot run a strategy (no privilege) sits its slot out, so the
other side's later strategies still line up. (The devices' clocks must agree
to well under a slot; NTP does that.)

Strategies the CCS may plan but this build does not have are skipped on
both sides alike.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Optional, Sequence

from fastpunch.errors import InsufficientPrivilegeError
from fastpunch.punch import nat, predict, simopen, spoof, spray, symmetric, upnp
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, Report, in_this_netns

log = logging.getLogger("fastpunch.punch")
STRATEGIES = {m.NAME: m for m in (upnp, spray, predict, symmetric, spoof, nat, simopen)}
BUDGET = {"upnp": 2.0, "spray": 4.0, "predict": 3.0, "symmetric": 3.0, "spoof": 3.0, "nat": 2.0,
          "simopen": 3.0}
RELAY_AFTER = 2.0            # seconds after the start: join the relay in parallel
SETUP_AHEAD = 0.05           # a strategy's sockets and rules are made this long before its slot


def steps_of(plan: Sequence[str], only: Optional[Sequence[str]] = None) -> list[str]:
    """The direct strategies to run, in plan order (same on both sides)."""
    steps = [s for s in plan if s in STRATEGIES]
    if only is not None:
        steps = [s for s in steps if s in only]
    return steps


async def punch(ctx: PunchContext, plan: Sequence[str], start_at: float, report: Report, *,
                relay=None, only: Optional[Sequence[str]] = None,
                relay_after: float = RELAY_AFTER) -> tuple[socket.socket, str]:
    """Returns (connected socket, strategy). ``relay`` is an async callable
    that joins the CCS relay, or None when the relay must not be used."""
    steps = steps_of(plan, only)
    use_relay = relay is not None and "relay" in plan and (only is None or "relay" in only)
    relay_task: Optional[asyncio.Task] = None
    loop = asyncio.get_running_loop()

    async def delayed_relay():
        await asyncio.sleep(max(0.0, start_at + relay_after - time.time()))
        return await relay()

    if use_relay:
        relay_task = loop.create_task(delayed_relay())
    try:
        t = start_at
        for name in steps:
            end = t + BUDGET[name]
            # set up 50 ms ahead; the strategy waits for its slot itself
            await asyncio.sleep(max(0.0, t - SETUP_AHEAD - time.time()))
            attempt = Attempt(name)
            report.attempts.append(attempt)
            began = max(t, time.time())
            try:
                sock = await in_this_netns(STRATEGIES[name].run, ctx, end, attempt, t)
            except PunchFailed as exc:
                attempt.reason, attempt.detail = exc.reason, str(exc)
            except InsufficientPrivilegeError as exc:
                attempt.reason, attempt.detail = "no-privilege", str(exc)
            except OSError as exc:
                attempt.reason, attempt.detail = "os-error", str(exc)
            except Exception as exc:            # a fault in one strategy falls through
                log.exception("strategy %s failed", name)
                attempt.reason, attempt.detail = "error", f"{type(exc).__name__}: {exc}"
            else:
                attempt.ok = True
                attempt.seconds = time.time() - began
                return sock, name
            attempt.seconds = time.time() - began
            t = end
        if relay_task is None:
            raise PunchFailed("no-path", "no direct strategy worked and the relay is not allowed")
        attempt = Attempt("relay")
        report.attempts.append(attempt)
        began = time.time()
        try:
            sock = await relay_task
        except Exception as exc:
            attempt.reason, attempt.detail = getattr(exc, "code", "relay-failed"), str(exc)
            attempt.seconds = time.time() - began
            raise PunchFailed("no-path", f"nothing direct worked and the relay failed: {exc}") \
                from exc
        relay_task = None
        attempt.ok, attempt.seconds = True, time.time() - began
        return sock, "relay"
    finally:
        if relay_task is not None:          # direct won: drop the standby relay
            relay_task.cancel()
            try:
                standby = await relay_task
                standby.close()
            except (asyncio.CancelledError, Exception):
                pass
