"""The raw engine's handshake loops take a receive batch only up to the
segment that completes the handshake: what follows (the peer's first data,
often right behind its ACK) belongs to the kernel socket the flow is handed
to, so the engine must neither ack nor keep it."""

from __future__ import annotations

import time

import pytest
from types import SimpleNamespace

from fastpunch._engine import FlowEvent, FlowState
from fastpunch.rawflow import FlowStats, RawFlow


def bare_flow() -> RawFlow:
    """A RawFlow without sockets: just what _opening looks at."""
    flow = RawFlow.__new__(RawFlow)
    flow.tracker = SimpleNamespace(state=FlowState.SYN_RECEIVED)
    flow.stats = FlowStats()
    flow._t0 = time.monotonic()
    flow._left, flow.peer_confirmed = [], False
    return flow


def segment(seq: int, flags: str, length: int = 0):
    return SimpleNamespace(seq=seq, flags_str=flags, payload_length=length)


def test_segments_after_the_completing_one_are_left_for_the_kernel_socket():
    flow = bare_flow()
    batch = [segment(100, "A"), segment(101, "PA", 17), segment(118, "PA", 5)]
    taken = []
    for seg in flow._opening(batch):
        taken.append(seg.seq)
        flow.tracker.state = FlowState.ESTABLISHED      # the ACK completes the handshake
    assert taken == [100]
    left = [what for _, what in flow.stats.events]
    assert left == ["left [PA] seq=101 len=17 for the kernel socket",
                    "left [PA] seq=118 len=5 for the kernel socket"]


def test_a_batch_before_the_handshake_completes_is_taken_whole():
    flow = bare_flow()
    batch = [segment(7, "S"), segment(8, "A")]
    assert [s.seq for s in flow._opening(batch)] == [7, 8]
    assert flow.stats.events == []


# -- SYNs that are not the peer's announced flow --------------------------------

A, B = "10.1.0.2", "203.0.113.20"


def tracked_flow(peer_isn) -> tuple[RawFlow, list]:
    """A RawFlow without sockets around a real tracker in SYN_SENT; what it
    would send is collected instead."""
    from fastpunch._engine import FlowTracker

    flow = bare_flow()
    flow.tracker = FlowTracker(1000, 64240, 7)
    flow.tracker.syn_sent()
    flow.timestamps, flow.ts_ok, flow.ts_recent, flow.peer_options = False, False, 0, None
    flow._received = bytearray()
    flow.peer_isn = peer_isn
    sent = []
    flow._send = lambda reply, *a, **k: sent.append(reply)
    return flow, sent


def syn_ack(isn: int):
    from fastpunch._engine import build, parse

    return parse(build(B, A, 40025, 55477, seq=isn, ack=1001, flags=0x12))


def test_a_syn_ack_with_another_isn_is_ignored_not_taken():
    # the peer's kernel socket of a previous strategy answered our SYN with
    # its own ISN: the flow must wait for the announced one
    flow, sent = tracked_flow(peer_isn=5000)
    assert flow._input(syn_ack(7777)) == FlowEvent.IGNORED
    assert flow.tracker.state == FlowState.SYN_SENT and sent == []
    assert flow.stats.foreign == 1
    assert "not the announced ISN 5000" in flow.stats.events[-1][1]
    assert flow._input(syn_ack(5000)) == FlowEvent.ESTABLISHED
    assert flow.tracker.irs == 5000 and sent[-1].ack == 5001


def test_without_an_announced_isn_any_syn_ack_is_taken():
    flow, _ = tracked_flow(peer_isn=None)
    assert flow._input(syn_ack(7777)) == FlowEvent.ESTABLISHED
    assert flow.stats.foreign == 0


# -- complete on the peer's SYN (early) -----------------------------------------

def syn(isn: int):
    from fastpunch._engine import TCPOptions, build, parse

    return parse(build(B, A, 40025, 55477, seq=isn, ack=0, flags=0x02,
                       options=TCPOptions(mss=1400, wscale=7, sack_permitted=True)))


def early_flow(peer_isn=5000, early=True):
    flow, sent = tracked_flow(peer_isn)
    flow.early = early
    flow.local, flow.peer = (A, 55477), (B, 40025)
    flow.mss, flow.wscale, flow.sack_permitted, flow.iss = 1460, 7, True, 1000
    return flow, sent


def test_early_the_peers_announced_syn_completes_the_open_with_syn_ack_and_ack():
    flow, sent = early_flow()
    flow._input(syn(5000))
    assert flow.tracker.state == FlowState.SYN_RECEIVED and flow.complete()
    # the SYN-ACK, then at once the ACK that takes our gateway to ESTABLISHED
    assert [(r.flags, r.seq, r.ack) for r in sent] == [(0x12, 1000, 5001), (0x10, 1001, 5001)]
    state = flow.handoff_state()
    assert (state.snd_nxt, state.rcv_nxt, state.mss, state.sack) == (1001, 5001, 1400, True)
    assert (state.snd_wscale, state.rcv_wscale) == (7, 7)


def test_without_early_the_peers_syn_is_only_answered():
    from fastpunch.rawflow import HandshakeFailed

    flow, sent = early_flow(early=False)
    flow._input(syn(5000))
    assert flow.tracker.state == FlowState.SYN_RECEIVED and not flow.complete()
    assert [r.flags for r in sent] == [0x12]
    with pytest.raises(HandshakeFailed, match="SYN_RECEIVED"):
        flow.handoff_state()


def test_early_needs_the_announced_isn():
    flow, sent = early_flow(peer_isn=None)
    flow._input(syn(5000))
    assert not flow.complete() and [r.flags for r in sent] == [0x12]


def scripted_wait(batches):
    """RawFlow._wait over a script: each call waits out its deadline, then
    hands over the next batch (empty when the script is done)."""
    def wait(deadline, poll=False):
        time.sleep(max(0.0, deadline - time.monotonic()))
        return batches.pop(0) if batches else []
    return wait


def test_confirm_resends_our_syn_until_the_peer_acks_it_and_acks_its_syn_ack():
    from fastpunch._engine import build, parse

    flow, sent = early_flow()
    flow._input(syn(5000))
    sent.clear()
    peer_syn_again = syn(5000)            # not a confirmation: it acks nothing
    peer_syn_ack = parse(build(B, A, 40025, 55477, seq=5000, ack=1001, flags=0x12))
    flow._wait = scripted_wait([[peer_syn_again], [peer_syn_ack]])
    assert flow.confirm(timeout=2.0, resend_every=0.01) is True
    assert [(r.flags, r.seq) for r in sent] == [(0x02, 1000), (0x10, 1001)]
    assert sent[-1].ack == 5001


def test_confirm_takes_any_ack_of_our_syn_and_gives_up_at_the_timeout():
    from fastpunch._engine import build, parse

    flow, sent = early_flow()
    flow._input(syn(5000))
    sent.clear()
    data = parse(build(B, A, 40025, 55477, seq=5001, ack=1001, flags=0x18, payload=b"x"))
    flow._wait = scripted_wait([[data]])
    assert flow.confirm(timeout=2.0, resend_every=1.0) is True
    assert sent == []                     # an ACK of the peer's kernel needs no answer
    flow._wait = scripted_wait([])
    assert flow.confirm(timeout=0.05, resend_every=0.02) is False
    assert "did not confirm" in flow.stats.events[-1][1]


# -- peer data that came during the hand-off -------------------------------------

def data(seq: int, payload: bytes, ack: int = 1001, flags: int = 0x18):
    from fastpunch._engine import build, parse

    return parse(build(B, A, 40025, 55477, seq=seq, ack=ack, flags=flags, payload=payload))


def established_flow():
    """A tracker ESTABLISHED with the peer's stream at 5001 (ISN 5000), ours at 1001."""
    from fastpunch._engine import build, parse

    flow, sent = tracked_flow(peer_isn=5000)
    flow.iss = 1000
    flow._input(parse(build(B, A, 40025, 55477, seq=5000, ack=1001, flags=0x12)))
    assert flow.tracker.state == FlowState.ESTABLISHED and flow.tracker.rcv_nxt == 5001
    return flow


def test_late_data_takes_the_in_order_bytes_kept_and_waiting_whatever_their_order():
    flow = established_flow()
    flow._left = [data(5011, b"KLMNOPQRST")]                 # came behind the completing ACK
    waiting = [[data(5001, b"ABCDEFGHIJ"),                   # then, on the socket: the gap,
                data(4990, b"x" * 11),                       # an old retransmission,
                data(5006, b"FGHIJKLMNO"),                   # an overlapping resend,
                data(5031, b"after a hole"),                 # bytes past a hole (resent later),
                data(5021, b"", flags=0x10)]]                # a bare ACK
    flow._wait = lambda deadline, poll=False: waiting.pop(0) if waiting else []
    assert flow.late_data() == b"ABCDEFGHIJKLMNOPQRST"
    assert flow._left == [] and waiting == []
    assert flow.peer_confirmed                               # they ack our SYN (1001)
    assert flow.stats.events[-1][1] == "took 20 bytes that came during the hand-off"


def test_late_data_without_data_is_empty_and_a_syn_confirms_nothing():
    flow = established_flow()
    flow._left = [syn(5000)]
    flow._wait = lambda deadline, poll=False: []
    assert flow.late_data() == b"" and not flow.peer_confirmed


def test_late_data_keeps_to_its_limit():
    flow = established_flow()
    flow._left = [data(5001, b"a" * 1000), data(6001, b"b" * 1000)]
    flow._wait = lambda deadline, poll=False: []
    assert flow.late_data(limit=1500) == b"a" * 1000 + b"b" * 500
