"""``symmetric``: both sides send SYN (resent every 200 ms) with the ISNs they
announced; each answers the peer's SYN with a SYN-ACK (simultaneous open,
RFC 9293 §3.5). A Linux NAT accepts the peer's SYN once our own SYN has left
through it (LAB-NOTES 3), and it translates our SYN-ACK because the peer's
SYN came first (LAB-NOTES 2). Works where a side may not start with a
SYN-ACK, and where our SYN is dropped by the far NAT until the peer's own SYN
opens it. The peer's SYN with its announced ISN completes the open on this
side (answered with SYN-ACK and ACK; docs/punch.md "Complete on the peer's
SYN"), and the flow is handed to the kernel with TCP_REPAIR; until the peer
acks our SYN, the raw flow resends it in the background."""

from __future__ import annotations

from fastpunch.punch.base import Attempt, PunchContext
from fastpunch.punch.rawsession import handshake

NAME = "symmetric"
RESEND = 0.2


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    return handshake(ctx, deadline, attempt, active=True, resend=RESEND, start=start)
