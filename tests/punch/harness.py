"""Test-only helpers for the punching tests. The lab deployment (a CCS in
the core, devices on event loops in their hosts) is
:mod:`fastpunch.lab.deploy`; its names are re-exported here for the tests
and benchmarks that import them from this module."""

from __future__ import annotations

from fastpunch.lab.deploy import CCS_PORT as CCS_PORT
from fastpunch.lab.deploy import LabCCS as LabCCS
from fastpunch.lab.deploy import LoopThread as LoopThread

__all__ = ["CCS_PORT", "LabCCS", "LoopThread", "start_responder_late"]


def start_responder_late(monkeypatch, seconds: float) -> None:
    """The accepting side starts its first stage this long after the
    connecting side (a clock or scheduling skew, made exact)."""
    import asyncio
    from dataclasses import replace

    from fastpunch.proto.kinds import Role
    from fastpunch.punch import planner

    real = planner._run_stage

    async def late(stage, ctx, slot, attempt, cancel):
        if ctx.role is Role.RESPONDER:
            await asyncio.sleep(seconds)
            slot = replace(slot, start=slot.start + seconds)
        return await real(stage, ctx, slot, attempt, cancel)

    monkeypatch.setattr(planner, "_run_stage", late)
