"""The raw handshake shared by the crafted strategies: RST suppression scoped
to the flow, the engine's RawFlow, the ISN check, and the TCP_REPAIR hand-off."""

from __future__ import annotations

import time

from fastpunch import _caps, netfilter
from fastpunch.handoff import repair_socket
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed
from fastpunch.rawflow import HandshakeFailed, RawFlow


def require_privileges() -> None:
    """Raw sockets (CAP_NET_RAW), nftables and TCP_REPAIR (CAP_NET_ADMIN)."""
    _caps.require("crafted handshake and kernel hand-off", _caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN)


def handshake(ctx: PunchContext, deadline: float, attempt: Attempt, *, active: bool,
              resend: float, ttl_first: int = 0):
    require_privileges()
    timeout = deadline - time.time()
    if timeout <= 0:
        raise PunchFailed("no-time", "the strategy's time slot had passed")
    netfilter.sweep_stale()        # tables of crashed fastpunch processes, in this namespace
    flow = RawFlow(ctx.local_ip, ctx.local_port, ctx.peer_ip, ctx.peer_port, iss=ctx.iss,
                   mss=ctx.mss, wscale=ctx.wscale, sack_permitted=ctx.sack_permitted,
                   timestamps=ctx.timestamps)
    try:
        with flow.rst_suppression():
            try:
                if active:
                    flow.connect(timeout=timeout, resend_every=resend, survive_rst=True)
                else:
                    from fastpunch._engine import TCPOptions

                    flow.answer_assumed(ctx.peer_isn, TCPOptions(
                        mss=ctx.peer_mss, wscale=ctx.peer_wscale,
                        sack_permitted=ctx.peer_sack_permitted,
                        timestamp=(0, 0) if ctx.peer_timestamps else None),
                        timeout=timeout, resend_every=resend)
            except HandshakeFailed as exc:
                reason = "reset" if "reset" in str(exc) else "timeout"
                raise PunchFailed(reason, str(exc)) from None
            if flow.tracker.irs != ctx.peer_isn:
                raise PunchFailed("isn-mismatch",
                                  f"the peer's ISN {flow.tracker.irs} is not the announced "
                                  f"{ctx.peer_isn}: not our peer")
            return repair_socket(flow.handoff_state())
    finally:
        attempt.sent, attempt.seen = flow.stats.sent, flow.stats.received
        attempt.events = list(flow.stats.events)
        flow.close()
