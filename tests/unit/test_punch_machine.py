"""The punch machine without root or sockets: scripted segment sequences and
a fake clock, asserting exactly which segments leave and when."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch._engine import Flags, TCPOptions, build, parse
from fastpunch.proto.punch import (
    Limits, MachineState, Mode, PairPlan, PunchMachine, Send, SendBatch, SprayPlan, late_bytes,
)

from .punchsim import Host, Net, expand, wire

A_ISN, B_ISN = 1_000_000, 3_000_000_000
A, B = ("10.1.0.2", 40000), ("10.2.0.2", 50000)
A_PUB, B_PUB = ("203.0.113.10", 40000), ("203.0.113.20", 50000)


def seg(src, dst, flags, seq, ack=0, payload=b"", options=None):
    return parse(build(src[0], dst[0], src[1], dst[1], seq=seq, ack=ack, flags=flags,
                       window=64240, options=options, payload=payload or None))


def machine(iss=A_ISN, peer=B_ISN, nominator=True, deadline=3.0, **kw):
    return PunchMachine(iss=iss, peer_isn=peer, nominator=nominator, deadline=deadline, **kw)


def flags_of(out):
    return [Flags(s.flags) for s in expand(out)]


def pair(local=A, remote=B, **kw):
    return PairPlan(local, remote, **kw)


# -- one pair, two sides ----------------------------------------------------------------------
def linked(a_pairs, b_pairs, *, a_kw=None, b_kw=None, **net_kw):
    a = machine(A_ISN, B_ISN, True, peer_addrs=[p.remote[0] for p in a_pairs], **(a_kw or {}))
    b = machine(B_ISN, A_ISN, False, peer_addrs=[p.remote[0] for p in b_pairs], **(b_kw or {}))
    for p in a_pairs:
        a.add(p)
    for p in b_pairs:
        b.add(p)
    ha = Host("a", a, {p.local[0] for p in a_pairs})
    hb = Host("b", b, {p.local[0] for p in b_pairs})
    return ha, hb, Net(ha, hb, **net_kw)


def test_crossing_syns_complete_both_sides_on_the_peers_syn_one_way_trip_after_the_start():
    ha, hb, net = linked([pair(A, B, early=True)], [pair(B, A, early=True)])
    net.run(0.011)
    for h in (ha, hb):
        assert h.machine.state is MachineState.COMPLETE
        assert h.machine.outcome.early and h.machine.outcome.at == pytest.approx(0.01)
        # SYN at 0; at 0.01 the peer's SYN: SYN-ACK and ACK right behind it
        assert [(t, Flags(s.flags)) for t, s in h.log] == \
            [(0.0, Flags.SYN), (0.01, Flags.SYN | Flags.ACK), (0.01, Flags.ACK)]
    ea, eb = ha.machine.handoff(0.011), hb.machine.handoff(0.011)
    assert (ea.snd_nxt, ea.rcv_nxt) == (A_ISN + 1, B_ISN + 1)
    assert (eb.snd_nxt, eb.rcv_nxt) == (ea.rcv_nxt, ea.snd_nxt)
    assert ea.local == A and ea.peer == B and ea.advmss == 1460
    assert ea.snd_wscale == 7 and ea.sack and ea.timestamps
    # handed off before the peer showed it got our SYN: confirm, and the
    # peer's SYN-ACK (already on its way) confirms, answered with an ACK
    for h in (ha, hb):
        h.machine.handed_off(0.011)
        assert h.machine.state is MachineState.CONFIRMING
    net.run(0.05)
    for h in (ha, hb):
        assert h.machine.state is MachineState.DONE and h.machine.confirmed
        assert Flags(h.log[-1][1].flags) == Flags.ACK


def test_without_early_the_side_waits_for_its_syn_to_be_acked():
    ha, hb, net = linked([pair(A, B)], [pair(B, A)])
    net.run(0.015)
    assert ha.machine.state is hb.machine.state is MachineState.RUNNING
    net.run(0.021)                 # the SYN-ACKs crossed too: ESTABLISHED a round trip in
    for h in (ha, hb):
        assert h.machine.state is MachineState.COMPLETE and not h.machine.outcome.early
        h.machine.handed_off(0.021)
        assert h.machine.state is MachineState.DONE      # nothing to confirm


def test_a_peer_that_missed_our_syn_and_our_syn_ack_is_brought_in_by_the_confirmation():
    # b's gateway drops a's first SYN (it came before b's own SYN left), a's
    # gateway drops a's SYN-ACK: a completed on b's SYN, b saw nothing of a's
    dropped = []

    def drop(t, s):
        if s.src == A[0] and (s.flags == Flags.SYN | Flags.ACK or
                              (s.flags == Flags.SYN and t == 0.0)):
            dropped.append((t, Flags(s.flags)))
            return True
        return False

    ha, hb, net = linked([pair(A, B, early=True)], [pair(B, A, early=True)], drop=drop)
    net.run(0.011)
    assert ha.machine.state is MachineState.COMPLETE
    assert hb.machine.state is MachineState.RUNNING
    ha.machine.handed_off(0.011)
    net.run(0.3)
    # a resent its SYN 0.2 s after the hand-off; b completed on it, and b's
    # SYN-ACK confirmed a
    assert [t for t, s in ha.log if s.flags == Flags.SYN] == [0.0, pytest.approx(0.211)]
    assert hb.machine.state is MachineState.COMPLETE
    assert ha.machine.state is MachineState.DONE and ha.machine.confirmed
    assert dropped[0] == (0.0, Flags.SYN)


def test_the_confirmation_gives_up_at_its_deadline():
    m = machine(confirm_until=0.5)
    m.add(pair(early=True))
    m.advance(0.0)
    m.receive(seg(B, A, Flags.SYN, B_ISN), 0.01)
    m.handed_off(0.01)
    sent = []
    t = 0.01
    while m.state is MachineState.CONFIRMING:
        t = m.next_timer
        sent += flags_of(m.advance(t))
    assert m.state is MachineState.DONE and not m.confirmed
    assert sent == [Flags.SYN, Flags.SYN] and t == 0.5


# -- what is ignored ---------------------------------------------------------------------------
def test_a_syn_with_another_isn_is_ignored_not_answered():
    m = machine()
    m.add(pair(early=True))
    m.advance(0.0)
    assert m.receive(seg(B, A, Flags.SYN, 12345), 0.01) == []
    assert m.receive(seg(B, A, Flags.SYN | Flags.ACK, 12345, A_ISN + 1), 0.02) == []
    assert m.state is MachineState.RUNNING and m.ignored == 2
    assert m.flows[(A[1], B[0], B[1])].state.name == "SYN_SENT"


def test_segments_of_no_flow_are_ignored_unless_they_are_the_peers_syn():
    m = machine(peer_addrs=[B[0]])
    m.add(pair(early=True))
    m.advance(0.0)
    # a stranger, the peer's address without its ISN, a peer SYN-ACK from an
    # unannounced port: none makes a flow
    assert m.receive(seg(("192.0.2.9", 1), A, Flags.SYN, B_ISN), 0.01) == []
    assert m.receive(seg((B[0], 50001), A, Flags.SYN, 7), 0.01) == []
    assert m.receive(seg((B[0], 50001), A, Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1), 0.01) == []
    assert len(m.flows) == 1 and m.ignored == 3


def test_the_peers_syn_from_an_unannounced_port_becomes_a_flow_and_is_answered():
    # the peer's NAT chose another port than its candidate: its SYN, with
    # the announced ISN, reaches us (we are open); answering it is the path
    m = machine(peer_addrs=[B[0]])
    m.add(pair(early=True, policy="predict"))
    m.advance(0.0)
    out = m.receive(seg((B[0], 61234), A, Flags.SYN, B_ISN), 0.01)
    assert [(s.dport, Flags(s.flags), s.ack) for s in out] == \
        [(61234, Flags.SYN | Flags.ACK, B_ISN + 1)]
    assert m.state is MachineState.RUNNING        # a peer-reflexive flow completes on the ACK
    m.receive(seg((B[0], 61234), A, Flags.ACK, B_ISN + 1, A_ISN + 1), 0.02)
    assert m.state is MachineState.COMPLETE and m.outcome.pair.kind == "prflx"
    assert m.outcome.pair.policy == "predict"     # the strategy whose flow drew it
    assert m.handoff(0.02).peer == (B[0], 61234)


# -- never a storm ---------------------------------------------------------------------------------
def test_rsts_back_the_pair_off_and_each_reopens_our_mapping_once():
    m = machine(deadline=10.0)
    m.add(pair(opener_ttl=2, opener_lead=0.03, start=0.03, early=True))
    log = []
    t = 0.0
    for _ in range(40):
        t = m.next_timer
        if t >= 4.0:
            break
        for s in expand(m.advance(t)):
            log.append((round(t, 3), Flags(s.flags), s.ttl))
            if s.ttl == 64:        # the far gateway answers every full SYN with a RST
                m.receive(seg(B, A, Flags.RST | Flags.ACK, 0, A_ISN + 1), t + 0.01)
    fulls = [t for t, f, ttl in log if ttl == 64]
    openers = [t for t, f, ttl in log if ttl == 2]
    # first opener 30 ms ahead, then after RST n one opener at once and the
    # full SYN 0.1, 0.2, 0.4, 0.8, 0.8 ... s later
    assert openers[:4] == [0.0, 0.04, 0.15, 0.36]
    assert fulls[:5] == [0.03, 0.14, 0.35, 0.76, 1.57]
    gaps = [round(b - a, 3) for a, b in zip(fulls, fulls[1:])]
    assert gaps[:4] == [0.11, 0.21, 0.41, 0.81]
    assert len(log) <= Limits().per_pair


def test_an_opener_that_draws_a_rst_itself_waits_for_the_next_syn():
    # a gateway within the opener's TTL answers it too (our own, toward a
    # hairpinned address): each RST must not fire another opener at once
    m = machine(deadline=3.0)
    m.add(pair(opener_ttl=2, opener_lead=0.03, start=0.03))
    log = []
    while m.state is MachineState.RUNNING:
        t = m.next_timer
        for s in expand(m.advance(t)):
            log.append((round(t, 3), s.ttl))
            m.receive(seg(B, A, Flags.RST | Flags.ACK, 0, A_ISN + 1), t)
    # the RST of an opener leaves its full SYN as planned; one opener per
    # backoff step, each right before its full SYN
    assert log[:6] == [(0.0, 2), (0.03, 64), (0.03, 2), (0.13, 64), (0.13, 2), (0.33, 64)], log
    assert len(log) <= 16, log


def test_a_pair_stops_at_its_own_budget_and_the_attempt_at_its_total():
    lim = Limits(per_pair=5, total=8, resend=0.1)
    m = machine(limits=lim, deadline=10.0)
    for port in (50000, 50001, 50002):
        m.add(pair(remote=(B[0], port)))
    sent = []
    while m.state is MachineState.RUNNING:
        sent += expand(m.advance(m.next_timer))
    per = {}
    for s in sent:
        per[s.dport] = per.get(s.dport, 0) + 1
    assert len(sent) == 8 and max(per.values()) <= 5
    # quiet pairs still listen: the machine runs to its deadline
    assert m.failure.value == "timeout" and m.reason


def test_a_quiet_pair_still_completes_on_the_peers_late_answer():
    m = machine(limits=Limits(per_pair=1))
    m.add(pair())
    m.advance(0.0)
    assert m.advance(0.5) == []                      # budget spent: no resend
    out = m.receive(seg(B, A, Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1), 0.6)
    assert flags_of(out) == [Flags.ACK] and m.state is MachineState.COMPLETE


# -- several pairs: one nominator -------------------------------------------------------------------
def test_the_nominator_answers_only_the_flow_it_took_and_both_sides_agree():
    lan_a, lan_b = A, B
    hp_a, hp_b = ("10.1.0.2", 40000), ("203.0.113.10", 50000)   # b's hairpinned address
    a_pairs = [pair(lan_a, lan_b, early=True, kind="host-host"),
               pair(hp_a, hp_b, early=True, kind="srflx-srflx")]
    b_pairs = [pair(lan_b, lan_a, early=True, kind="host-host"),
               pair(lan_b, ("203.0.113.10", 40000), early=True, kind="srflx-srflx")]

    def rewrite(s):
        # the gateway hairpins: a -> WAN:50000 reaches b from WAN:40000
        if s.dst == "203.0.113.10":
            if s.src == "10.1.0.2":
                return Send("203.0.113.10", "10.2.0.2", s.sport, s.dport, s.seq, s.ack, s.flags,
                            s.window, s.options, s.ttl)
            return Send("203.0.113.10", "10.1.0.2", s.sport, s.dport, s.seq, s.ack, s.flags,
                        s.window, s.options, s.ttl)
        return s

    # the hairpinned path is faster one way, the LAN the other: each side sees
    # a different pair first
    def delay(s):
        return 0.002 if (s.src == "10.1.0.2" and s.dst == "10.2.0.2") or \
            (s.src == "10.2.0.2" and s.dst == "203.0.113.10") else 0.006

    ha, hb, net = linked(a_pairs, b_pairs, rewrite=rewrite, delay=delay)
    ha.addrs |= {"203.0.113.10"}
    net.run(0.1)
    assert ha.machine.state is MachineState.COMPLETE and hb.machine.state is \
        MachineState.COMPLETE
    won_a = ha.machine.outcome.pair
    won_b = hb.machine.outcome.pair
    assert won_a.kind == won_b.kind
    # b, with two flows, waited for a's ack: never early
    assert not hb.machine.outcome.early
    # a never acked b's ISN on the other flow
    other = [s for _, s in ha.log if s.ack == B_ISN + 1 and
             (s.dst, s.dport) != won_a.remote]
    assert other == []


def test_a_nominated_flow_that_does_not_complete_is_dropped_and_the_others_answer_again():
    m = machine(limits=Limits(nominate_within=0.5), deadline=5.0)
    m.add(pair(remote=(B[0], 50000)))                 # not early: completes on ESTABLISHED
    m.add(pair(remote=(B[0], 50001)))
    m.advance(0.0)
    out = m.receive(seg((B[0], 50000), A, Flags.SYN, B_ISN), 0.01)
    assert [(s.dport, Flags(s.flags)) for s in out] == [(50000, Flags.SYN | Flags.ACK)]
    # while 50000 is nominated, the peer's SYN on 50001 is only watched
    assert m.receive(seg((B[0], 50001), A, Flags.SYN, B_ISN), 0.02) == []
    t = 0.02
    while t < 0.6:
        t = m.next_timer
        m.advance(t)
    assert m.winner is None
    out = m.receive(seg((B[0], 50001), A, Flags.SYN, B_ISN), 0.7)
    assert [(s.dport, Flags(s.flags)) for s in out] == [(50001, Flags.SYN | Flags.ACK)]


# -- the nat method and spoof's mirror ---------------------------------------------------------------
def test_the_nat_responder_sends_an_unsolicited_syn_ack_and_completes_on_the_ack():
    offer = TCPOptions(mss=1400, wscale=6, sack_permitted=True, timestamp=(0, 0))
    m = machine(iss=B_ISN, peer=A_ISN, nominator=False, peer_offer=offer)
    m.add(pair(B, A, mode=Mode.ANSWER))
    [synack] = expand(m.advance(0.0))
    assert (Flags(synack.flags), synack.seq, synack.ack) == (Flags.SYN | Flags.ACK, B_ISN,
                                                           A_ISN + 1)
    m.receive(seg(A, B, Flags.ACK, A_ISN + 1, B_ISN + 1), 0.02)
    assert m.state is MachineState.COMPLETE
    h = m.handoff(0.02)
    assert h.mss == 1400 and h.snd_wscale == 6


def test_spoof_mirrors_every_syn_ack_the_short_way():
    m = machine(nominator=False)
    m.add(pair(opener_ttl=2, opener_to=("203.0.113.1", B[1]), mirror_to=("203.0.113.1", B[1])))
    opener = expand(m.advance(0.0))
    assert [(s.dst, s.ttl) for s in opener] == [("203.0.113.1", 2)]
    out = m.receive(seg(B, A, Flags.SYN, B_ISN), 0.01)
    assert [(s.dst, s.ttl, Flags(s.flags)) for s in out] == [
        (B[0], 64, Flags.SYN | Flags.ACK), ("203.0.113.1", 2, Flags.SYN | Flags.ACK)]


# -- spray ------------------------------------------------------------------------------------
def test_the_probing_spray_takes_answers_only_from_ports_it_probed():
    rng = random.Random(7)
    m = machine(nominator=False, random=rng.randint)
    m.add_spray(SprayPlan(A[0], B[0], local_port=A[1], probe_ports=512, round=0.25))
    [batch] = m.advance(0.0)
    assert isinstance(batch, SendBatch) and len(batch) == 512 and len(set(batch.dports)) == 512
    probed = batch.dports[17]
    unprobed = next(p for p in range(1024, 65536) if p not in batch.dports)
    assert m.receive(seg((B[0], unprobed), A, Flags.SYN, B_ISN), 0.01) == []
    out = m.receive(seg((B[0], probed), A, Flags.SYN, B_ISN), 0.01)
    assert [(s.dport, Flags(s.flags)) for s in out] == [(probed, Flags.SYN | Flags.ACK)]
    out = m.advance(0.25)
    [again] = [b for b in out if isinstance(b, SendBatch)]
    assert not set(again.dports) & set(batch.dports)          # fresh ports every round
    # the hit's flow resent its SYN-ACK meanwhile (0.2 s after it)
    assert [(s.dport, Flags(s.flags)) for s in out if isinstance(s, Send)] == \
        [(probed, Flags.SYN | Flags.ACK)]


def test_the_sourcing_spray_leads_with_its_first_hit_only():
    sources = tuple(range(33000, 33512))
    m = machine(nominator=True)
    m.add_spray(SprayPlan(A[0], B[0], remote_port=B[1], sources=sources, round=0.5))
    [batch] = m.advance(0.0)
    assert batch.sports == sources and batch.dport == B[1]
    first = m.receive(seg(B, (A[0], 33100), Flags.SYN, B_ISN), 0.01)
    later = m.receive(seg(B, (A[0], 33200), Flags.SYN, B_ISN), 0.01)
    assert [s.sport for s in first] == [33100] and later == []


def test_a_spray_stops_at_its_budget():
    m = machine(nominator=False, random=random.Random(1).randint, deadline=60.0,
                limits=Limits(spray=1200))
    m.add_spray(SprayPlan(A[0], B[0], local_port=A[1], probe_ports=512, round=0.25))
    sizes = []
    t = 0.0
    while m.state is MachineState.RUNNING and t < 5:
        t = m.next_timer
        sizes += [len(b) for b in m.advance(t)]
    assert sizes == [512, 512, 176] and m.spray_sent == 1200


# -- the hand-off's bytes ----------------------------------------------------------------------
def test_data_on_the_completing_segment_and_behind_it_reaches_the_hand_off():
    m = machine()
    m.add(pair())
    m.advance(0.0)
    m.receive(seg(B, A, Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1), 0.01)
    assert m.state is MachineState.COMPLETE
    m.receive(seg(B, A, Flags.ACK | Flags.PSH, B_ISN + 1 + 5, A_ISN + 1, b"world"), 0.011)
    late = m.late_data([seg(B, A, Flags.ACK | Flags.PSH, B_ISN + 1, A_ISN + 1, b"hello")])
    assert late == b"helloworld"


def test_late_bytes_and_confirmation_come_from_the_winner_only():
    # the peer's segments on another pair (same ISNs: the hairpinned one
    # while the LAN pair won) are drained from the same socket
    m = machine(peer_addrs=[B[0]])
    m.add(pair(early=True))
    m.advance(0.0)
    m.receive(seg(B, A, Flags.SYN, B_ISN), 0.01)                  # completes on the peer's SYN
    assert m.state is MachineState.COMPLETE
    other = ("203.0.113.20", B[1])
    late = m.late_data([seg(other, A, Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1),
                        seg(other, A, Flags.ACK | Flags.PSH, B_ISN + 1, A_ISN + 1, b"alien")])
    assert late == b""
    m.handed_off(0.02)
    assert m.state is MachineState.CONFIRMING        # the other pair's SYN-ACK confirmed nothing


def test_late_bytes_keep_to_their_limit_and_skip_syns():
    s1 = seg(B, A, Flags.ACK, 100, 1, b"abcdef")
    syn = seg(B, A, Flags.SYN, 106, 0, b"zz")
    assert late_bytes([syn, s1], 100, limit=4) == b"abcd"
    assert late_bytes([syn], 106) == b""


def test_the_deadline_fails_the_attempt_and_stop_ends_it():
    m = machine(deadline=1.0)
    m.add(pair())
    while m.state is MachineState.RUNNING:
        m.advance(m.next_timer)
    assert m.failure.value == "timeout" and m.pairs[0].outcome == "no answer"
    m2 = machine()
    m2.add(pair())
    m2.stop(0.1, "the peer left")
    assert m2.failure.value == "stopped" and m2.reason == "the peer left"
    assert m2.advance(0.2) == [] and m2.next_timer is None


# -- the budget holds whatever comes ---------------------------------------------------------------
inputs = st.lists(st.tuples(
    st.floats(0, 0.3),                                    # time step
    st.sampled_from(["nothing", "rst", "syn", "synack", "stale", "ack", "stranger"]),
    st.integers(0, 3)), max_size=120)                      # which pair


@settings(max_examples=200, deadline=None)
@given(inputs, st.integers(1, 4), st.booleans())
def test_no_input_makes_the_machine_exceed_its_caps(steps, npairs, nominator):
    lim = Limits(per_pair=6, total=15, replies_per_pair=3, replies=8, resend=0.05)
    m = machine(nominator=nominator, limits=lim, deadline=30.0, peer_addrs=[B[0]])
    remotes = [(B[0], 50000 + i) for i in range(npairs)]
    for r in remotes:
        m.add(pair(remote=r, opener_ttl=2, opener_lead=0.01, start=0.01, early=True))
    t = 0.0
    sent = list(expand(m.advance(0.0)))
    for dt, what, i in steps:
        t += dt
        while m.next_timer is not None and m.next_timer <= t:
            sent += expand(m.advance(m.next_timer))
        r = remotes[i % npairs]
        s = {"rst": (Flags.RST | Flags.ACK, 0, A_ISN + 1), "syn": (Flags.SYN, B_ISN, 0),
             "synack": (Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1), "stale": (Flags.SYN, 5, 0),
             "ack": (Flags.ACK, B_ISN + 1, A_ISN + 1)}.get(what)
        if what == "stranger":
            sent += expand(m.receive(seg(("192.0.2.7", 9), A, Flags.SYN, B_ISN), t))
        elif s is not None:
            sent += expand(m.receive(seg(r, A, s[0], s[1], s[2]), t))
    assert m.sent - m.replies <= lim.total and m.replies <= lim.replies
    for p in m.pairs:
        assert p.sent - p.replies <= lim.per_pair and p.replies <= lim.replies_per_pair
    # every segment that left is accounted for (mirrors none here)
    assert len(sent) == m.sent


def test_a_tracer_sees_every_event_as_it_happens_and_cannot_break_the_punch():
    seen = []

    def tracer(event):
        seen.append(event)
        raise RuntimeError("a tracer's own fault")

    m = machine(tracer=tracer)
    m.add(pair(early=True))
    m.advance(0.0)
    m.receive(seg(B, A, Flags.SYN, B_ISN), 0.01)
    assert m.state is MachineState.COMPLETE
    assert seen == m.events and type(seen[-1]).__name__ == "Completed"


def test_a_failed_hand_off_and_a_driver_fault_end_the_attempt_and_say_so():
    from fastpunch.proto.punch import Failure
    from fastpunch.punch.driver import _IO

    m = machine()
    m.add(pair())
    m.advance(0.0)
    m.receive(seg(B, A, Flags.SYN | Flags.ACK, B_ISN, A_ISN + 1), 0.01)
    assert m.state is MachineState.COMPLETE
    m.handoff_failed(0.02, "hand-off failed: no TCP_REPAIR")
    assert (m.state, m.failure, m.outcome) == (MachineState.FAILED, Failure.HANDOFF, None)
    assert m.pairs[0].outcome == "completed, hand-off failed"
    # a turn of the loop that raises settles the attempt through the fault hook
    m = machine()
    m.add(pair())
    faults = []
    io = _IO(m, None, None, lambda: None, faults.append)
    io._guarded(lambda: 1 / 0)
    assert m.state is MachineState.FAILED and m.failure is Failure.FAULT
    assert "ZeroDivisionError" in m.reason and isinstance(faults[0], ZeroDivisionError)
