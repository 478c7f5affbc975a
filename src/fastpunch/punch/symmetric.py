"""``symmetric``: both sides send SYNs with the ISNs they announced, toward
every candidate pair at once; each answers the peer's SYN with a SYN-ACK
(simultaneous open, RFC 9293 3.5). A Linux NAT accepts the peer's SYN once
our own SYN has left through it (netfilter-facts 3), and translates our SYN-ACK
because the peer's SYN came first (netfilter-facts 2). Works where a side may not
start with a SYN-ACK, and wherever the candidates name the mapping the
peer's SYNs will come from: port-preserving NATs, endpoint-independent
ones whatever the number, a port the gateway maps, the LAN itself. The
peer's SYN with its announced ISN completes the open on this side
(docs/punch.md "Complete on the peer's SYN"); the flow is handed to the
kernel with TCP_REPAIR."""

from __future__ import annotations

from fastpunch.punch.base import PunchContext
from fastpunch.punch.strategy import Flows, Strategy, candidate_pairs


class Symmetric(Strategy):
    name = "symmetric"
    budget = 3.0
    crafted = True
    races = True

    def flows(self, ctx: PunchContext, start: float) -> Flows:
        return Flows(candidate_pairs(ctx, start, self.name))


STRATEGY = Symmetric()
