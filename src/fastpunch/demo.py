"""The engine demo: a crafted TCP handshake with a real Linux kernel.

Two fresh network namespaces joined by a veth pair stand in for two hosts.
Host B runs an ordinary kernel TCP listener. Host A has no socket at all: the
engine builds A's SYN, parses B's SYN-ACK, tracks the sequence numbers and
answers with the ACK that makes B's accept() return; then both sides exchange
data. Everything is removed afterwards, whatever happens.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

from fastpunch import _caps
from fastpunch._netns import VethPair, inside
from fastpunch.packet import Flags, SegmentBatch, TCPOptions
from fastpunch.punch.driver import Engine

SERVER_PORT = 8080
CLIENT_PORT = 40000


def run(echo: Callable[[str], None] = print) -> dict:
    _caps.require("the demo (namespaces, raw sockets, nftables)",
                  _caps.CAP_SYS_ADMIN, _caps.CAP_NET_ADMIN, _caps.CAP_NET_RAW)
    report: dict = {}
    with VethPair() as pair:
        echo(f"namespaces {pair.ns_a} ({pair.addr_a}) <-veth-> {pair.ns_b} ({pair.addr_b})")
        with inside(pair.ns_b):
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((pair.addr_b, SERVER_PORT))
            server.listen(1)
            server.settimeout(5)
        try:
            with inside(pair.ns_a):
                flow = Engine((pair.addr_a, CLIENT_PORT), (pair.addr_b, SERVER_PORT))
            with flow, inside(pair.ns_a), flow.rst_suppression() as guard:
                echo(f"RST suppression: table {guard.table.name} in {pair.ns_a}")
                elapsed = asyncio.run(flow.open(timeout=5))
                conn, peer = server.accept()
                with conn:
                    echo(f"kernel accept() returned {peer[0]}:{peer[1]} after "
                         f"{elapsed * 1000:.2f} ms of crafted handshake")
                    flow.send(b"hello, kernel: this segment was built in C\n")
                    line = conn.recv(100)
                    conn.sendall(b"hello, engine: " + line)
                    answer = asyncio.run(flow.receive(15 + len(line)))
                    asyncio.run(flow.wait_acked())
                    flow.abort()
                echo(f"engine received: {answer.decode().rstrip()}")
                opts = flow.peer_options
                report.update(
                    iss=flow.iss, irs=flow.irs, handshake_ms=round(elapsed * 1000, 3),
                    segments_sent=flow.stats.sent, segments_received=flow.stats.received,
                    peer_mss=opts.mss, peer_wscale=opts.wscale,
                    sack_permitted=opts.sack_permitted, timestamps=flow.timestamps,
                    malformed=flow.machine.ignored,
                )
        finally:
            server.close()
    # Batch build rate: one C call per 1,024 SYNs.
    batch = SegmentBatch(1024, stride=128)
    opts = TCPOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0))
    rounds = 200
    t0 = time.perf_counter()
    for i in range(rounds):
        batch.fill(1024, "192.0.2.1", "198.51.100.2", 40000, 443, seq=i, flags=Flags.SYN,
                   options=opts)
    rate = rounds * 1024 / (time.perf_counter() - t0)
    report["batched_syn_build_per_s"] = int(rate)
    echo("")
    echo("report")
    for key, value in report.items():
        echo(f"  {key:26} {value}")
    echo("all namespaces and nftables tables removed")
    return report
