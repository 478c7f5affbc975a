"""atheris harness over the Python face of the parser and the flow block.

Every input must either parse or raise MalformedPacket; what parses must
survive every accessor and a FlowTracker. Any other exception is a finding.
Run: python tests/fuzz/fuzz_parse.py [libFuzzer flags] [corpus dirs]
     python tests/fuzz/fuzz_parse.py --write-seeds DIR
"""

import sys

import atheris

with atheris.instrument_imports():
    from fastpunch.errors import MalformedPacket
    from fastpunch.packet import Flags, FlowTracker, TCPOptions, build, parse

ACCESSORS = ("src", "dst", "tos", "total_length", "ip_header_length", "ip_id", "df", "ip_flags",
             "ttl", "ip_checksum", "ip_options", "sport", "dport", "seq", "ack", "flags",
             "flags_str", "window", "tcp_checksum", "urgent", "options", "payload",
             "payload_length", "seg_len", "version", "family", "src_int", "dst_int",
             "flow_label", "next_header", "ext_header_length", "hop_limit", "traffic_class")


def test_one_input(data: bytes) -> None:
    for verify in (True, False):
        try:
            seg = parse(data, verify=verify)
        except MalformedPacket:
            continue
        for name in ACCESSORS:
            getattr(seg, name)
        repr(seg.options)
        assert len(seg.payload) == seg.payload_length
        for tracker in (FlowTracker(0x12345678), FlowTracker(seg.ack - 1 & 0xFFFFFFFF)):
            tracker.syn_sent()
            tracker.input(seg)
            tracker.input(seg)
        t = FlowTracker(1, wscale=None)
        t.assume_syn(seg.seq, seg.window, seg.options.wscale if (seg.options.wscale or 0) <= 14 else None)
        t.input(seg)
    try:
        TCPOptions.decode(data[:40])
    except MalformedPacket:
        pass


def seeds():
    opts = TCPOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 2))
    yield build("192.0.2.1", "198.51.100.2", 40000, 443, seq=1, flags=Flags.SYN, options=opts)
    yield build("198.51.100.2", "192.0.2.1", 443, 40000, seq=9, ack=2,
                flags=Flags.SYN | Flags.ACK, options=opts)
    yield build("192.0.2.1", "198.51.100.2", 40000, 443, seq=2, ack=10, flags=Flags.ACK,
                options=TCPOptions(timestamp=(3, 4), sack=[(1, 2), (3, 4)]))
    yield build("192.0.2.1", "198.51.100.2", 1, 2, flags=Flags.ACK | Flags.PSH,
                payload=b"x" * 100, ip_options=b"\x01\x01\x01\x00")
    yield b"\x02\x04\x05\xb4\x01\x03\x03\x07\x04\x02\x08\x0a" + b"\x00" * 8
    yield build("2001:db8::1", "2001:db8::2", 40000, 443, seq=1, flags=Flags.SYN, options=opts,
                flow_label=0x12345)
    six = build("2001:db8::2", "2001:db8::1", 443, 40000, seq=9, ack=2,
                flags=Flags.ACK | Flags.PSH, payload=b"y" * 64)
    # the same behind a destination-options header (next header 60, 8 bytes)
    yield (six[:4] + (int.from_bytes(six[4:6], "big") + 8).to_bytes(2, "big") + b"\x3c"
           + six[7:40] + b"\x06\x00" + b"\x01\x04\x00\x00\x00\x00" + six[40:])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        import os

        os.makedirs(sys.argv[2], exist_ok=True)
        for i, seed in enumerate(seeds()):
            with open(os.path.join(sys.argv[2], f"seed{i}"), "wb") as f:
                f.write(seed)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
