"""Raw receivers are non-blocking descriptors an event loop can watch."""

import asyncio

import pytest

from fastpunch import netfilter
from fastpunch._netns import inside
from fastpunch.packet import RawReceiver, RawSender, build, parse

pytestmark = pytest.mark.live


def test_raw_receiver_wakes_an_asyncio_loop_via_add_reader(veth):
    with inside(veth.ns_b):
        rx = RawReceiver(src=veth.addr_a, dst=veth.addr_b, sport=42000, dport=9)
        guard = netfilter.suppress_rsts([netfilter.RstSuppression(9)])

    async def main():
        loop = asyncio.get_running_loop()
        got: list = []
        done = asyncio.Event()

        def readable():
            got.extend(parse(d) for d in rx.recv_many())
            if len(got) >= 10:
                done.set()

        loop.add_reader(rx.fileno(), readable)
        try:
            with inside(veth.ns_a), RawSender() as tx:
                for i in range(10):
                    tx.send(build(veth.addr_a, veth.addr_b, 42000, 9, seq=i))
                    await asyncio.sleep(0.01)   # the loop keeps running between sends
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.remove_reader(rx.fileno())
        return got

    with inside(veth.ns_b), guard, rx:
        got = asyncio.run(main())
    assert [s.seq for s in got] == list(range(10))
