"""Packet building, parsing and checksums: fastpunch beside dpkt and scapy in
the same run. Each benchmark checks its own output (extra_info["correct"]).
Per-segment rates for batches are derived by benchmarks/report.py."""

from __future__ import annotations

import array
import socket
import struct
import warnings

import dpkt
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import checksum as scapy_checksum

from fastpunch.packet import (
    Flags,
    ParsedBatch,
    SegmentBatch,
    TCPOptions,
    build,
    checksum,
    checksum_many,
    parse,
)

warnings.filterwarnings("ignore", category=UserWarning, module="dpkt")

SRC, DST = "192.0.2.1", "198.51.100.2"
OPTS = TCPOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(123456, 0))
OPT_BYTES = OPTS.encode()
SCAPY_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None),
              ("WScale", 7)]
BATCH = 1024
PAYLOAD = bytes(range(256)) * 5 + bytes(180)     # 1460 bytes
SYN_REF = build(SRC, DST, 40000, 443, seq=1000, flags=Flags.SYN, window=64240, options=OPTS)
DATA_REF = build(SRC, DST, 40000, 443, seq=1000, ack=5000, flags=Flags.ACK | Flags.PSH,
                 window=502, payload=PAYLOAD)


def dpkt_segment(flags, opts=b"", payload=b"", ack=0, win=64240):
    tcp = dpkt.tcp.TCP(sport=40000, dport=443, seq=1000, ack=ack, flags=flags, win=win,
                       opts=opts, data=payload)
    tcp.off = (20 + len(opts)) // 4
    ip = dpkt.ip.IP(src=socket.inet_aton(SRC), dst=socket.inet_aton(DST), p=6, ttl=64, id=0,
                    df=1, data=tcp)
    return bytes(ip)


def scapy_segment(flags, options=(), payload=b"", ack=0, win=64240):
    return bytes(IP(src=SRC, dst=DST, flags="DF", id=0) /
                 TCP(sport=40000, dport=443, seq=1000, ack=ack, flags=flags, window=win,
                     options=list(options)) / payload)


# -- SYN with options -----------------------------------------------------------------

def test_syn_build_fastpunch_single(benchmark):
    benchmark.group = "syn-build"
    out = benchmark(build, SRC, DST, 40000, 443, seq=1000, flags=Flags.SYN, window=64240,
                    options=OPTS)
    benchmark.extra_info.update(correct=out == SYN_REF, segments_per_call=1)


def test_syn_build_fastpunch_batch(benchmark):
    benchmark.group = "syn-build"
    batch = SegmentBatch(BATCH, stride=128)
    dports = array.array("H", (1024 + i for i in range(BATCH)))
    seqs = array.array("I", (i * 2654435761 % 2**32 for i in range(BATCH)))
    benchmark(batch.fill, BATCH, SRC, DST, 40000, 0, flags=Flags.SYN, window=64240,
              options=OPTS, dports=dports, seqs=seqs)
    ok = all(parse(batch[i]).dport == dports[i] and parse(batch[i]).seq == seqs[i]
             for i in range(0, BATCH, 97))
    ok = ok and batch[0] == build(SRC, DST, 40000, dports[0], seq=seqs[0], window=64240,
                                  options=OPTS)
    benchmark.extra_info.update(correct=ok, segments_per_call=BATCH)


def test_syn_build_dpkt(benchmark):
    benchmark.group = "syn-build"
    out = benchmark(dpkt_segment, dpkt.tcp.TH_SYN, OPT_BYTES)
    benchmark.extra_info.update(correct=out == SYN_REF, segments_per_call=1)


def test_syn_build_scapy(benchmark):
    benchmark.group = "syn-build"
    out = benchmark(scapy_segment, "S", SCAPY_OPTS)
    benchmark.extra_info.update(correct=out == SYN_REF, segments_per_call=1)


# -- 1460-byte data segment -------------------------------------------------------------

def test_data_build_fastpunch_single(benchmark):
    benchmark.group = "data-build"
    out = benchmark(build, SRC, DST, 40000, 443, seq=1000, ack=5000,
                    flags=Flags.ACK | Flags.PSH, window=502, payload=PAYLOAD)
    benchmark.extra_info.update(correct=out == DATA_REF, segments_per_call=1)


def test_data_build_fastpunch_batch(benchmark):
    benchmark.group = "data-build"
    n = 256
    stream = PAYLOAD * n
    batch = SegmentBatch(n, stride=1536)
    benchmark(batch.fill, n, SRC, DST, 40000, 443, seq=1000, ack=5000,
              flags=Flags.ACK | Flags.PSH, window=502, payloads=stream, payload_len=1460)
    ok = batch[0] == DATA_REF and parse(batch[n - 1]).seq == 1000 + 1460 * (n - 1)
    benchmark.extra_info.update(correct=ok, segments_per_call=n)


def test_data_build_dpkt(benchmark):
    benchmark.group = "data-build"
    out = benchmark(dpkt_segment, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, b"", PAYLOAD, 5000, 502)
    benchmark.extra_info.update(correct=out == DATA_REF, segments_per_call=1)


def test_data_build_scapy(benchmark):
    benchmark.group = "data-build"
    out = benchmark(scapy_segment, "PA", (), PAYLOAD, 5000, 502)
    benchmark.extra_info.update(correct=out == DATA_REF, segments_per_call=1)


# -- parse ------------------------------------------------------------------------------

def read_fastpunch(raw):
    s = parse(raw)
    return s.sport, s.dport, s.seq, s.ack, s.flags, s.window, s.options.mss


def read_dpkt(raw):
    ip = dpkt.ip.IP(raw)
    t = ip.data
    mss = next(int.from_bytes(v, "big") for k, v in dpkt.tcp.parse_opts(t.opts)
               if k == dpkt.tcp.TCP_OPT_MSS)
    return t.sport, t.dport, t.seq, t.ack, t.flags, t.win, mss


def read_scapy(raw):
    t = IP(raw)[TCP]
    return t.sport, t.dport, t.seq, t.ack, int(t.flags), t.window, dict(t.options)["MSS"]


EXPECTED = (40000, 443, 1000, 0, int(Flags.SYN), 64240, 1460)


@pytest.mark.parametrize("reader", [read_fastpunch, read_dpkt, read_scapy],
                         ids=["fastpunch", "dpkt", "scapy"])
def test_syn_parse(benchmark, reader):
    benchmark.group = "syn-parse"
    out = benchmark(reader, SYN_REF)
    benchmark.extra_info.update(correct=out == EXPECTED, segments_per_call=1)


@pytest.mark.parametrize("family", [4, 6])
def test_syn_parse_fastpunch_batch(benchmark, family):
    """The receive path: a recvmmsg buffer of 1024 SYNs parsed in one C call,
    fields read as columns (what RawReceiver.recv_into does after recvmmsg);
    IPv4 or IPv6 SYNs."""
    benchmark.group = "syn-parse" if family == 4 else "syn6-parse"
    src = SegmentBatch(BATCH, stride=128)
    src.fill(BATCH, *((SRC, DST) if family == 4 else (SRC6, DST6)), 40000, 443, seq=1000,
             flags=Flags.SYN, window=64240, options=OPTS, seqs=array.array("I", [1000] * BATCH))
    lens = array.array("I", src.lengths)
    parsed = ParsedBatch(BATCH, stride=128)

    def parse_and_read():
        parsed.parse_from(src.buffer, 128, lens)
        return tuple(parsed.column(c) for c in ("sport", "dport", "seq", "ack", "flags",
                                                "window", "mss"))

    cols = benchmark(parse_and_read)
    ok = parsed.good == BATCH and all(
        tuple(col[i] for col in cols) == EXPECTED for i in range(0, BATCH, 101))
    benchmark.extra_info.update(correct=ok, segments_per_call=BATCH)


# -- IPv6: the same SYN, build and parse, beside dpkt and scapy --------------------------

SRC6, DST6 = "2001:db8::1", "2001:db8:ffff::2"
SYN6_REF = build(SRC6, DST6, 40000, 443, seq=1000, flags=Flags.SYN, window=64240, options=OPTS)


def dpkt_segment6():
    tcp = dpkt.tcp.TCP(sport=40000, dport=443, seq=1000, flags=dpkt.tcp.TH_SYN, win=64240,
                       opts=OPT_BYTES)
    tcp.off = (20 + len(OPT_BYTES)) // 4
    ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, SRC6),
                      dst=socket.inet_pton(socket.AF_INET6, DST6), nxt=6, hlim=64, data=tcp)
    ip.plen = len(tcp)
    return bytes(ip)


def scapy_segment6():
    return bytes(IPv6(src=SRC6, dst=DST6) /
                 TCP(sport=40000, dport=443, seq=1000, flags="S", window=64240,
                     options=SCAPY_OPTS))


def test_syn6_build_fastpunch_single(benchmark):
    benchmark.group = "syn6-build"
    out = benchmark(build, SRC6, DST6, 40000, 443, seq=1000, flags=Flags.SYN, window=64240,
                    options=OPTS)
    benchmark.extra_info.update(correct=out == SYN6_REF == scapy_segment6(),
                                segments_per_call=1)


def test_syn6_build_fastpunch_batch(benchmark):
    benchmark.group = "syn6-build"
    batch = SegmentBatch(BATCH, stride=128)
    sports = array.array("H", (1024 + i for i in range(BATCH)))
    seqs = array.array("I", (i * 2654435761 % 2**32 for i in range(BATCH)))
    benchmark(batch.fill, BATCH, SRC6, DST6, 0, 443, flags=Flags.SYN, window=64240,
              options=OPTS, sports=sports, seqs=seqs)
    ok = all(parse(batch[i]).sport == sports[i] and parse(batch[i]).seq == seqs[i]
             for i in range(0, BATCH, 97))
    ok = ok and batch[0] == build(SRC6, DST6, sports[0], 443, seq=seqs[0], window=64240,
                                  options=OPTS)
    benchmark.extra_info.update(correct=ok, segments_per_call=BATCH)


def test_syn6_build_dpkt(benchmark):
    benchmark.group = "syn6-build"
    out = benchmark(dpkt_segment6)
    benchmark.extra_info.update(correct=out == SYN6_REF, segments_per_call=1)


def test_syn6_build_scapy(benchmark):
    benchmark.group = "syn6-build"
    out = benchmark(scapy_segment6)
    benchmark.extra_info.update(correct=out == SYN6_REF, segments_per_call=1)


def read6_dpkt(raw):
    t = dpkt.ip6.IP6(raw).data
    mss = next(int.from_bytes(v, "big") for k, v in dpkt.tcp.parse_opts(t.opts)
               if k == dpkt.tcp.TCP_OPT_MSS)
    return t.sport, t.dport, t.seq, t.ack, t.flags, t.win, mss


def read6_scapy(raw):
    t = IPv6(raw)[TCP]
    return t.sport, t.dport, t.seq, t.ack, int(t.flags), t.window, dict(t.options)["MSS"]


@pytest.mark.parametrize("reader", [read_fastpunch, read6_dpkt, read6_scapy],
                         ids=["fastpunch", "dpkt", "scapy"])
def test_syn6_parse(benchmark, reader):
    benchmark.group = "syn6-parse"
    out = benchmark(reader, SYN6_REF)
    benchmark.extra_info.update(correct=out == EXPECTED, segments_per_call=1)


# -- checksum ---------------------------------------------------------------------------

REGIONS = 4096
BLOB = (PAYLOAD * REGIONS)


def test_checksum_fastpunch_many(benchmark):
    benchmark.group = "checksum-1460"
    out = array.array("H", bytes(2 * REGIONS))
    benchmark(checksum_many, BLOB, 1460, 1460, out)
    want = scapy_checksum(PAYLOAD)
    ok = all(int.from_bytes(struct.pack("=H", v), "big") == want for v in out[:16])
    benchmark.extra_info.update(correct=ok, bytes_per_call=1460 * REGIONS)


def test_checksum_fastpunch_single(benchmark):
    benchmark.group = "checksum-1460"
    out = benchmark(checksum, PAYLOAD)
    benchmark.extra_info.update(correct=out == scapy_checksum(PAYLOAD), bytes_per_call=1460)


def test_checksum_dpkt(benchmark):
    benchmark.group = "checksum-1460"
    out = benchmark(dpkt.dpkt.in_cksum, PAYLOAD)
    benchmark.extra_info.update(correct=out == scapy_checksum(PAYLOAD), bytes_per_call=1460)


def test_checksum_scapy(benchmark):
    benchmark.group = "checksum-1460"
    out = benchmark(scapy_checksum, PAYLOAD)
    benchmark.extra_info.update(correct=out == checksum(PAYLOAD), bytes_per_call=1460)
