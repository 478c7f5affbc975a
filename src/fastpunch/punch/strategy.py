"""The protocol every strategy follows, and what the crafted ones share.

A strategy is a policy: which flows to try, which segments, when. It is an
object with a ``name``, a ``budget`` (seconds of its slot), whether it
needs crafted segments (``crafted``: raw sockets, TCP_REPAIR, nftables),
and ``run(ctx, slot, attempt, cancel)``, which returns a connected kernel
socket or raises PunchFailed with a stable reason.

Strategies that ``race`` contribute flows (``flows``) to the one punch
machine of a crafted attempt (``driver.Race``): the planner runs every
racing strategy of a plan together, in one machine with one receiver, so
their candidate pairs are tried at once and the first completed handshake
wins. Run alone (a forced strategy), a racing strategy is a race of one.
The others (``spoof``, ``simopen``, ``upnp``) run in a slot of their own:
spoof rewrites every segment of its flow, the kernel strategies hold
kernel sockets on the punch port.
"""

from __future__ import annotations

import abc
import asyncio
import socket
from dataclasses import dataclass
from typing import ClassVar, Optional

from fastpunch.netcheck.route import mss_toward, route_source
from fastpunch.proto.candidates import Candidate, form_pairs, priority, public_v6
from fastpunch.proto.kinds import CandidateKind, Filtering, Mapping
from fastpunch.proto.punch import Mode, PairPlan
from fastpunch.punch.base import Attempt, PunchContext

__all__ = ["Slot", "Strategy", "Flows", "candidate_pairs", "our_candidates", "lan_first",
           "FIRST_TTL", "FIRST_GAP", "MIN_GAP", "PACE", "LAN_FIRST"]

# The first SYN of a pair that crosses NATs (the opener) dies one hop past
# our own gateway: it opens our mapping without reaching the far gateway,
# which might answer it with a RST that closes the mapping again
# (netfilter-facts 1 and 3, docs/punch.md). The full SYN follows MIN_GAP later toward a
# gateway known to drop unsolicited SYNs quietly (a SYN of ours that comes
# before the peer's own opener is only dropped, and the peer's SYN
# completes the open), FIRST_GAP later toward one that may answer with a
# RST (nat-rst, or not known): that gap absorbs the two sides' start skew,
# and a RST'd SYN costs far more (a backoff, and our mapping reopened).
FIRST_TTL = 2
FIRST_GAP = 0.03
MIN_GAP = 0.002
PACE = 0.005          # between the first SYNs of successive pairs, highest priority first
LAN_FIRST = 0.1       # the windows of guesses (predict, spray) wait this long behind a LAN pair


@dataclass(frozen=True)
class Slot:
    start: float          # wall clock: no SYN before
    end: float            # and none after; the attempt fails then


@dataclass(frozen=True)
class Flows:
    pairs: tuple = ()
    sprays: tuple = ()
    nominator: Optional[bool] = None      # None: the initiator nominates (see proto.punch)


class Strategy(abc.ABC):
    name: ClassVar[str]
    budget: ClassVar[float]
    crafted: ClassVar[bool]
    races: ClassVar[bool] = False

    def flows(self, ctx: PunchContext, start: float) -> Flows:
        """Racing strategies: the flows to add to the attempt's machine."""
        raise NotImplementedError(f"{self.name} does not race")

    async def run(self, ctx: PunchContext, slot: Slot, attempt: Attempt,
                  cancel: Optional[asyncio.Event] = None) -> socket.socket:
        """A race of this strategy alone (the others override it)."""
        from fastpunch.punch.driver import Race

        flows = self.flows(ctx, slot.start)
        race = Race(ctx, slot.end, attempt, cancel=cancel,
                    nominator=ctx.initiator if flows.nominator is None else flows.nominator)
        race.add(flows.pairs, flows.sprays)
        return await race.run()

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


def lan_first(ctx: PunchContext) -> float:
    """How long guesses wait: two devices on one LAN connect over it in a
    few milliseconds, and a window of guessed ports or a spray beside it
    would only add packets (measured: some 515 a side, with the LAN pair
    winning in 30 ms)."""
    from fastpunch.proto.candidates import same_lan

    ours = our_candidates(ctx)
    if ctx.ours.public == ctx.peer.public or same_lan(ours, ctx.peer.candidates):
        return LAN_FIRST
    return 0.0


def our_candidates(ctx: PunchContext) -> tuple:
    """What we announced; without a gathering (a version-1 announcement),
    our address toward the peer and the port we announced."""
    if ctx.ours.candidates:
        return ctx.ours.candidates
    return (Candidate(CandidateKind.HOST, ctx.local_ip, ctx.local_port, priority(CandidateKind.HOST)),
            Candidate(CandidateKind.SRFLX, ctx.ours.public, ctx.ours.port,
                      priority(CandidateKind.SRFLX)))


def _same_64(a: str, b: str) -> bool:
    """Two IPv6 addresses on one /64 (one link: no router between)."""
    import ipaddress

    try:
        return ipaddress.ip_network(f"{a}/64", strict=False) == \
            ipaddress.ip_network(f"{b}/64", strict=False)
    except ValueError:
        return False


def candidate_pairs(ctx: PunchContext, start: float, policy: str, *,
                    mode: Mode = Mode.OPEN, early: Optional[bool] = None,
                    kinds: Optional[set] = None) -> tuple:
    """A PairPlan for every candidate pair of the rendezvous (RFC 8445
    order), each from our punch port toward one remote candidate:

    * toward a LAN (host) candidate: no opener (no gateway between us), the
      SYN at once;
    * toward a global IPv6 host candidate outside our own /64: through the
      two sites' firewalls, as toward a reflexive one; natcheck's filtering
      is IPv4's, so over IPv6 an opener is always sent, and the full SYN
      follows the longer gap unless the peer's IPv6 filtering probe found a
      firewall that drops (``filtering6``): one that answers an unsolicited
      SYN with a RST, its conntrack entry killed by the RST of the other,
      stayed closed otherwise; it completes on the
      peer's SYN unless a side is behind NAT66 (natcheck's mapping is
      IPv4's: over IPv6 the reflexive candidate says whether one translates);
    * toward anything through gateways: an opener first, unless we are an
      open host or the remote address is our own public one (a hairpin),
      and the full SYN after the gap the peer's filtering calls for (see
      FIRST_GAP);
    * the MSS each SYN announces is the route's toward that address;
    * completion on the peer's SYN (``early``) unless a mapping on either
      side may change between probe and punch, or the remote candidate is a
      guess."""
    ours, peer = ctx.ours, ctx.peer
    pairs = form_pairs(our_candidates(ctx), peer.reachable_at(), ctx.role,
                       our_public=ours.public, peer_public=peer.public)
    translating = ours.mapping.translates or peer.mapping.translates
    # natcheck's mapping is IPv4's; over IPv6 only a NAT66 translates, and a
    # side behind one announced a reflexive IPv6 candidate (its host's differs)
    translating6 = any(c.kind is CandidateKind.SRFLX and c.family == 6
                       for c in tuple(our_candidates(ctx)) + tuple(peer.reachable_at()))
    we_filter = not (ours.mapping is Mapping.NONE and ours.filtering is Filtering.OPEN)
    gap = MIN_GAP if peer.filtering in (Filtering.DROP, Filtering.OPEN) else FIRST_GAP
    if peer.mapping is Mapping.SEQUENTIAL:
        # its reflexive candidate is the probe's own mapping: the peer's punch
        # comes from the next ones (its predicted candidate). A flow toward it
        # would also take the first of our own next mappings, when ours is
        # sequential too, and so shift every later flow off the port the peer
        # predicted for it
        pairs = [p for p in pairs if p.remote.kind is not CandidateKind.SRFLX]
    out = []
    sources: dict = {}
    for i, p in enumerate(pairs):
        remote = p.remote
        if kinds is not None and remote.kind not in kinds:
            continue
        if remote.addr not in sources:
            try:
                sources[remote.addr] = (route_source(remote.addr), mss_toward(remote.addr))
            except OSError:
                continue                     # no route toward it from here
        local_ip, mss = sources[remote.addr]
        six = remote.family == 6
        through = remote.kind is not CandidateKind.HOST or \
            (six and public_v6(remote.addr) and not _same_64(local_ip, remote.addr))
        # (toward our own public address, a hairpin, nothing crosses a far
        # gateway: an opener would only meet ours)
        opener = mode is Mode.OPEN and through and (we_filter or six) and \
            remote.addr != ours.public
        g = (MIN_GAP if peer.filtering6 in (Filtering.DROP, Filtering.OPEN) else FIRST_GAP) \
            if six else gap
        t = start + i * PACE
        out.append(PairPlan(
            (local_ip, ctx.local_port), remote.endpoint, policy, p.kind, p.priority, mode,
            t + (g if opener else 0.0), FIRST_TTL if opener else 0, g if opener else 0.0,
            early=(not (translating6 if six else translating) and
                   remote.kind is not CandidateKind.PREDICTED) if early is None else early,
            mss=mss))
    return tuple(out)
