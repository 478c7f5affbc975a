"""``spray``: birthday-style probing for a pair where one side is behind a
NAPT with fully random external ports and the other preserves its port.

- The random side sends a SYN from each of ``SOURCES`` local ports to the
  peer's (known) port; its NAT gives each a random external port and keeps
  the mapping.
- The preserving side sends SYNs from its one port to ``PER_ROUND`` new
  random candidate ports of the random side's public address every round.
- A candidate that hits one of those mappings reaches the random side (its
  NAT sees a reply to the mapping), which answers with a SYN-ACK from that
  source port (simultaneous open); or the random side's SYN from a mapping
  the preserving side already probed gets through the preserving NAT the
  other way. Either way the first flow to complete is handed to the kernel.

With 512 sources and 512 candidates a round against ~64,500 possible ports,
about 4 hits are expected per round (P(no hit) ~ 2%); candidates are fresh
each round, so a slot of several rounds makes success near certain (the
arithmetic of LAB-NOTES: 1,024 probes ~98%). SYNs go out in batches built in
C and sent with sendmmsg. Two random NAPTs would need tens of thousands of
probes a side: left to the relay.
"""

from __future__ import annotations

import array
import random
import select
import time

from fastpunch import netfilter
from fastpunch._engine import (
    ENGINE_MARK, FlowEvent, FlowState, RawReceiver, RawSender, SegmentBatch, TCPOptions, parse,
)
from fastpunch.errors import MalformedPacket
from fastpunch.handoff import repair_socket
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, sleep_until
from fastpunch.punch.rawsession import require_privileges
from fastpunch.rawflow import RawFlow

NAME = "spray"
SOURCES = 512            # local ports on the random side
PER_ROUND = 512          # candidate ports per round on the preserving side
ROUND = 0.25             # seconds between rounds
RESEND = 0.5             # the random side refreshes its SYNs (and mappings a RST closed)
LOW, HIGH = 1024, 65535  # the ports a NAPT allocates from
MAX_FLOWS = 64           # crafted flows at most (hits are ~4 a round)


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    require_privileges()
    if ctx.peer_nat == "napt-random" and ctx.mine_random:
        raise PunchFailed("unsupported", "both sides behind random NAPTs: left to the relay")
    if ctx.mine_random:
        return _random_side(ctx, deadline, attempt, start)
    if ctx.peer_nat == "napt-random":
        return _preserving_side(ctx, deadline, attempt, start)
    raise PunchFailed("unsupported", "spray is for a pair with one random NAPT")


def _options(ctx: PunchContext) -> TCPOptions:
    return TCPOptions(mss=ctx.mss, wscale=ctx.wscale, sack_permitted=ctx.sack_permitted,
                      timestamp=(int(time.monotonic() * 1000) & 0xFFFFFFFF, 0)
                      if ctx.timestamps else None)


def _flow(ctx: PunchContext, local_port: int, peer_port: int) -> RawFlow:
    f = RawFlow(ctx.local_ip, local_port, ctx.peer_ip, peer_port, iss=ctx.iss, mss=ctx.mss,
                wscale=ctx.wscale, sack_permitted=ctx.sack_permitted, timestamps=ctx.timestamps,
                peer_isn=ctx.peer_isn)
    f.tracker.syn_sent()          # its SYN already left in a batch
    return f


def _drive(ctx, deadline, attempt, rx, key_of, make_flow, each_round, *, leader: bool,
           probed=None):
    """``leader`` (the random side) takes only the first port that hits (a
    SYN or a SYN-ACK from the peer) and ignores the rest. The other side
    answers every hit, but a flow only completes when the leader answers
    it, so with several hits in flight (~4 a round) both sides finish on
    the leader's port, never on two different ones."""
    t0 = time.time()
    """Receive on one socket, a crafted flow per answering port; the first
    flow to reach ESTABLISHED with the announced ISN is handed off."""
    flows: dict = {}
    next_round = 0.0
    try:
        while True:
            now = time.time()
            if now >= deadline:
                raise PunchFailed("timeout", f"no port matched in {attempt.sent} SYNs "
                                             f"({len(flows)} answered)")
            if now >= next_round:
                attempt.sent += each_round()
                next_round = now + ROUND
            ready, _, _ = select.select([rx], [], [], max(0.0, min(deadline, next_round) - now))
            if not ready:
                continue
            for datagram in rx.recv_many():
                try:
                    seg = parse(datagram)
                except MalformedPacket:
                    continue
                attempt.seen += 1
                key = key_of(seg)
                f = flows.get(key)
                if f is None and seg.flags & 0x04:
                    continue                      # a far NAT's RST is not a hit
                if f is None and leader and flows:
                    continue                      # a later hit: the first one is the flow
                if f is None and probed is not None and key not in probed:
                    continue                      # not a port we sent to (an open host sees all)
                if f is None and len(flows) >= MAX_FLOWS:
                    continue                      # bounded: a raw socket pair per flow
                if f is None:
                    f = flows[key] = make_flow(key)
                    attempt.events.append((round(time.time() - t0, 3),
                                           f"port {key} answered [{seg.flags_str}]"))
                if f._input(seg) == FlowEvent.RESET:
                    f.restart()
                if f.tracker.state == FlowState.ESTABLISHED:
                    attempt.detail = f"matched {f.local[1]} -> {f.peer[1]}"
                    return repair_socket(f.handoff_state())
    finally:
        for f in flows.values():
            f.close()


def _preserving_side(ctx: PunchContext, deadline: float, attempt: Attempt, start: float):
    netfilter.sweep_stale()
    tried: set = set()
    rng = random.SystemRandom()
    batch = SegmentBatch(PER_ROUND, 128)
    with RawSender(mark=ENGINE_MARK) as tx, \
            RawReceiver(src=ctx.peer_ip, dst=ctx.local_ip, dport=ctx.local_port) as rx, \
            netfilter.suppress_rsts([netfilter.RstSuppression(ctx.local_port, ctx.peer_ip)]):
        def each_round() -> int:
            ports = []
            while len(ports) < PER_ROUND and len(tried) < HIGH - LOW:
                p = rng.randint(LOW, HIGH)
                if p not in tried:
                    tried.add(p)
                    ports.append(p)
            n = batch.fill(len(ports), ctx.local_ip, ctx.peer_ip, ctx.local_port, 0, seq=ctx.iss,
                           flags=0x02, window=64240, options=_options(ctx),
                           dports=array.array("H", ports))
            return tx.send_batch(batch, 0, n)

        sleep_until(start)
        return _drive(ctx, deadline, attempt, rx, key_of=lambda seg: seg.sport,
                      make_flow=lambda port: _flow(ctx, ctx.local_port, port),
                      each_round=each_round, leader=False, probed=tried)


def _random_side(ctx: PunchContext, deadline: float, attempt: Attempt, start: float):
    netfilter.sweep_stale()
    rng = random.SystemRandom()
    sources = sorted(rng.sample(range(32768, 60999), SOURCES))
    batch = SegmentBatch(SOURCES, 128)
    last = [0.0]
    guard = netfilter.suppress_rsts(
        [netfilter.RstSuppression(p, ctx.peer_ip, ctx.peer_port) for p in sources])
    with RawSender(mark=ENGINE_MARK) as tx, \
            RawReceiver(src=ctx.peer_ip, dst=ctx.local_ip, sport=ctx.peer_port) as rx, guard:
        def each_round() -> int:
            if time.time() - last[0] < RESEND:
                return 0
            last[0] = time.time()
            n = batch.fill(SOURCES, ctx.local_ip, ctx.peer_ip, 0, ctx.peer_port, seq=ctx.iss,
                           flags=0x02, window=64240, options=_options(ctx),
                           sports=array.array("H", sources))
            return tx.send_batch(batch, 0, n)

        sleep_until(start)
        return _drive(ctx, deadline, attempt, rx, key_of=lambda seg: seg.dport,
                      make_flow=lambda port: _flow(ctx, port, ctx.peer_port),
                      each_round=each_round, leader=True)
