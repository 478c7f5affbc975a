"""The stream multiplexer (proto/mux.py), sans-IO: two machines linked in memory."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from fastpunch.proto import mux as m
from fastpunch.proto.mux import (
    HEADER, INITIAL_WINDOW, MAX_DATA, NEED_DATA, FrameType, Mux, MuxUsageError, MuxViolation,
    StreamAccepted, StreamData, StreamEnded, StreamOpened, StreamReset, WindowOpened,
)


def events(mx: Mux) -> list:
    out = []
    while True:
        ev = mx.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def pump(a: Mux, b: Mux) -> None:
    """Carry every owed byte both ways until neither owes any."""
    while True:
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            return
        if x:
            b.receive_data(x)
        if y:
            a.receive_data(y)


def pair(**kw):
    return Mux("initiator", **kw), Mux("responder", **kw)


def frame(kind, sid, body=b""):
    return HEADER.pack(kind, sid, len(body)) + body


def test_open_accept_data_both_ways_and_close():
    a, b = pair()
    sid = a.open("camera-rtsp")
    assert sid == 1
    a.send(sid, b"DESCRIBE rtsp://x RTSP/1.0\r\n\r\n")    # pipelined behind the OPEN
    pump(a, b)
    evs = events(b)
    assert evs[0] == StreamOpened(1, "camera-rtsp")
    assert evs[1] == StreamData(1, b"DESCRIBE rtsp://x RTSP/1.0\r\n\r\n")
    b.accept(1)
    b.send(1, b"RTSP/1.0 200 OK\r\n\r\n")
    b.close(1)
    pump(a, b)
    assert events(a) == [StreamAccepted(1), StreamData(1, b"RTSP/1.0 200 OK\r\n\r\n"),
                         StreamEnded(1)]
    assert a.is_live(1) and b.is_live(1)          # each still owes its FIN / waits for one
    a.close(1)
    pump(a, b)
    assert events(b) == [StreamEnded(1)]
    assert a.streams == 0 and b.streams == 0


def test_ids_have_the_openers_parity():
    a, b = pair()
    assert [a.open("x"), a.open("x")] == [1, 3]
    assert [b.open("y"), b.open("y")] == [2, 4]
    pump(a, b)
    assert [e.stream for e in events(b)] == [1, 3]
    assert [e.stream for e in events(a)] == [2, 4]


def test_window_bounds_the_sender_and_consumed_reopens_it():
    a, b = pair()
    sid = a.open("bulk")
    blob = bytes(range(256)) * 4096                    # 1 MiB
    assert a.send(sid, blob) == INITIAL_WINDOW
    assert a.send_window(sid) == 0
    assert a.send(sid, blob) == 0
    pump(a, b)
    got = b"".join(e.data for e in events(b) if isinstance(e, StreamData))
    assert got == blob[:INITIAL_WINDOW]
    b.accept(sid)
    b.consumed(sid, INITIAL_WINDOW // 2 - 1)           # below half: no credit yet
    pump(a, b)
    assert [e for e in events(a) if isinstance(e, WindowOpened)] == []
    b.consumed(sid, 1)
    pump(a, b)
    assert WindowOpened(sid, INITIAL_WINDOW // 2) in events(a)
    assert a.send(sid, blob[INITIAL_WINDOW:]) == INITIAL_WINDOW // 2


def test_a_stalled_stream_does_not_stall_another():
    a, b = pair()
    slow, fast = a.open("slow"), a.open("fast")
    a.send(slow, b"s" * INITIAL_WINDOW)                # slow's window spent, never consumed
    pump(a, b)
    events(b)
    total = 0
    for _ in range(16):                                # 16 windows' worth over fast
        n = a.send(fast, b"f" * INITIAL_WINDOW)
        assert n == INITIAL_WINDOW
        pump(a, b)
        for ev in events(b):
            if isinstance(ev, StreamData) and ev.stream == fast:
                total += len(ev.data)
                b.consumed(fast, len(ev.data))
        pump(a, b)
        events(a)
    assert total == 16 * INITIAL_WINDOW
    assert a.send_window(slow) == 0


def test_data_frames_are_at_most_max_data():
    a, b = pair()
    sid = a.open("x")
    a.send(sid, b"z" * (3 * MAX_DATA + 5))
    pump(a, b)
    sizes = [len(e.data) for e in events(b) if isinstance(e, StreamData)]
    assert sizes == [MAX_DATA, MAX_DATA, MAX_DATA, 5]


def test_refuse_tells_the_opener_why():
    a, b = pair()
    sid = a.open("telnet")
    pump(a, b)
    assert events(b) == [StreamOpened(sid, "telnet")]
    b.refuse(sid, "no-such-service")
    pump(a, b)
    assert events(a) == [StreamReset(sid, "no-such-service")]
    assert a.streams == 0 and b.streams == 0
    with pytest.raises(MuxUsageError) as err:
        a.send(sid, b"x")
    assert err.value.code == "unknown-stream"


def test_reset_crossing_data_is_dropped_not_a_violation():
    a, b = pair()
    sid = a.open("x")
    pump(a, b)
    events(b)
    b.accept(sid)
    a.send(sid, b"in flight")                          # a sends...
    b.reset(sid, "bored")                              # ...while b resets
    x, y = a.data_to_send(), b.data_to_send()
    b.receive_data(x)                                  # DATA for a stream b ended: dropped
    a.receive_data(y)
    assert events(b) == []
    assert events(a) == [StreamAccepted(sid), StreamReset(sid, "bored")]


def test_too_many_streams_are_refused_and_the_mux_goes_on():
    a, b = pair(max_streams=3)
    ids = [a.open("x") for _ in range(5)]
    pump(a, b)
    opened = [e.stream for e in events(b) if isinstance(e, StreamOpened)]
    assert opened == ids[:3]
    resets = [e for e in events(a) if isinstance(e, StreamReset)]
    assert resets == [StreamReset(ids[3], "too-many-streams"),
                      StreamReset(ids[4], "too-many-streams")]
    b.reset(ids[0], "done")                            # one ends: room for one more
    pump(a, b)
    events(a)
    late = a.open("x")
    pump(a, b)
    assert events(b) == [StreamOpened(late, "x")]


def test_go_away_stops_new_streams_not_old_ones():
    a, b = pair()
    old = a.open("x")
    pump(a, b)
    events(b)
    b.accept(old)
    b.go_away("restarting")
    pump(a, b)
    evs = events(a)
    assert m.GoneAway("restarting") in evs
    with pytest.raises(MuxUsageError) as err:
        a.open("x")
    assert err.value.code == "going-away"
    a.send(old, b"still")
    pump(a, b)
    assert events(b) == [StreamData(old, b"still")]


def test_ping_is_answered():
    a, b = pair()
    a.ping(0xDEADBEEF)
    pump(a, b)
    assert events(a) == [m.Pong(0xDEADBEEF)]


def test_connection_lost_resets_every_stream_locally():
    a, b = pair()
    s1, s2 = a.open("x"), a.open("y")
    a.connection_lost()
    assert sorted(events(a), key=lambda e: e.stream) == [
        StreamReset(s1, "session-lost", local=True), StreamReset(s2, "session-lost", local=True)]
    with pytest.raises(MuxUsageError) as err:
        a.open("z")
    assert err.value.code == "over"


@pytest.mark.parametrize("label", ["", "has space", "x" * 256, "caf\u00e9", "tab\there"])
def test_bad_labels_are_refused_locally(label):
    a, _ = pair()
    with pytest.raises(MuxUsageError) as err:
        a.open(label)
    assert err.value.code == "bad-argument"


# -- a hostile peer: every violation has its code, ends the mux, and says GOAWAY ---------
HOSTILE = [
    ("unknown-frame", frame(99, 1)),
    ("bad-length", frame(FrameType.DATA, 1, b"")),
    ("bad-length", HEADER.pack(FrameType.DATA, 2, MAX_DATA + 1)),     # refused from the header
    ("bad-length", frame(FrameType.WINDOW, 2, b"\0\0")),
    ("bad-stream-id", frame(FrameType.OPEN, 1, b"x")),                # the responder's parity
    ("bad-stream-id", frame(FrameType.OPEN, 2, b"x") + frame(FrameType.OPEN, 2, b"x")),
    ("bad-stream-id", frame(FrameType.PING, 2, b"\0" * 8)),
    ("bad-stream-id", frame(FrameType.DATA, 0, b"x")),
    ("unknown-stream", frame(FrameType.DATA, 8, b"x")),
    ("unknown-stream", frame(FrameType.WINDOW, 3, b"\0\0\0\1")),     # our id, never opened
    ("bad-label", frame(FrameType.OPEN, 2, b"two words")),
    ("data-after-fin", frame(FrameType.OPEN, 2, b"x") + frame(FrameType.FIN, 2)
     + frame(FrameType.DATA, 2, b"late")),
    ("data-after-fin", frame(FrameType.OPEN, 2, b"x") + frame(FrameType.FIN, 2)
     + frame(FrameType.FIN, 2)),
    ("window-exceeded", frame(FrameType.OPEN, 2, b"x")
     + b"".join(frame(FrameType.DATA, 2, b"w" * MAX_DATA) for _ in range(
         INITIAL_WINDOW // MAX_DATA + 1))),
    ("window-overflow", frame(FrameType.OPEN, 2, b"x")
     + frame(FrameType.WINDOW, 2, b"\xff\xff\xff\xff")),
    ("unexpected-frame", frame(FrameType.OPEN, 2, b"x") + frame(FrameType.ACCEPT, 2)),
    ("bad-reason", frame(FrameType.OPEN, 2, b"x") + frame(FrameType.RESET, 2, b"\x00\x01")),
    ("bad-reason", frame(FrameType.GOAWAY, 0, b"\xff")),
]


@pytest.mark.parametrize("code,wire", HOSTILE, ids=[f"{c}-{i}" for i, (c, _) in
                                                     enumerate(HOSTILE)])
def test_hostile_frames_end_the_mux_with_a_code(code, wire):
    a = Mux("initiator")
    mine = a.open("mine")
    a.data_to_send()
    with pytest.raises(MuxViolation) as err:
        a.receive_data(wire)
    assert err.value.code == code
    owed = a.data_to_send()
    kind, sid, length = HEADER.unpack_from(owed)
    assert (kind, sid, owed[HEADER.size:]) == (FrameType.GOAWAY, 0, code.encode())
    evs = []
    with pytest.raises(MuxViolation):
        while True:
            evs.append(a.next_event())
    assert StreamReset(mine, code, local=True) in evs
    with pytest.raises(MuxViolation):
        a.receive_data(b"more")
    with pytest.raises(MuxUsageError):
        a.open("again")


def test_an_accept_of_a_peer_opened_stream_from_the_peer_is_a_violation():
    a, b = pair()
    sid = b.open("x")
    pump(a, b)
    a.accept(sid)
    with pytest.raises(MuxViolation) as err:
        a.receive_data(frame(FrameType.ACCEPT, sid))
    assert err.value.code == "unexpected-frame"


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 40), min_size=1,
                                                      max_size=30))
def test_random_interleavings_deliver_every_stream_exactly(seed, cuts):
    """Several streams both ways, sends and reads interleaved at random,
    the transport's bytes cut anywhere: every stream's bytes arrive whole,
    in order, and the windows are never broken."""
    rnd = random.Random(seed)
    a, b = pair()
    sides = {"a": a, "b": b}
    peer = {"a": b, "b": a}
    want = {}                                            # (sender, stream) -> bytes
    got = {}
    left = {}                                            # (sender, stream) -> bytes to send
    for name, mx in sides.items():
        for _ in range(rnd.randint(1, 4)):
            sid = mx.open("s")
            blob = rnd.randbytes(rnd.randint(0, 3 * INITIAL_WINDOW))
            want[(name, sid)] = blob
            left[(name, sid)] = blob
            got[(name, sid)] = bytearray()
    wires = {"a": bytearray(), "b": bytearray()}        # bytes in flight from each side
    cut = itertools.cycle(cuts)
    for _ in range(20000):
        if not any(left.values()) and not any(wires.values()) and all(
                len(got[k]) == len(want[k]) for k in want):
            break
        name = rnd.choice("ab")
        mx, other = sides[name], peer[name]
        for (sender, sid), rest in list(left.items()):
            if sender == name and rest and rnd.random() < 0.5:
                n = mx.send(sid, rest)
                left[(sender, sid)] = rest[n:]
        wires[name] += mx.data_to_send()
        if wires[name]:
            k = min(len(wires[name]), next(cut) * rnd.randint(1, 16000))
            chunk = bytes(wires[name][:k])
            del wires[name][:k]
            other.receive_data(chunk)
            oname = "b" if name == "a" else "a"
            for ev in events(other):
                if isinstance(ev, StreamOpened):
                    other.accept(ev.stream)
                elif isinstance(ev, StreamData):
                    got[(name, ev.stream)] += ev.data
                    other.consumed(ev.stream, len(ev.data))
            wires[oname] += other.data_to_send()
        for ev in events(mx):
            if isinstance(ev, StreamData):
                sender = "b" if name == "a" else "a"
                got[(sender, ev.stream)] += ev.data
                mx.consumed(ev.stream, len(ev.data))
    for key in want:
        assert bytes(got[key]) == want[key], key


def test_a_reader_that_keeps_up_gets_a_larger_window_a_stalled_one_does_not():
    """Window tuning: half a window consumed within 4 RTTs of the last
    credit doubles it (up to max_window); a reader that does not read never
    grows its window, so what it can make us buffer stays bounded."""
    a, b = pair(max_window=1 << 20)
    b.rtt = 0.040
    fast, slow = a.open("fast"), a.open("slow")
    pump(a, b)
    events(b)
    now = 100.0
    for _ in range(40):
        a.send(fast, b"f" * a.send_window(fast))
        a.send(slow, b"s" * a.send_window(slow))
        pump(a, b)
        for ev in events(b):
            if isinstance(ev, StreamData) and ev.stream == fast:
                b.consumed(fast, len(ev.data), now)
        pump(a, b)
        events(a)
        now += 0.010                                   # well within 4 RTTs each time
    assert b.window(fast) == 1 << 20                   # grew, to max_window and no further
    assert b.window(slow) == INITIAL_WINDOW
    assert a.send_window(slow) == 0


def test_without_an_rtt_or_a_clock_windows_stay_as_they_are():
    a, b = pair()
    sid = a.open("x")
    for now in (None, 1.0):
        for _ in range(8):
            a.send(sid, b"z" * a.send_window(sid))
            pump(a, b)
            for ev in events(b):
                if isinstance(ev, StreamData):
                    b.consumed(sid, len(ev.data), now)
            pump(a, b)
            events(a)
        assert b.window(sid) == INITIAL_WINDOW
    b.rtt = 0.001
    a.send(sid, b"z" * a.send_window(sid))
    pump(a, b)
    t = 5.0
    for ev in events(b):
        if isinstance(ev, StreamData):
            t += 1.0                                   # a slow reader: 1 s per chunk
            b.consumed(sid, len(ev.data), t)
    assert b.window(sid) == INITIAL_WINDOW


def test_bad_mux_arguments():
    for kw in ({"max_streams": 0}, {"max_window": 1024}, {"max_window": 1 << 33}):
        with pytest.raises(MuxUsageError):
            Mux("initiator", **kw)
    with pytest.raises(MuxUsageError):
        Mux("observer")
