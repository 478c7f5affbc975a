"""``nat``: the original method. The initiator sends SYN (its NAT opens a
mapping; the responder's firewall drops it); the responder, never having
seen it, sends a SYN-ACK acking the initiator's announced ISN + 1; the
initiator answers ACK. Behind a Linux NAT the responder's opening SYN-ACK is
INVALID to conntrack and leaves untranslated (LAB-NOTES 2), so this passes
only where the responder is not behind such a NAT; the planner tries
``symmetric`` first."""

from __future__ import annotations

from fastpunch.punch.base import Attempt, PunchContext
from fastpunch.punch.rawsession import handshake

NAME = "nat"


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    return handshake(ctx, deadline, attempt, active=ctx.role == "initiator", resend=0.2, start=start)
