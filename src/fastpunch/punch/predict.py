"""``predict``: toward a peer behind a sequential NAPT. The peer announced
the external port its NAT will most likely give its punch (probed just
before: the reflexive port + the step natcheck measured); other connections
through that NAT can shift it by a few (three hosts connecting at once
behind one sequential NAPT put up to six of their mappings between one
host's probe and its punch: two probes and a flow or two each), so this
side's flows go to ``CANDIDATES`` ports from there on, besides the
candidates ``symmetric`` tries; the peer sends its SYNs to this side's
candidates, and the flow its SYN arrives on wins. Completes on the peer's
SYN-ACK only: a peer that starts over after a RST comes from its NAT's
next port, and only its answer shows which port is current."""

from __future__ import annotations

from dataclasses import replace

from fastpunch.proto.candidates import Candidate, priority
from fastpunch.proto.kinds import CandidateKind, Mapping
from fastpunch.punch.base import PunchContext
from fastpunch.punch.strategy import Flows, Strategy, candidate_pairs, lan_first

CANDIDATES = 8


def ports(ctx: PunchContext) -> list:
    """The peer's ports to try: its announced one and the next few, not
    past 65535 (an allocator wraps into its own range, which nobody here
    knows: a wrapped guess would aim at ports 0-7)."""
    if ctx.peer.mapping is Mapping.SEQUENTIAL or ctx.peer.nat.value == "napt-sequential":
        return [ctx.peer.port + i for i in range(CANDIDATES) if ctx.peer.port + i <= 0xFFFF]
    return [ctx.peer.port]


class Predict(Strategy):
    name = "predict"
    budget = 3.0
    crafted = True
    races = True

    def flows(self, ctx: PunchContext, start: float) -> Flows:
        guesses = tuple(Candidate(CandidateKind.PREDICTED, ctx.peer.public, port or 1,
                                  priority(CandidateKind.PREDICTED, 65535 - i))
                        for i, port in enumerate(ports(ctx)))
        windowed = replace(ctx, peer=replace(ctx.peer, candidates=guesses))
        return Flows(candidate_pairs(windowed, start + lan_first(ctx), self.name, early=False))


STRATEGY = Predict()
