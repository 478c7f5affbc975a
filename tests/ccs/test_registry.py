"""Several CCS nodes sharing presence through a real redis-server: devices
spread over two nodes rendezvous (both orders), and when a node dies its
devices reconnect to the other and carry on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastpunch.ccs.registry import RedisRegistry
from fastpunch.client import NextInfo

from .conftest import answer_one, arun, free_port, rendezvous, running, standing_info

A = NextInfo(port=40001, isn=7, nat="nat")
B = NextInfo(port=40002, isn=9, nat="nat-rst")



@pytest.mark.parametrize("order", ["peer-connected", "peer-later"])
def test_rendezvous_across_two_nodes(deployment, redis_url, order):
    deployment.enroll_pair()

    async def main():
        n1 = deployment.server(registry=RedisRegistry(redis_url, "node-1"))
        n2 = deployment.server(registry=RedisRegistry(redis_url, "node-2"))
        async with running(n1) as addr1, running(n2) as addr2:
            async with deployment.device(addr1, "cam") as a:
                if order == "peer-connected":
                    async with deployment.device(addr2, "viewer") as b:
                        await asyncio.sleep(0.1)          # presence reaches redis
                        ra, rb, peer = await rendezvous(a, b, "viewer", A, B)
                else:
                    asking = asyncio.create_task(a.rendezvous("viewer", A))
                    await asyncio.sleep(0.3)
                    assert not asking.done()
                    async with deployment.device(addr2, "viewer") as b:
                        peer, rb = await answer_one(b, B)
                        ra = await asking
                assert (a.node, b.node) == ("node-1", "node-2")
        return ra, rb, peer, n1.metrics.rendezvous_ok

    ra, rb, peer, ok = arun(main())
    assert peer == "cam" and ra.key == rb.key and ra.isn == B.isn and rb.isn == A.isn
    assert ra.start_at == rb.start_at and ra.plan == rb.plan
    assert ra.relay_port == rb.relay_port and ra.relay_token != rb.relay_token
    assert ok == 1                                 # completed on the requester's node


def test_relay_between_devices_on_two_nodes(deployment, redis_url):
    deployment.enroll_pair()

    async def main():
        n1 = deployment.server(registry=RedisRegistry(redis_url, "node-1"))
        n2 = deployment.server(registry=RedisRegistry(redis_url, "node-2"))
        loop = asyncio.get_running_loop()
        async with running(n1) as addr1, running(n2) as addr2:
            async with deployment.device(addr1, "cam") as a, \
                    deployment.device(addr2, "viewer") as b:
                await asyncio.sleep(0.1)
                ra, rb, _ = await rendezvous(a, b, "viewer", A, B)
                sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
                await loop.sock_sendall(sa, b"hello over the relay")
                sa.shutdown(1)
                got = b""
                while chunk := await loop.sock_recv(sb, 100):
                    got += chunk
                sa.close(), sb.close()
        return got

    assert arun(main()) == b"hello over the relay"


def serve(deployment, redis_url, node, tmp_path):
    ready = tmp_path / f"{node}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpunch", "ccs", "serve", "--dir", deployment.dir,
         "--listen", f"127.0.0.1:{free_port()}", "--relay-port", "0", "--probe-port", "0", "--redis", redis_url,
         "--node", node, "--heartbeat", "2", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"ccs serve {node} did not start: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return proc, (info["host"], info["port"])


def test_killing_a_node_moves_its_devices_to_the_other(deployment, redis_url, tmp_path):
    deployment.enroll_pair()
    p1, addr1 = serve(deployment, redis_url, "node-1", tmp_path)
    p2, addr2 = serve(deployment, redis_url, "node-2", tmp_path)
    try:
        async def main():
            async with deployment.device([addr1, addr2], "cam") as a, \
                    deployment.device([addr2, addr1], "viewer") as b:
                assert (a.node, b.node) == ("node-1", "node-2")
                os.kill(p1.pid, signal.SIGKILL)             # node-1 dies, no goodbye
                p1.wait(10)
                deadline = time.monotonic() + 15
                while not (a.connected and a.node == "node-2"):
                    assert time.monotonic() < deadline, "cam did not fail over"
                    await asyncio.sleep(0.05)
                assert a.connections == 2
                ra, rb, _ = await rendezvous(a, b, "viewer", A, B)
                return ra.key == rb.key

        assert arun(main(), timeout=60)
    finally:
        for p in (p1, p2):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        assert p2.returncode == 0, p2.stderr.read().decode()[-2000:]


def test_a_dead_nodes_devices_are_not_located_there(deployment, redis_url):
    async def main():
        reg = RedisRegistry(redis_url, "node-x", node_ttl=0.6)
        other = RedisRegistry(redis_url, "node-y")

        async def nothing(msg):
            pass

        await reg.start(nothing, lambda n: False)
        await other.start(nothing, lambda n: False)
        await reg.online("cam")
        assert await other.locate("cam") == "node-x"
        assert await other.send("node-x", {"op": "noop"})
        for t in reg._tasks:                              # the node stops refreshing (dies)
            t.cancel()
        await asyncio.sleep(1.0)
        located = await other.locate("cam")
        await reg.offline("cam")
        await other.close()
        await reg.close()
        return located

    assert arun(main()) is None


def test_hostile_registry_messages_do_not_stop_the_node(deployment, redis_url):
    deployment.enroll_pair()

    async def main():
        import redis.asyncio as aioredis

        n1 = deployment.server(registry=RedisRegistry(redis_url, "node-1"))
        n2 = deployment.server(registry=RedisRegistry(redis_url, "node-2"))
        r = aioredis.from_url(redis_url)
        async with running(n1) as addr1, running(n2) as addr2:
            for junk in (b"not json", b"[1,2]", b'{"op": "offer"}', b'{"op": "martian"}'):
                await r.publish("fastpunch:to:node-2", junk)
            await asyncio.sleep(0.2)
            async with deployment.device(addr1, "cam") as a, \
                    deployment.device(addr2, "viewer") as b:
                await asyncio.sleep(0.1)
                ra, _, _ = await rendezvous(a, b, "viewer", A, B)
        await r.aclose()
        return ra.peer

    assert arun(main()) == "viewer"


def test_session_keys_cross_the_registry_sealed(deployment, redis_url):
    """What a Redis eavesdropper sees of a cross-node rendezvous holds no
    session key; a node configured without the cluster key refuses to start."""
    deployment.enroll_pair()

    async def main():
        import redis.asyncio as aioredis

        spy = aioredis.from_url(redis_url).pubsub()
        await spy.psubscribe("fastpunch:*")
        n1 = deployment.server(registry=RedisRegistry(redis_url, "node-1"))
        n2 = deployment.server(registry=RedisRegistry(redis_url, "node-2"))
        async with running(n1) as addr1, running(n2) as addr2:
            async with deployment.device(addr1, "cam") as a, \
                    deployment.device(addr2, "viewer") as b:
                await asyncio.sleep(0.1)
                ra, rb, _ = await rendezvous(a, b, "viewer", A, B)
        seen = []
        while (item := await spy.get_message(timeout=0.2)) is not None:
            if item["type"] == "pmessage":
                seen.append(item["data"])
        await spy.aclose()
        return ra, seen

    ra, seen = arun(main())
    assert any(b'"op": "ready"' in m for m in seen)
    for m in seen:
        assert ra.key.hex().encode() not in m and ra.key not in m
    with pytest.raises(ValueError, match="cluster key"):
        deployment.server(registry=RedisRegistry(redis_url, "node-3"), cluster_key=None)


def test_standing_info_is_used_on_the_peers_node(deployment, redis_url):
    """The offer reaches the viewer's node through redis; that node answers
    it from the viewer's standing info, and both sides get the same key."""
    deployment.enroll_pair()

    async def main():
        n1 = deployment.server(registry=RedisRegistry(redis_url, "node-1"))
        n2 = deployment.server(registry=RedisRegistry(redis_url, "node-2"))
        async with running(n1) as addr1, running(n2) as addr2:
            async with deployment.device(addr1, "cam") as a, \
                    deployment.device(addr2, "viewer", standing=True, nat="nat") as b:
                standing = await standing_info(n2, "viewer")
                assert standing is not None
                ra = await a.rendezvous("viewer", A)
                offer = await asyncio.wait_for(b.incoming().__anext__(), 5)
        return ra, offer, standing

    ra, offer, standing = arun(main())
    assert offer.ready is not None and offer.ready.key == ra.key
    assert (ra.port, ra.isn) == (standing.port, standing.isn) and offer.ready.isn == A.isn
