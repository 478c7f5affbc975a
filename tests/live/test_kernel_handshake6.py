"""IPv6: crafted segments against real Linux TCP in two fresh namespaces
joined by a veth pair (2001:db8::/32, RFC 3849). A kernel that answers our
SYN, completes accept() on our ACK and exchanges data has verified our IPv6
header, the pseudo-header checksum, sequence numbers and options; the
receive socket's filter must show one flow's segments and nothing else."""

from __future__ import annotations

import array
import socket

import pytest

from fastpunch import netfilter
from fastpunch._netns import VethPair, inside
from fastpunch.packet import (
    Flags,
    FlowEvent,
    FlowState,
    FlowTracker,
    RawReceiver,
    RawSender,
    SegmentBatch,
    TCPOptions,
    build,
)
from tests.conftest import require_root
from tests.live.test_kernel_handshake import collect

pytestmark = pytest.mark.live

A, B = "2001:db8:6::1", "2001:db8:6::2"
PORT = 8080


@pytest.fixture
def veth6():
    require_root("an IPv6 live engine test")
    with VethPair(addr_a=A, addr_b=B, prefixlen=64) as pair:
        yield pair


def listener(ns: str, port: int = PORT) -> socket.socket:
    with inside(ns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((B, port))
        s.listen(8)
    return s


def test_a_crafted_ipv6_syn_gets_the_kernels_synack(veth6):
    srv = listener(veth6.ns_b)
    try:
        with inside(veth6.ns_a):
            guard = netfilter.suppress_rsts([netfilter.RstSuppression(40001, B, PORT)])
            with guard, RawSender(family=6) as tx, \
                    RawReceiver(src=B, dst=A, sport=PORT, dport=40001) as rx:
                assert tx.version == rx.version == 6
                syn = build(A, B, 40001, PORT, seq=0xFFFFFFF0, window=64240, flow_label=0xBEEF,
                            options=TCPOptions(mss=1400, wscale=6, sack_permitted=True,
                                               timestamp=(12345, 0)))
                tx.send(syn)
                got = collect(rx, 1, until=lambda s: s.flags & Flags.SYN)
    finally:
        srv.close()
    assert got, "no SYN-ACK from the kernel"
    synack = got[-1]
    assert synack.version == 6 and (synack.src, synack.dst) == (B, A)
    assert synack.flags & 0xFF == Flags.SYN | Flags.ACK
    assert synack.ack == 0xFFFFFFF1
    assert synack.options.mss is not None and synack.options.mss <= 1440   # 1500 - 40 - 20
    assert synack.options.wscale is not None and synack.options.sack_permitted
    assert synack.options.timestamp[1] == 12345


def test_a_crafted_ipv6_handshake_makes_accept_return_and_data_flows(veth6):
    srv = listener(veth6.ns_b)
    srv.settimeout(5)
    try:
        with inside(veth6.ns_a):
            guard = netfilter.suppress_rsts([netfilter.RstSuppression(40002, B, PORT)])
            with guard, RawSender(family=6) as tx, \
                    RawReceiver(src=B, dst=A, sport=PORT, dport=40002) as rx:
                flow = FlowTracker(0xFFFFFF00, rcv_wnd=65535, wscale=7)
                syn = flow.syn_sent()
                tx.send(build(A, B, 40002, PORT, seq=syn.seq, flags=syn.flags,
                              window=syn.window, options=TCPOptions(mss=1400, wscale=7)))
                synack = collect(rx, 1, until=lambda s: s.flags & Flags.SYN)[-1]
                event, reply = flow.input(synack)
                assert event == FlowEvent.ESTABLISHED and flow.state == FlowState.ESTABLISHED
                tx.send(build(A, B, 40002, PORT, seq=reply.seq, ack=reply.ack,
                              flags=reply.flags, window=reply.window))
                conn, peer = srv.accept()          # the kernel completed its side
                with conn:
                    assert peer[:2] == (A, 40002)
                    request = b"crafted over IPv6 " * 70        # 1,260 bytes: one segment
                    out = flow.send(len(request))
                    tx.send(build(A, B, 40002, PORT, seq=out.seq, ack=out.ack,
                                  flags=out.flags, window=out.window, payload=request))
                    conn.settimeout(5)
                    got = b""
                    while len(got) < len(request):
                        chunk = conn.recv(65536)
                        assert chunk, "the kernel closed the connection"
                        got += chunk
                    assert got == request
                    conn.sendall(b"answer over IPv6")
                    data = collect(rx, 1, until=lambda s: s.payload_length > 0)
                    assert data and data[-1].payload == b"answer over IPv6"
                    assert data[-1].version == 6 and data[-1].ack == (out.seq + len(request)) % 2**32   # (it wrapped)
    finally:
        srv.close()


def test_the_ipv6_filter_shows_one_flow_and_not_our_own_segments(veth6):
    """Two flows toward B and their SYN-ACKs: each receiver sees its own
    flow's answer, never the other's, never the SYNs this host sent (an
    ETH_P_IPV6 packet socket is not given outgoing copies; the filter would
    refuse them), never IPv4."""
    srv = listener(veth6.ns_b)
    try:
        with inside(veth6.ns_a):
            guard = netfilter.suppress_rsts([netfilter.RstSuppression(p, B, PORT)
                                             for p in (40003, 40004)])
            with guard, RawSender(family=6) as tx, \
                    RawReceiver(src=B, dst=A, sport=PORT, dport=40003) as one, \
                    RawReceiver(matches=[(B, A, PORT, 40004), (B, A, PORT, 40999)]) as other, \
                    RawReceiver(family=6) as every:
                for sport in (40003, 40004):
                    tx.send(build(A, B, sport, PORT, seq=1000))
                a = collect(one, 5, timeout=1.5)
                b = collect(other, 5, timeout=1.5)
                seen = collect(every, 10, timeout=0.5)
    finally:
        srv.close()
    # (the kernel repeats an unanswered SYN-ACK after a second: one or more)
    assert a and {s.dport for s in a} == {40003} and a[0].flags & Flags.SYN
    assert b and {s.dport for s in b} == {40004}
    assert seen and all(s.src == B for s in seen), [repr(s) for s in seen]


def test_an_ipv6_batch_goes_out_in_one_call_and_each_segment_is_answered(veth6):
    srv = listener(veth6.ns_b)
    ports = list(range(41000, 41016))
    try:
        with inside(veth6.ns_a):
            guard = netfilter.suppress_rsts([netfilter.RstSuppression(p, B, PORT)
                                             for p in ports])
            with guard, RawSender(family=6) as tx, \
                    RawReceiver(src=B, dst=A, sport=PORT) as rx:
                batch = SegmentBatch(len(ports), stride=128)
                batch.fill(len(ports), A, B, 0, PORT, seq=77, sports=array.array("H", ports),
                           options=TCPOptions(mss=1400))
                assert tx.send_batch(batch) == len(ports)
                got = collect(rx, len(ports), timeout=3)
    finally:
        srv.close()
    assert sorted(s.dport for s in got) == ports
    assert all(s.ack == 78 and s.flags & Flags.SYN for s in got)


def test_an_ipv4_sender_refuses_an_ipv6_datagram_and_back():
    require_root("raw sockets")
    six = build(A, B, 1, 2)
    four = build("198.51.100.1", "198.51.100.2", 1, 2)
    with RawSender() as v4, RawSender(family=6) as v6:
        with pytest.raises(ValueError, match="IPv4 sender"):
            v4.send(six)
        with pytest.raises(ValueError, match="IPv6 sender"):
            v6.send(four)
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        RawReceiver(src=B, dst="198.51.100.1")
    # matches may be any iterable, a generator too (read once)
    for peer in (B, "198.51.100.2"):
        with RawReceiver(matches=((peer, None, p, 0) for p in (1, 2))) as rx:
            assert rx.version == (6 if ":" in peer else 4)
    with pytest.raises(ValueError, match="family"):
        RawReceiver(src=B, family=4)
