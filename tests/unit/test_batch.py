"""SegmentBatch: many segments from one template in one C call."""

from __future__ import annotations

import array
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch.errors import PacketBuildError
from fastpunch.packet import (Flags, ParsedBatch, RawReceiver, SegmentBatch, TCPOptions, build,
                              checksum_many, ip_to_int, parse)

OPTS = TCPOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(9, 0))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.data())
def test_every_variation_lands_in_its_segment(n, data):
    u16 = st.integers(0, 0xFFFF)
    sports = array.array("H", data.draw(st.lists(u16, min_size=n, max_size=n)))
    dports = array.array("H", data.draw(st.lists(u16, min_size=n, max_size=n)))
    seqs = array.array("I", data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
    ttls = array.array("B", data.draw(st.lists(st.integers(1, 255), min_size=n, max_size=n)))
    saddrs = array.array("I", [ip_to_int("192.0.2.0") + i for i in range(n)])
    daddrs = array.array("I", [ip_to_int("203.0.113.0") + i for i in range(n)])
    batch = SegmentBatch(64, stride=128)
    assert batch.fill(n, "0.0.0.0", "0.0.0.0", 0, 0, ip_id=65530, options=OPTS,
                      sports=sports, dports=dports, seqs=seqs, ttls=ttls, saddrs=saddrs,
                      daddrs=daddrs) == n
    assert len(batch) == n
    for i in range(n):
        seg = parse(batch[i])            # both checksums verified
        assert (seg.sport, seg.dport, seg.seq, seg.ttl) == (sports[i], dports[i], seqs[i], ttls[i])
        assert (seg.src_int, seg.dst_int) == (saddrs[i], daddrs[i])
        assert seg.ip_id == (65530 + i) & 0xFFFF
        assert seg.options == OPTS
        # byte-identical to building the same segment one at a time
        assert batch[i] == build(saddrs[i], daddrs[i], sports[i], dports[i], seq=seqs[i],
                                 ttl=ttls[i], ip_id=(65530 + i) & 0xFFFF, options=OPTS)


def test_stream_mode_chops_a_payload_and_advances_seq():
    payload = bytes(range(256)) * 23            # 5888 bytes = 4 x 1472
    batch = SegmentBatch(8, stride=1600)
    batch.fill(4, "192.0.2.1", "198.51.100.2", 40000, 443, seq=2**32 - 100,
               flags=Flags.ACK | Flags.PSH, payloads=payload, payload_len=1472)
    segs = [parse(batch[i]) for i in range(4)]
    assert b"".join(s.payload for s in segs) == payload
    assert [s.seq for s in segs] == [(2**32 - 100 + 1472 * i) % 2**32 for i in range(4)]
    assert batch.lengths == [20 + 20 + 1472] * 4


def test_refill_with_fewer_segments_shrinks_the_batch():
    batch = SegmentBatch(10, stride=100)
    batch.fill(10, "192.0.2.1", "192.0.2.2", 1, 2)
    batch.fill(3, "192.0.2.1", "192.0.2.2", 1, 2)
    assert len(batch) == 3
    with pytest.raises(IndexError):
        batch[3]
    assert parse(batch[-1]).seq == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(sports=array.array("H", [1, 2])), "sports has 2 entries"),
    (dict(seqs=array.array("I", [1])), "seqs has 1 entries"),
    (dict(payloads=b"x" * 10, payload_len=4), "payloads must hold"),
])
def test_short_arrays_are_refused(kwargs, message):
    batch = SegmentBatch(4, stride=200)
    with pytest.raises(ValueError, match=message):
        batch.fill(4, "192.0.2.1", "192.0.2.2", 1, 2, **kwargs)


def test_wrong_array_type_is_refused():
    batch = SegmentBatch(2, stride=200)
    with pytest.raises((ValueError, TypeError)):
        batch.fill(2, "192.0.2.1", "192.0.2.2", 1, 2, sports=array.array("I", [1, 2]))


def test_count_beyond_capacity_is_refused():
    with pytest.raises(ValueError):
        SegmentBatch(2, stride=200).fill(3, "192.0.2.1", "192.0.2.2", 1, 2)


def test_stride_too_small_for_the_datagram_is_refused():
    batch = SegmentBatch(2, stride=48)
    with pytest.raises(PacketBuildError) as err:
        batch.fill(2, "192.0.2.1", "192.0.2.2", 1, 2, options=OPTS)   # 20 + 20 + 20 bytes
    assert err.value.reason == "no-space"
    assert len(batch) == 0


@pytest.mark.parametrize("capacity, stride", [(0, 100), (1, 10), (1, 70000)])
def test_bad_geometry_is_refused(capacity, stride):
    with pytest.raises((ValueError, OverflowError)):
        SegmentBatch(capacity, stride)


# -- batched parse ---------------------------------------------------------------------

from fastpunch.packet import ParsedBatch  # noqa: E402
from fastpunch.errors import MalformedPacket  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=120) | st.just(b""), max_size=40), st.data())
def test_batched_parse_agrees_with_one_at_a_time(junk, data):
    stride = 128
    good = SegmentBatch(64, stride=stride)
    n = data.draw(st.integers(0, 24))
    good.fill(n, "192.0.2.1", "198.51.100.2", 5, 6, seqs=array.array("I", range(n)),
              options=TCPOptions(mss=1300, timestamp=(77, 0)), payloads=bytes(range(200)) * n,
              payload_len=data.draw(st.integers(0, 40)))
    datagrams = [good[i] for i in range(n)] + [j[:stride] for j in junk]
    datagrams = data.draw(st.permutations(datagrams))
    buf = b"".join(d.ljust(stride, b"\0") for d in datagrams)
    lens = array.array("I", map(len, datagrams))
    pb = ParsedBatch(64, stride=256)
    assert pb.parse_from(buf, stride, lens) == pb.good
    assert len(pb) == len(datagrams)
    cols = {name: pb.column(name) for name in ("status", "seq", "sport", "mss", "ts_val",
                                               "payload_length", "flags", "src")}
    for i, d in enumerate(datagrams):
        try:
            seg = parse(d)
        except MalformedPacket as exc:
            assert cols["status"][i] != 0 and pb.reason(i) == exc.reason
            continue
        assert cols["status"][i] == 0 and pb.reason(i) is None
        assert (cols["seq"][i], cols["sport"][i], cols["flags"][i], cols["src"][i]) == (
            seg.seq, seg.sport, seg.flags, seg.src_int)
        assert cols["mss"][i] == (seg.options.mss or 0)
        assert cols["ts_val"][i] == (seg.options.timestamp or (0,))[0]
        assert cols["payload_length"][i] == seg.payload_length
        assert pb[i].payload == seg.payload
    assert pb.good == sum(1 for s in cols["status"] if s == 0)


def test_parsed_batch_refuses_more_than_its_capacity():
    pb = ParsedBatch(2, stride=128)
    with pytest.raises(ValueError):
        pb.parse_from(b"\0" * 384, 128, array.array("I", [20, 20, 20]))
    with pytest.raises(ValueError):
        pb.parse_from(b"\0" * 10, 128, array.array("I", [20]))


# Sizes that wrap: on a 32-bit build (armv7) capacity * stride wraps long
# before memory runs out, and a wrapped size allocated a small buffer that
# later receives overran (303 MB allocated for capacity=70000, stride=65535).
# sys.maxsize // 100 * 65535 wraps on every build, 64-bit included.
@pytest.mark.parametrize("make", [
    lambda: SegmentBatch(sys.maxsize // 100, 65535),
    lambda: ParsedBatch(sys.maxsize // 100, 65535),
    lambda: RawReceiver(capacity=sys.maxsize // 100, stride=65535),
], ids=["SegmentBatch", "ParsedBatch", "RawReceiver"])
def test_a_buffer_size_that_would_wrap_is_refused_before_any_allocation(make):
    with pytest.raises(OverflowError, match="does not fit in memory"):
        make()


def test_a_span_that_would_wrap_is_refused():
    out = array.array("H", [0, 0])
    with pytest.raises(OverflowError):
        checksum_many(b"\0" * 64, sys.maxsize, 1, out)
    batch = ParsedBatch(2, 128)
    with pytest.raises((OverflowError, ValueError)):
        batch.parse_from(b"\0" * 256, sys.maxsize, array.array("I", [60, 60]))
