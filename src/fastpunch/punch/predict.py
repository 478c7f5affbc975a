"""``predict``: for a peer behind a sequential NAPT. The peer announced the
external port its NAT will most likely give its next mapping (probed just
before: last seen + delta); other connections through that NAT can shift it
by a few, so this side sends its SYNs to ``CANDIDATES`` ports from there on,
the peer sends its own to this side's exact port, and the candidate whose
flow the peer's SYN arrives on wins (symmetric open on it). This side must be
port-preserving (two sequential NAPTs are left to the relay)."""

from __future__ import annotations

from fastpunch.punch.base import Attempt, PunchContext
from fastpunch.punch.rawsession import handshake

NAME = "predict"
CANDIDATES = 6


def candidates(ctx: PunchContext) -> list:
    if ctx.peer_nat == "napt-sequential":
        return [(ctx.peer_port + i) & 0xFFFF for i in range(CANDIDATES)]
    return [ctx.peer_port]


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    return handshake(ctx, deadline, attempt, active=True, resend=0.2,
                     peer_ports=candidates(ctx), start=start)
