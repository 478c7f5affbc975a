"""Run the CCS's plan: the crafted race first, the other strategies in slots
after it, in lockstep on both sides, the relay joined in parallel.

Stages. Consecutive strategies of the plan that race (symmetric, nat,
predict, spray) form one stage: one punch machine drives all their flows
at once, and the first completed handshake wins. Every other strategy
(spoof, simopen, upnp) is a stage of its own. The race sends its first
SYNs the moment this side has the peer's candidates (the CCS's Ready), not
at the start time: with the CCS between the two, a SYN of one side cannot
reach the far gateway much before the other side's own first SYN has left
(docs/punch.md). Later stages keep their slots, ``[start + budgets before
it, + its budget)``, the same on both sides without another message
(the devices' clocks must agree to well under a slot; NTP does that).

A strategy this build lacks is skipped by both sides alike; a side that
cannot run one (no privilege, no nftables) sits its slot out, so the other
side's later stages still line up.

The relay: joined at once when the plan has no direct stage, else in
parallel ``RELAY_AFTER`` seconds after the start, and used only when no
direct stage worked. ``cancel`` (the CCS said the peer left) ends
whatever runs, the relay wait included.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Optional, Sequence

from fastpunch.errors import InsufficientPrivilegeError, KernelFeatureMissing
from fastpunch.punch import nat, predict, simopen, spoof, spray, symmetric, upnp
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, Report
from fastpunch.punch.strategy import Flows, Slot

log = logging.getLogger("fastpunch.punch")
STRATEGIES: dict = {m.STRATEGY.name: m.STRATEGY
                    for m in (upnp, spray, predict, symmetric, spoof, nat, simopen)}
BUDGET = {name: s.budget for name, s in STRATEGIES.items()}
RELAY_AFTER = 1.0            # seconds after the start: join the relay in parallel
OVERRUN = 2.0                # a stage still running this long after its slot is stopped


def stages_of(plan: Sequence[str], only: Optional[Sequence[str]] = None) -> list:
    """The direct stages, in plan order (the same on both sides): lists of
    strategies, racing ones of a run together. ``only`` (both sides alike)
    replaces the plan: those strategies, in that order."""
    names = plan if only is None else only
    steps = [STRATEGIES[s] for s in names if s in STRATEGIES]
    stages: list = []
    for s in steps:
        if s.races and stages and stages[-1][0].races:
            stages[-1].append(s)
        else:
            stages.append([s])
    return stages


def _label(stage: list) -> str:
    return "+".join(s.name for s in stage)


async def _run_stage(stage: list, ctx: PunchContext, slot: Slot, attempt: Attempt,
                     cancel: Optional[asyncio.Event]) -> socket.socket:
    if len(stage) == 1:
        return await stage[0].run(ctx, slot, attempt, cancel)
    from fastpunch.punch.driver import Race

    flows: list = []
    skipped = []
    for s in stage:
        try:
            flows.append(s.flows(ctx, slot.start))
        except PunchFailed as exc:        # a policy with nothing to add here (spray, ...)
            skipped.append(f"{s.name}: {exc.reason}")
    nominators = {f.nominator for f in flows if f.nominator is not None}
    race = Race(ctx, slot.end, attempt, cancel=cancel,
                nominator=nominators.pop() if len(nominators) == 1 else ctx.initiator)
    for f in flows:
        race.add(f.pairs, f.sprays)
    if skipped:
        attempt.detail = "; ".join(skipped)
    return await race.run()


async def punch(ctx: PunchContext, plan: Sequence[str], start_at: float, report: Report, *,
                relay=None, only: Optional[Sequence[str]] = None,
                relay_after: float = RELAY_AFTER,
                cancel: Optional[asyncio.Event] = None) -> tuple:
    """Returns (connected socket, strategy): the winning pair's policy, or
    "relay". ``relay`` is an async callable that joins the CCS relay, or
    None when the relay must not be used."""
    stages = stages_of(plan, only)
    use_relay = relay is not None and "relay" in (plan if only is None else only)
    relay_task: Optional[asyncio.Task] = None
    loop = asyncio.get_running_loop()
    t_start = time.time()

    async def delayed_relay():
        await asyncio.sleep(max(0.0, start_at + relay_after - time.time()) if stages else 0.0)
        return await relay()

    if use_relay:
        relay_task = loop.create_task(delayed_relay())
    gone = loop.create_task(cancel.wait()) if cancel is not None else None
    try:
        t = start_at
        for i, stage in enumerate(stages):
            budget = max(s.budget for s in stage)
            end = t + budget
            # the first race goes at once; every other stage keeps its slot
            begin = min(t, time.time()) if i == 0 and stage[0].races else t
            attempt = Attempt(_label(stage))
            report.attempts.append(attempt)
            began = max(begin, time.time())
            task = loop.create_task(_run_stage(stage, ctx, Slot(begin, end), attempt, cancel))
            try:
                waits = {task} | ({gone} if gone is not None else set())
                overran = False
                try:
                    # bounded even if a strategy never settles (a fault in
                    # a callback, a clock stepped back): its slot and a grace
                    await asyncio.wait(waits, timeout=max(0.0, end - time.time()) + OVERRUN,
                                       return_when=asyncio.FIRST_COMPLETED)
                    overran = not task.done() and (gone is None or not gone.done())
                finally:
                    if not task.done():          # overran, the peer left, or we were cancelled
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                if overran:
                    raise PunchFailed("timeout", f"still running {OVERRUN:g} s after its slot "
                                                 "ended: stopped")
                if task.cancelled():                 # (only the peer's leaving cancels it)
                    raise PunchFailed("peer-gone", "the peer left the rendezvous")
                sock = task.result()
            except PunchFailed as exc:
                if exc.reason == "peer-gone":
                    attempt.reason, attempt.detail = exc.reason, str(exc)
                    raise
                attempt.reason, attempt.detail = exc.reason, attempt.detail or str(exc)
            except InsufficientPrivilegeError as exc:
                attempt.reason, attempt.detail = "no-privilege", str(exc)
            except KernelFeatureMissing as exc:
                attempt.reason, attempt.detail = "no-kernel-feature", str(exc)
            except OSError as exc:
                attempt.reason, attempt.detail = "os-error", str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:            # a fault in one strategy falls through
                log.exception("stage %s failed", _label(stage))
                attempt.reason, attempt.detail = "error", f"{type(exc).__name__}: {exc}"
            else:
                attempt.ok = True
                attempt.seconds = time.time() - began
                won = next((p for p in attempt.pairs if p.outcome.startswith("won")), None)
                name = won.policy if won is not None else stage[0].name
                report.pair = attempt.winner
                report.history.append((time.time() - t_start, f"direct by {name}"))
                return sock, name
            attempt.seconds = time.time() - began
            t = end
        if relay_task is None:
            raise PunchFailed("no-path", "no direct strategy worked and the relay is not allowed")
        attempt = Attempt("relay")
        report.attempts.append(attempt)
        began = time.time()
        try:
            waits = {relay_task} | ({gone} if gone is not None else set())
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not relay_task.done():
                raise PunchFailed("peer-gone", "the peer left the rendezvous")
            sock = relay_task.result()
        except PunchFailed as exc:
            attempt.reason, attempt.detail = exc.reason, str(exc)
            attempt.seconds = time.time() - began
            raise
        except Exception as exc:
            attempt.reason, attempt.detail = getattr(exc, "code", "relay-failed"), str(exc)
            attempt.seconds = time.time() - began
            raise PunchFailed("no-path", f"nothing direct worked and the relay failed: {exc}") \
                from exc
        relay_task = None
        attempt.ok, attempt.seconds = True, time.time() - began
        report.history.append((time.time() - t_start, "relay"))
        return sock, "relay"
    finally:
        if gone is not None:
            gone.cancel()
        if relay_task is not None:          # direct won (or gave up): drop the standby relay
            relay_task.cancel()
            try:
                standby = await relay_task
                standby.close()
            except (asyncio.CancelledError, Exception):
                pass


__all__ = ["STRATEGIES", "BUDGET", "RELAY_AFTER", "stages_of", "punch", "Flows"]
