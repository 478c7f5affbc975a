"""``spray``: birthday-style probing for a pair where one side's NAT gives
every new flow a random external port (``Mapping.RANDOM``) and the other's
does not.

- The random side sends a SYN from each of ``SOURCES`` local ports to the
  peer's (known) candidate; its NAT gives each a random external port and
  keeps the mapping.
- The other side sends SYNs from its one punch port to ``PER_ROUND`` fresh
  random ports of the random side's public address every round.
- A probe that hits one of those mappings reaches the random side (its NAT
  sees a reply to the mapping), which answers it with a SYN-ACK from that
  source port (simultaneous open); or a SYN of the random side's from a
  mapping the other side already probed gets through the other side's NAT.

The random side nominates (proto.punch): it takes its first hit and
answers nothing else, so both sides end on the one port it chose. Both
sides' flows share the attempt's machine with the other strategies of the
race; the spray's SYNs are built in C a batch at a time and sent with
sendmmsg, under their own cap (``Limits.spray``).

With 512 sources and 512 probes a round against ~64,500 possible ports,
about 4 hits are expected per round (P(no hit) ~ 2%; public figures: 1,024
probes ~98%). Two random NAPTs would need tens of thousands of probes a
side: left to the relay (docs/punch.md has the arithmetic)."""

from __future__ import annotations

import random

from fastpunch.netcheck.route import mss_toward
from fastpunch.proto.kinds import Mapping
from fastpunch.proto.punch import SprayPlan
from fastpunch.punch.base import PunchContext, PunchFailed
from fastpunch.punch.strategy import Flows, Strategy, lan_first

SOURCES = 512            # local ports on the random side
PER_ROUND = 512          # probes per round on the other side
ROUND = 0.25             # seconds between the other side's rounds
RESEND = 0.5             # the random side refreshes its SYNs (and mappings a RST closed)
EPHEMERAL = (32768, 60999)


def random_sides(ctx: PunchContext) -> tuple:
    mine = ctx.ours.mapping is Mapping.RANDOM or ctx.ours.nat.value == "napt-random"
    theirs = ctx.peer.mapping is Mapping.RANDOM or ctx.peer.nat.value == "napt-random"
    return mine, theirs


class Spray(Strategy):
    name = "spray"
    budget = 4.0
    crafted = True
    races = True

    def flows(self, ctx: PunchContext, start: float) -> Flows:
        mine, theirs = random_sides(ctx)
        if mine and theirs:
            raise PunchFailed("unsupported", "both sides behind random NAPTs: left to the relay")
        if not (mine or theirs):
            raise PunchFailed("unsupported", "spray is for a pair with one random NAPT")
        mss = mss_toward(ctx.peer.public)
        start += lan_first(ctx)
        if mine:
            ports = tuple(sorted(random.SystemRandom().sample(range(*EPHEMERAL), SOURCES)))
            return Flows(sprays=(SprayPlan(ctx.local_ip, ctx.peer.public,
                                           remote_port=ctx.peer.port, sources=ports,
                                           round=RESEND, start=start, mss=mss),),
                         nominator=True)
        return Flows(sprays=(SprayPlan(ctx.local_ip, ctx.peer.public, local_port=ctx.local_port,
                                       probe_ports=PER_ROUND, round=ROUND, start=start,
                                       mss=mss),),
                     nominator=False)


STRATEGY = Spray()
