"""IPv6: build, parse, checksums and batches cross-checked against scapy's
IPv6/TCP (an independent implementation) over random headers, options and
payloads; extension headers walked or refused, each refusal by its reason."""

from __future__ import annotations

import array
import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    in6_chksum,
)

from fastpunch.packet import (
    MalformedPacket,
    PacketBuildError,
    ParsedBatch,
    SegmentBatch,
    TCPOptions,
    build,
    parse,
    tcp_checksum,
)
from tests.unit.test_scapy_oracle import option_sets

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
addr6 = st.integers(0, 2**128 - 1).map(lambda a: str(ipaddress.IPv6Address(a)))


@st.composite
def segments6(draw):
    return dict(
        src=draw(addr6), dst=draw(addr6), sport=draw(u16), dport=draw(u16), seq=draw(u32),
        ack=draw(u32), flags=draw(st.integers(0, 0xFFF)), window=draw(u16),
        urgent=draw(u16), ttl=draw(st.integers(0, 255)), tos=draw(st.integers(0, 255)),
        flow_label=draw(st.integers(0, 0xFFFFF)), options=draw(option_sets()),
        payload=draw(st.binary(max_size=1500)),
    )


def scapy6(f) -> IPv6:
    _ours, scapy_opts = f["options"]
    flags = f["flags"]
    return IPv6(src=f["src"], dst=f["dst"], hlim=f["ttl"], tc=f["tos"], fl=f["flow_label"]) / \
        TCP(sport=f["sport"], dport=f["dport"], seq=f["seq"], ack=f["ack"],
            flags=flags & 0x1FF, reserved=flags >> 9, window=f["window"], urgptr=f["urgent"],
            options=scapy_opts) / f["payload"]


def ours6(f) -> bytes:
    return build(f["src"], f["dst"], f["sport"], f["dport"], seq=f["seq"], ack=f["ack"],
                 flags=f["flags"], window=f["window"], options=f["options"][0],
                 payload=f["payload"], ttl=f["ttl"], tos=f["tos"], urgent=f["urgent"],
                 flow_label=f["flow_label"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments6())
def test_build_is_byte_identical_to_scapy(f):
    assert ours6(f) == bytes(scapy6(f))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments6())
def test_parse_reads_what_scapy_built(f):
    seg = parse(bytes(scapy6(f)))
    assert seg.version == 6 and seg.family == 10
    # (text as the socket module writes it, inet_ntop's: "::0.1.0.0" where
    # ipaddress writes "::1:0"; the same address)
    assert (seg.src, seg.dst) == (socket.inet_ntop(socket.AF_INET6, socket.inet_pton(
        socket.AF_INET6, f["src"])), socket.inet_ntop(socket.AF_INET6, socket.inet_pton(
            socket.AF_INET6, f["dst"])))
    assert seg.src_int == int(ipaddress.IPv6Address(f["src"]))
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (f["sport"], f["dport"], f["seq"], f["ack"])
    assert (seg.flags, seg.window, seg.urgent) == (f["flags"], f["window"], f["urgent"])
    assert (seg.hop_limit, seg.traffic_class, seg.flow_label) == (f["ttl"], f["tos"],
                                                                   f["flow_label"])
    assert seg.options == f["options"][0]
    assert seg.payload == f["payload"] and seg.payload_length == len(f["payload"])
    assert seg.total_length == len(bytes(scapy6(f)))
    assert (seg.ip_id, seg.df, seg.ip_flags, seg.ip_checksum) == (None, None, None, None)
    assert seg.next_header == 6 and seg.ext_header_length == 0 and seg.ip_header_length == 40


@settings(max_examples=200, deadline=None)
@given(addr6, addr6, st.binary(min_size=20, max_size=600))
def test_the_pseudo_header_checksum_is_scapys(src, dst, segment):
    zeroed = segment[:16] + b"\x00\x00" + segment[18:]
    want = in6_chksum(6, IPv6(src=src, dst=dst), zeroed)
    assert tcp_checksum(src, dst, zeroed) == want
    assert tcp_checksum(ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst).packed,
                        zeroed) == want


def test_extension_headers_are_walked_to_tcp():
    tcp = TCP(sport=1, dport=2, seq=3, flags="S", options=[("MSS", 1400)]) / b"data"
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
                IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt(),
                IPv6ExtHdrFragment(offset=0, m=0, id=7)):          # atomic (RFC 6946)
        pkt = IPv6(src="2001:db8::1", dst="2001:db8::2") / ext / tcp
        seg = parse(bytes(pkt))
        assert (seg.sport, seg.dport, seg.seq, seg.payload) == (1, 2, 3, b"data")
        assert seg.options.mss == 1400
        assert seg.ext_header_length == len(ext) and seg.ip_header_length == 40 + len(ext)
        assert seg.next_header == pkt.nh and seg.ip_options == bytes(pkt)[40:40 + len(ext)]


def reason_of(data: bytes) -> str:
    with pytest.raises(MalformedPacket) as err:
        parse(data)
    return err.value.reason


def test_every_refusal_has_its_reason():
    good = IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1, dport=2) / b"x"
    raw = bytes(good)
    base = IPv6(src="2001:db8::1", dst="2001:db8::2")
    tcp = TCP(sport=1, dport=2)
    assert reason_of(raw[:39]) == "truncated"
    assert reason_of(raw[:60]) == "ip6-payload-length"          # shorter than it says
    assert reason_of(bytes(base / IPv6ExtHdrFragment(offset=0, m=1) / tcp)) == "ip-fragment"
    assert reason_of(bytes(base / IPv6ExtHdrFragment(offset=8, m=0) / tcp)) == "ip-fragment"
    esp = bytearray(bytes(base / IPv6ExtHdrDestOpt() / tcp))
    esp[6] = 50                                                    # ESP: cannot be read
    assert reason_of(bytes(esp)) == "ip6-extension-header"
    nine = base
    for _ in range(9):
        nine = nine / IPv6ExtHdrDestOpt()
    assert reason_of(bytes(nine / tcp)) == "ip6-extension-header"
    cut = bytearray(bytes(base / IPv6ExtHdrDestOpt(len=40) / tcp))  # says 328 bytes
    assert reason_of(bytes(cut)) in ("ip6-extension-header", "ip6-payload-length")
    cut = bytes(base / IPv6ExtHdrDestOpt() / tcp)
    short = bytearray(cut)
    short[4:6] = (6).to_bytes(2, "big")                            # a payload of 6 bytes
    assert reason_of(bytes(short[:46])) == "ip6-extension-header"
    jumbo = bytearray(bytes(base / IPv6ExtHdrHopByHop() / tcp))
    jumbo[4:6] = b"\x00\x00"
    assert reason_of(bytes(jumbo)) == "ip6-payload-length"
    assert reason_of(bytes(base / UDP(sport=1, dport=2))) == "ip-protocol"
    # a routing header with segments left: the datagram is on its way elsewhere
    transit = base / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=1) / tcp
    assert reason_of(bytes(transit)) == "ip6-extension-header"
    done = base / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0) / tcp
    assert parse(bytes(done), verify=False).dport == 2
    bad = bytearray(raw)
    bad[-1] ^= 0xFF
    assert reason_of(bytes(bad)) == "tcp-checksum"
    assert parse(bytes(bad), verify=False).payload == bytes([ord("x") ^ 0xFF])
    doff = bytearray(raw)
    doff[40 + 12] = 0x40                                           # data offset 4
    assert reason_of(bytes(doff)) == "tcp-data-offset"
    assert reason_of(bytes(base / TCP(sport=1, dport=2))[:50]) in ("ip6-payload-length",)
    seven = bytearray(raw)
    seven[0] = 0x70
    assert reason_of(bytes(seven)) == "ip-version"


def test_build_refuses_what_ipv6_cannot_carry():
    with pytest.raises(ValueError, match="different families"):
        build("2001:db8::1", "198.51.100.1", 1, 2)
    with pytest.raises(ValueError, match="identification"):
        build("2001:db8::1", "2001:db8::2", 1, 2, ip_id=5)
    with pytest.raises(ValueError, match="20 bits"):
        build("2001:db8::1", "2001:db8::2", 1, 2, flow_label=1 << 20)
    with pytest.raises(ValueError, match="header options"):
        build("2001:db8::1", "2001:db8::2", 1, 2, ip_options=b"\x01\x01\x01\x00")
    with pytest.raises(ValueError, match="IPv6's"):
        build("198.51.100.1", "198.51.100.2", 1, 2, flow_label=1)
    with pytest.raises(ValueError, match="not an IPv6 address"):
        build("2001:db8::zz", "2001:db8::2", 1, 2)
    with pytest.raises(ValueError, match="not an IPv6 address"):
        build("2001:db8::1\0junk", "2001:db8::2", 1, 2)      # (C would stop at the NUL)
    with pytest.raises(ValueError, match="not an IPv4 address"):
        build("198.51.100.1\0junk", "198.51.100.2", 1, 2)

    class Short:                                   # duck-typed, packs short
        version, packed = 6, b"\x20\x01"

    with pytest.raises(ValueError, match="16 bytes"):
        build(Short(), "2001:db8::2", 1, 2)
    with pytest.raises(PacketBuildError) as err:
        build("2001:db8::1", "2001:db8::2", 1, 2, payload=bytes(65536))
    assert err.value.reason == "too-big"


@settings(max_examples=50, deadline=None)
@given(segments6(), st.integers(1, 24))
def test_a_batch_is_the_same_segments_build_makes(f, count):
    sports = array.array("H", [(f["sport"] + i) % 65536 for i in range(count)])
    seqs = array.array("I", [(f["seq"] + 7 * i) % 2**32 for i in range(count)])
    hops = array.array("B", [(f["ttl"] + i) % 256 for i in range(count)])
    payload = f["payload"][:200]
    batch = SegmentBatch(count, stride=40 + 60 + 200)
    batch.fill(count, f["src"], f["dst"], 0, f["dport"], ack=f["ack"], flags=f["flags"],
               window=f["window"], options=f["options"][0], payloads=payload * count,
               payload_len=len(payload), tos=f["tos"], sports=sports, seqs=seqs, ttls=hops)
    for i in range(count):
        assert batch[i] == build(f["src"], f["dst"], sports[i], f["dport"], seq=seqs[i],
                                 ack=f["ack"], flags=f["flags"], window=f["window"],
                                 options=f["options"][0], payload=payload, ttl=hops[i],
                                 tos=f["tos"])


def test_a_batch_refuses_ipv4_address_columns():
    with pytest.raises(ValueError, match="one address pair"):
        SegmentBatch(2).fill(2, "2001:db8::1", "2001:db8::2", 1, 2,
                             daddrs=array.array("I", [1, 2]))


def test_a_parsed_batch_reads_both_families_mixed():
    four = build("198.51.100.1", "198.51.100.2", 10, 20, seq=1, options=TCPOptions(mss=1460))
    six = build("2001:db8::1", "2001:db8::2", 30, 40, seq=2, options=TCPOptions(mss=1440),
                payload=b"v6")
    broken = bytearray(six)
    broken[-1] ^= 1
    data = [four, six, bytes(broken), b"\x60" + bytes(10)]
    stride = 128
    buf = bytearray(stride * len(data))
    for i, d in enumerate(data):
        buf[i * stride:i * stride + len(d)] = d
    batch = ParsedBatch(8, stride=stride)
    assert batch.parse_from(bytes(buf), stride, array.array("I", [len(d) for d in data])) == 2
    assert list(batch.column("version")) == [4, 6, 0, 0]
    assert list(batch.column("sport")) == [10, 30, 0, 0]
    assert list(batch.column("mss")) == [1460, 1440, 0, 0]
    assert list(batch.column("payload_length")) == [0, 2, 0, 0]
    assert batch.reason(2) == "tcp-checksum" and batch.reason(3) == "truncated"
    assert batch[1].src == "2001:db8::1" and batch[1].payload == b"v6"
    assert list(batch.column("src"))[1] == 0          # (IPv4 ints: batch[i] has the v6 one)
