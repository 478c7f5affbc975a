"""tshark, an independent dissector, decodes our packets with checksum
validation on, and every field matches what we asked for."""

from __future__ import annotations

import array
import json
import shutil
import struct
import subprocess

import pytest

from fastpunch.packet import Flags, SegmentBatch, TCPOptions, build

pytestmark = pytest.mark.capture

LINKTYPE_RAW = 101   # raw IPv4, no link header
# Wireshark's proto_checksum_status: 0 bad, 1 good, 2 unverified
BAD, GOOD = "0", "1"


def write_pcap(path, datagrams):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, d in enumerate(datagrams):
            f.write(struct.pack("<IIII", 1700000000 + i, 0, len(d), len(d)))
            f.write(d)


def tshark(path):
    exe = shutil.which("tshark")
    if exe is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    proc = subprocess.run(
        [exe, "-r", str(path), "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
         "-o", "tcp.relative_sequence_numbers:FALSE", "-o", "tcp.analyze_sequence_numbers:FALSE",
         "-T", "json"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [p["_source"]["layers"] for p in json.loads(proc.stdout, object_pairs_hook=_keep_dups)]


def _keep_dups(pairs):
    """tshark's JSON repeats keys (one sack_le per SACK block): keep them all."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


def as_list(v):
    return v if isinstance(v, list) else [v]


CASES = [
    dict(src="192.0.2.1", dst="198.51.100.2", sport=40000, dport=443, seq=1000, flags=Flags.SYN,
         window=64240, options=TCPOptions(mss=1460, wscale=7, sack_permitted=True,
                                          timestamp=(123456, 0)), ttl=64, ip_id=1, tos=0),
    dict(src="198.51.100.2", dst="192.0.2.1", sport=443, dport=40000, seq=2**32 - 1, ack=1001,
         flags=Flags.SYN | Flags.ACK, window=65160,
         options=TCPOptions(mss=1400, sack_permitted=True, timestamp=(7, 123456), wscale=10),
         ttl=57, ip_id=0xBEEF, tos=0x10),
    dict(src="203.0.113.5", dst="192.0.2.77", sport=5000, dport=6000, seq=5, ack=9,
         flags=Flags.ACK, window=501,
         options=TCPOptions(timestamp=(1, 2), sack=[(100, 200), (300, 400)]), ttl=1, df=False),
    dict(src="192.0.2.1", dst="198.51.100.2", sport=1, dport=2, seq=77, ack=88,
         flags=Flags.ACK | Flags.PSH, payload=b"fastpunch payload \x00\xff" * 50, tos=0xB8,
         ip_options=b"\x01\x01\x01\x00"),
    dict(src="192.0.2.1", dst="198.51.100.2", sport=3, dport=4, seq=1, ack=2,
         flags=Flags.FIN | Flags.ACK | Flags.URG, urgent=7, payload=b"x"),
]


def field(layer, name):
    return layer[name]


def check(layers, case):
    ip, tcp = layers["ip"], layers["tcp"]
    assert ip["ip.checksum.status"] == GOOD
    assert tcp["tcp.checksum.status"] == GOOD
    assert (ip["ip.src"], ip["ip.dst"]) == (case["src"], case["dst"])
    assert int(ip["ip.ttl"]) == case.get("ttl", 64)
    assert int(ip["ip.id"], 16) == case.get("ip_id", 0)
    assert int(ip["ip.dsfield"], 16) == case.get("tos", 0)
    assert ip["ip.flags_tree"]["ip.flags.df"] == ("1" if case.get("df", True) else "0")
    opts = case.get("ip_options", b"")
    assert int(ip["ip.hdr_len"]) == 20 + len(opts)
    check_tcp(tcp, case)


def check_tcp(tcp, case):
    assert tcp["tcp.checksum.status"] == GOOD
    assert (int(tcp["tcp.srcport"]), int(tcp["tcp.dstport"])) == (case["sport"], case["dport"])
    assert int(tcp["tcp.seq_raw"]) == case["seq"]
    assert int(tcp["tcp.ack_raw"]) == case.get("ack", 0)
    assert int(tcp["tcp.flags"], 16) == int(case["flags"])
    assert int(tcp["tcp.window_size_value"]) == case.get("window", 65535)
    assert int(tcp["tcp.urgent_pointer"]) == case.get("urgent", 0)
    payload = case.get("payload", b"")
    assert int(tcp["tcp.len"]) == len(payload)
    if payload:
        assert bytes.fromhex(tcp["tcp.payload"].replace(":", "")) == payload
    o = case.get("options")
    if o is None:
        return
    tree = tcp.get("tcp.options_tree", {})
    if o.mss is not None:
        assert tree["tcp.options.mss_tree"]["tcp.options.mss_val"] == str(o.mss)
    if o.wscale is not None:
        assert tree["tcp.options.wscale_tree"]["tcp.options.wscale.shift"] == str(o.wscale)
    assert ("tcp.options.sack_perm" in tree) == o.sack_permitted
    if o.timestamp is not None:
        ts = tree["tcp.options.timestamp_tree"]
        assert (int(ts["tcp.options.timestamp.tsval"]), int(ts["tcp.options.timestamp.tsecr"])) \
            == o.timestamp
    if o.sack:
        sack = tree["tcp.options.sack_tree"]
        assert int(sack["tcp.options.sack.count"]) == len(o.sack)
        edges = list(zip(map(int, as_list(sack["tcp.options.sack_le"])),
                         map(int, as_list(sack["tcp.options.sack_re"]))))
        assert edges == list(o.sack)


def test_tshark_decodes_every_field_with_good_checksums(tmp_path):
    datagrams = [build(**c) for c in CASES]
    batch = SegmentBatch(16, stride=256)
    batch.fill(16, "192.0.2.9", "203.0.113.9", 0, 8080, flags=Flags.SYN,
               options=TCPOptions(mss=1460, wscale=7), sports=array.array("H", range(30000, 30016)),
               seqs=array.array("I", range(0, 16 * 1000, 1000)))
    datagrams += [batch[i] for i in range(16)]
    path = tmp_path / "ours.pcap"
    write_pcap(path, datagrams)
    decoded = tshark(path)
    assert len(decoded) == len(datagrams)
    for layers, case in zip(decoded, CASES):
        check(layers, case)
    for i, layers in enumerate(decoded[len(CASES):]):
        check(layers, dict(src="192.0.2.9", dst="203.0.113.9", sport=30000 + i, dport=8080,
                           seq=i * 1000, flags=Flags.SYN, ip_id=i,
                           options=TCPOptions(mss=1460, wscale=7)))


def test_tshark_flags_corrupted_checksums_so_the_check_is_really_on(tmp_path):
    good = build(**CASES[0])
    bad_ip = bytearray(good)
    bad_ip[10] ^= 0xFF
    bad_tcp = bytearray(good)
    bad_tcp[-1] ^= 0x01
    path = tmp_path / "bad.pcap"
    write_pcap(path, [bytes(bad_ip), bytes(bad_tcp)])
    first, second = tshark(path)
    assert first["ip"]["ip.checksum.status"] == BAD
    assert second["ip"]["ip.checksum.status"] == GOOD
    assert second["tcp"]["tcp.checksum.status"] == BAD


CASES6 = [
    dict(src="2001:db8::1", dst="2001:db8:ffff::2", sport=40000, dport=443, seq=1000,
         flags=Flags.SYN, window=64240, ttl=64, tos=0, flow_label=0x12345,
         options=TCPOptions(mss=1440, wscale=7, sack_permitted=True, timestamp=(123456, 0))),
    dict(src="2001:db8:ffff::2", dst="2001:db8::1", sport=443, dport=40000, seq=2**32 - 1,
         ack=1001, flags=Flags.SYN | Flags.ACK, window=65160, ttl=57, tos=0x28,
         options=TCPOptions(mss=1400, sack_permitted=True, timestamp=(7, 123456), wscale=10)),
    dict(src="2001:db8::1", dst="2001:db8:ffff::2", sport=1, dport=2, seq=77, ack=88,
         flags=Flags.ACK | Flags.PSH, payload=b"fastpunch over IPv6 \x00\xff" * 50,
         options=TCPOptions(timestamp=(1, 2), sack=[(100, 200), (300, 400)])),
]


def check6(layers, case):
    ip, tcp = layers["ipv6"], layers["tcp"]
    assert tcp["tcp.checksum.status"] == GOOD
    assert (ip["ipv6.src"], ip["ipv6.dst"]) == (case["src"], case["dst"])
    assert int(ip["ipv6.hlim"]) == case.get("ttl", 64)
    assert int(ip["ipv6.tclass"], 16) == case.get("tos", 0)
    assert int(ip["ipv6.flow"], 16) == case.get("flow_label", 0)
    assert int(ip["ipv6.nxt"]) == 6
    check_tcp(tcp, case)


def test_tshark_decodes_ipv6_segments_with_good_checksums(tmp_path):
    """The same check over IPv6 (LINKTYPE_RAW carries either version):
    tshark validates the TCP checksum under the IPv6 pseudo-header."""
    datagrams = [build(**c) for c in CASES6]
    batch = SegmentBatch(8, stride=256)
    batch.fill(8, "2001:db8::9", "2001:db8::7", 0, 8080, options=TCPOptions(mss=1440),
               sports=array.array("H", range(30000, 30008)))
    datagrams += [batch[i] for i in range(8)]
    bad = bytearray(datagrams[0])
    bad[-1] ^= 0x01
    datagrams.append(bytes(bad))
    path = tmp_path / "ours6.pcap"
    write_pcap(path, datagrams)
    decoded = tshark(path)
    assert len(decoded) == len(datagrams)
    for layers, case in zip(decoded, CASES6):
        check6(layers, case)
    for i, layers in enumerate(decoded[len(CASES6):-1]):
        check6(layers, dict(src="2001:db8::9", dst="2001:db8::7", sport=30000 + i, dport=8080,
                            seq=0, flags=Flags.SYN, options=TCPOptions(mss=1440)))
    assert decoded[-1]["tcp"]["tcp.checksum.status"] == BAD     # the check is really on
