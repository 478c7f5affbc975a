"""Raw sends into a veth pair: sendmmsg batches beside one sendto per segment.

The receiving namespace drops IPv4 at ingress (netdev hook; ARP still
passes so the sender can resolve it) so its kernel spends nothing answering;
a counter there proves every segment arrived. Traffic stays inside the two namespaces this module creates."""

from __future__ import annotations

import array
import re
import select
import time

import pytest

from fastpunch import netfilter
from fastpunch._netns import VethPair, inside
from fastpunch.packet import Flags, RawSender, SegmentBatch, TCPOptions

BATCH = 1024
ROUNDS_LIMIT_S = 10          # every send loop is bounded in time as well as count


@pytest.fixture(scope="module")
def path():
    require_root("the raw-send benchmark")
    with VethPair() as pair:
        nft = netfilter.Nftables()
        sink = netfilter.Table(netfilter.owned_table_name("sink"), (netfilter.Chain(
            "drop_ip", "ingress", ("meta protocol ip counter drop",), device=pair.if_b),),
            family="netdev")
        with inside(pair.ns_b), netfilter.ScopedTable(sink, nft):
            with inside(pair.ns_a):
                tx = RawSender(sndbuf=8 << 20)
            with tx:
                yield pair, tx, sink, nft


def require_root(what):
    from tests.conftest import require_root as check

    check(what)


def counted(pair, sink, nft) -> int:
    with inside(pair.ns_b):
        text = nft.run(f"list table netdev {sink.name}")
    return int(re.search(r"counter packets (\d+)", text).group(1))


def syn_batch(pair) -> SegmentBatch:
    batch = SegmentBatch(BATCH, stride=128)
    batch.fill(BATCH, pair.addr_a, pair.addr_b, 40000, 0, flags=Flags.SYN,
               options=TCPOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0)),
               dports=array.array("H", range(1024, 1024 + BATCH)))
    return batch


def send_all(tx, batch, batched: bool) -> int:
    sent, deadline = 0, time.monotonic() + ROUNDS_LIMIT_S
    send = tx.send_batch if batched else tx.send_each
    while sent < len(batch) and time.monotonic() < deadline:
        try:
            sent += send(batch, sent)
        except BlockingIOError:
            select.select([], [tx], [], 0.01)
    return sent


@pytest.mark.parametrize("batched", [True, False], ids=["sendmmsg", "sendto"])
def test_raw_send_into_veth(benchmark, path, batched):
    pair, tx, sink, nft = path
    benchmark.group = "raw-send"
    batch = syn_batch(pair)
    before = counted(pair, sink, nft)
    calls = []
    benchmark.pedantic(lambda: calls.append(send_all(tx, batch, batched)), rounds=30,
                       iterations=1, warmup_rounds=2)
    arrived = counted(pair, sink, nft) - before
    benchmark.extra_info.update(correct=all(c == BATCH for c in calls) and
                                arrived == BATCH * len(calls), segments_per_call=BATCH)
