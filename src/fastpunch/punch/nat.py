"""``nat``: the original method. The initiator sends SYN (its NAT opens a
mapping; the responder's firewall drops it); the responder, never having
seen it, sends a SYN-ACK acking the initiator's announced ISN + 1; the
initiator answers ACK. Behind a Linux NAT the responder's opening SYN-ACK is
INVALID to conntrack and leaves untranslated (netfilter-facts 2), so this passes
only where the responder is not behind such a NAT; ``symmetric`` passes
everywhere this does, so plans use it only when asked for."""

from __future__ import annotations

from fastpunch.proto.punch import Mode
from fastpunch.punch.base import PunchContext
from fastpunch.punch.strategy import Flows, Strategy, candidate_pairs


class Nat(Strategy):
    name = "nat"
    budget = 2.0
    crafted = True
    races = True

    def flows(self, ctx: PunchContext, start: float) -> Flows:
        mode = Mode.OPEN if ctx.initiator else Mode.ANSWER
        return Flows(candidate_pairs(ctx, start, self.name, mode=mode, early=False))


STRATEGY = Nat()
