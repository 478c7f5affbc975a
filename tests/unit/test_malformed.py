"""Bad input gets a clear error and never a crash: one hand-made packet per
reason, then arbitrary and mutated byte strings."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch.errors import MalformedPacket, PacketBuildError
from fastpunch.packet import FlowTracker, TCPOptions, build, checksum, parse

GOOD = build("192.0.2.1", "198.51.100.2", 40000, 443, seq=1, ack=2, flags=0x18,
             options=TCPOptions(mss=1460, wscale=7), payload=b"data")


def fix_ip_checksum(b: bytearray) -> bytearray:
    ihl = (b[0] & 15) * 4
    b[10:12] = b"\0\0"
    b[10:12] = checksum(bytes(b[:ihl])).to_bytes(2, "big")
    return b


def with_tcp(tcp: bytes, fix_tcp: bool = True) -> bytes:
    """An IPv4 header (checksummed) around an arbitrary TCP part."""
    ip = bytearray(GOOD[:20])
    ip[2:4] = (20 + len(tcp)).to_bytes(2, "big")
    ip = fix_ip_checksum(ip)
    tcp = bytearray(tcp)
    if fix_tcp and len(tcp) >= 18:
        from fastpunch.packet import tcp_checksum

        tcp[16:18] = b"\0\0"
        tcp[16:18] = tcp_checksum("192.0.2.1", "198.51.100.2", bytes(tcp)).to_bytes(2, "big")
    return bytes(ip) + bytes(tcp)


def tcp_with_options(opts: bytes) -> bytes:
    hdr = bytearray(GOOD[20:40])
    pad = opts + b"\0" * (-len(opts) % 4)
    hdr[12] = (20 + len(pad)) // 4 << 4
    return bytes(hdr) + pad


def mutate(offset, value, fix=True):
    b = bytearray(GOOD)
    b[offset] = value
    return bytes(fix_ip_checksum(b)) if fix else bytes(b)


CASES = {
    "truncated": GOOD[:19],
    "ip-version": mutate(0, 0x55),
    "ip-ihl": mutate(0, 0x44),
    "ip-total-length": bytes(fix_ip_checksum(bytearray(GOOD[:2] + (len(GOOD) + 1).to_bytes(2, "big") + GOOD[4:]))),
    "ip-checksum": mutate(8, 7, fix=False),
    "ip-fragment": bytes(fix_ip_checksum(bytearray(GOOD[:6] + b"\x20\x00" + GOOD[8:]))),
    "ip-protocol": mutate(9, 17),
    "tcp-data-offset": with_tcp(bytes(GOOD[20:32]) + b"\x40" + GOOD[33:40]),
    "tcp-checksum": GOOD[:-1] + bytes([GOOD[-1] ^ 1]),
    "tcp-option-truncated": with_tcp(tcp_with_options(b"\x01\x01\x01\x02")),
    "tcp-option-length": with_tcp(tcp_with_options(b"\x02\x05\x05\xb4\x00")),
    "tcp-option-duplicate": with_tcp(tcp_with_options(b"\x02\x04\x05\xb4\x02\x04\x05\xb4")),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_reason_is_named(reason):
    with pytest.raises(MalformedPacket) as err:
        parse(CASES[reason])
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)
    assert reason in str(err.value)


def test_tcp_shorter_than_its_header_is_truncated():
    with pytest.raises(MalformedPacket) as err:
        parse(with_tcp(GOOD[20:35], fix_tcp=False))
    assert err.value.reason == "truncated"


def test_options_overrunning_the_header():
    with pytest.raises(MalformedPacket) as err:
        parse(with_tcp(tcp_with_options(b"\x08\x0a\x00\x00")))   # TS claims 10, 4 left
    assert err.value.reason == "tcp-option-truncated"


def test_zero_length_option_does_not_loop_forever():
    with pytest.raises(MalformedPacket) as err:
        parse(with_tcp(tcp_with_options(b"\x1e\x00\x00\x00")))
    assert err.value.reason == "tcp-option-truncated"


def test_unknown_options_are_counted_and_skipped():
    seg = parse(with_tcp(tcp_with_options(b"\x1e\x03\x01\x02\x04\x05\xb4")))
    assert seg.options.unknown == 1 and seg.options.mss == 1460


def test_eol_ends_the_walk_even_with_garbage_after_it():
    seg = parse(with_tcp(tcp_with_options(b"\x02\x04\x05\xb4\x00\xff\xff\xff")))
    assert seg.options.mss == 1460


def test_link_padding_after_the_datagram_is_allowed():
    assert parse(GOOD + b"\0" * 6).payload == b"data"


def test_verify_off_accepts_bad_checksums_but_not_bad_structure():
    assert parse(CASES["tcp-checksum"], verify=False).payload == b"dat`"  # the flipped byte
    with pytest.raises(MalformedPacket):
        parse(CASES["ip-ihl"], verify=False)


def test_non_bytes_buffers_are_accepted():
    assert parse(bytearray(GOOD)).seq == 1
    assert parse(memoryview(GOOD)).seq == 1


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data):
    for verify in (True, False):
        try:
            parse(data, verify=verify)
        except MalformedPacket:
            pass


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(GOOD)))
def test_mutated_packets_parse_or_raise_malformed(edits, cut):
    b = bytearray(GOOD)
    for i, v in edits:
        b[i] = v
    b = fix_ip_checksum(b) if (b[0] & 15) * 4 <= len(b) and b[0] & 15 >= 5 else b
    data = bytes(b[:cut])
    tracker = FlowTracker(0)
    tracker.syn_sent()
    try:
        seg = parse(data, verify=False)
    except MalformedPacket:
        return
    tracker.input(seg)        # the flow block takes whatever parses
    assert seg.payload_length == len(seg.payload)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=40))
def test_option_decoder_survives_every_layout(data):
    try:
        TCPOptions.decode(data)
    except MalformedPacket as exc:
        assert exc.reason.startswith("tcp-option")


def test_options_longer_than_40_bytes_are_refused_by_decode():
    with pytest.raises(MalformedPacket):
        TCPOptions.decode(b"\x01" * 41)


# -- build side ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(wscale=15),
    dict(sack=[(1, 2)] * 5),
    dict(mss=70000),
])
def test_impossible_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        TCPOptions(**kwargs)


def test_options_beyond_40_bytes_are_refused_with_a_reason():
    with pytest.raises(PacketBuildError) as err:
        TCPOptions(mss=1460, wscale=7, timestamp=(1, 2), sack=[(1, 2)] * 3)
    assert err.value.reason == "tcp-option-space"


@pytest.mark.parametrize("ip_options, reason", [(b"\x01" * 3, "ip-options"),
                                                (b"\x01" * 44, "ip-options")])
def test_bad_ip_options_are_refused(ip_options, reason):
    with pytest.raises(PacketBuildError) as err:
        build("192.0.2.1", "192.0.2.2", 1, 2, ip_options=ip_options)
    assert err.value.reason == reason


def test_oversized_datagram_is_refused():
    with pytest.raises(PacketBuildError) as err:
        build("192.0.2.1", "192.0.2.2", 1, 2, payload=b"x" * 65500)
    assert err.value.reason == "too-big"


@pytest.mark.parametrize("bad", ["192.0.2", "192.0.2.256", "::1", "host.example", -1, 2**32])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(ValueError):
        build(bad, "192.0.2.2", 1, 2)


def test_bad_address_type_is_a_type_error():
    with pytest.raises(TypeError):
        build(3.5, "192.0.2.2", 1, 2)


@pytest.mark.parametrize("port", [-1, 65536])
def test_ports_out_of_range_are_refused(port):
    with pytest.raises(OverflowError):
        build("192.0.2.1", "192.0.2.2", port, 2)
