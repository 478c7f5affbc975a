"""The raw engine's handshake loops take a receive batch only up to the
segment that completes the handshake: what follows (the peer's first data,
often right behind its ACK) belongs to the kernel socket the flow is handed
to, so the engine must neither ack nor keep it."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fastpunch._engine import FlowState
from fastpunch.rawflow import FlowStats, RawFlow


def bare_flow() -> RawFlow:
    """A RawFlow without sockets: just what _opening looks at."""
    flow = RawFlow.__new__(RawFlow)
    flow.tracker = SimpleNamespace(state=FlowState.SYN_RECEIVED)
    flow.stats = FlowStats()
    flow._t0 = time.monotonic()
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
