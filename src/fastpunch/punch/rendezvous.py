"""From the CCS's Ready to a connected socket: both sides' info as a
PunchContext, the planner run with the relay beside it, the report."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable, Optional

from fastpunch.netcheck.route import route_source
from fastpunch.proto.kinds import Filtering, Mapping, NatClass, Role, parse
from fastpunch.proto.wire import NextInfo, RendezvousReady
from fastpunch.punch import planner
from fastpunch.punch.base import PunchContext, Report, Side

__all__ = ["punch_ready", "sides_of"]


def _side(public: str, info) -> Side:
    return Side(public=public, port=info.port, isn=info.isn,
                candidates=tuple(info.candidates or ()), mss=info.mss, wscale=info.wscale,
                sack_permitted=info.sack_permitted, timestamps=info.timestamps,
                nat=parse(NatClass, info.nat), mapping=parse(Mapping, info.mapping or "unknown"),
                filtering=parse(Filtering, info.filtering or "unknown"),
                filtering6=parse(Filtering, getattr(info, "filtering6", None) or "unknown"),
                crafted=info.crafted is not False)


def sides_of(ready: RendezvousReady, info: NextInfo, our_public: str) -> tuple:
    """(ours, the peer's) as the punch sees them."""
    return _side(our_public, info), _side(ready.addr, ready)


async def punch_ready(ready: RendezvousReady, info: NextInfo, gathered, *, our_public: str,
                      ccs_ip: str, relay: Callable, strategies=None,
                      relay_after: Optional[float] = None,
                      cancel: Optional[asyncio.Event] = None,
                      began: Optional[float] = None,
                      tracer: Optional[Callable] = None) -> tuple:
    """(socket, Report). Raises what the planner raises, with the report
    attached as ``exc.report`` (the caller gets the attempts with the
    failure)."""
    began = time.time() if began is None else began
    ours, peer = sides_of(ready, info, our_public)
    try:
        local_ip = route_source(ready.addr)
    except OSError:               # the peer's address is of a family we have no route in
        local_ip = getattr(gathered, "local_addr", None) or "0.0.0.0"
    ctx = PunchContext(role=Role(ready.role), local_ip=local_ip,
                       local_port=gathered.local_port, ours=ours, peer=peer, ccs_ip=ccs_ip,
                       session=ready.session,
                       guarded=getattr(gathered, "guard", None) is not None, tracer=tracer)
    report = Report(ready.peer)
    for note in getattr(gathered, "notes", ()):
        report.history.append((0.0, f"gathering: {note}"))
    if not peer.crafted:
        report.history.append((0.0, f"{ready.peer} announced it cannot craft segments: "
                                    "no crafted strategies in the plan"))
    report.history.append((0.0, f"{len(ours.candidates)} candidates of ours, "
                                f"{len(peer.candidates)} of {ready.peer}'s; plan "
                                f"{', '.join(ready.plan)}"))
    kw = {} if relay_after is None else {"relay_after": relay_after}
    try:
        sock, strategy = await planner.punch(ctx, ready.plan, ready.start_at / 1000, report,
                                             relay=relay, only=strategies, cancel=cancel, **kw)
    except BaseException as exc:       # (a cancellation too: asyncio.wait_for's timeout
        report.seconds = time.time() - began   # raises from it, as __cause__)
        exc.report = report
        raise
    report.path = "relay" if strategy == "relay" else "direct"
    report.strategy = strategy
    report.family = "IPv6" if sock.family == socket.AF_INET6 else "IPv4"
    report.seconds = time.time() - began
    return sock, report
