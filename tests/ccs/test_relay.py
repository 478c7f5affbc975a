"""The CCS relay: joins two devices' connections with splice(2), 1 GiB intact,
tokens single use, quotas and caps enforced with a clear code."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading

import pytest

from fastpunch.ccs.relay import Relay
from fastpunch.client import NextInfo, RelayError

from .conftest import arun, rendezvous, running

INFO = NextInfo(port=40001, isn=1, nat="napt-random")


async def paired(deployment, addr):
    """Log cam and viewer in and rendezvous them. No reconnecting: a test that
    pairs them a second time replaces these logins, and reconnecting ones
    would replace the new ones back mid-rendezvous (a flake CI showed)."""
    a = deployment.device(addr, "cam", reconnect=False)
    b = deployment.device(addr, "viewer", reconnect=False)
    await a.login()
    await b.login()
    ra, rb, _ = await rendezvous(a, b, "viewer", INFO, INFO)
    return a, b, ra, rb


def enroll(deployment):
    deployment.enroll_pair()


def stream(sock: socket.socket, total: int, block: bytes, out: dict) -> None:
    """Send ``total`` bytes: the block with a chunk counter stamped in front."""
    h, sent, i = hashlib.sha256(), 0, 0
    sock.setblocking(True)
    while sent < total:
        chunk = struct.pack("!Q", i) + block[8:min(len(block), total - sent)]
        sock.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
        i += 1
    sock.shutdown(socket.SHUT_WR)
    out["sent"], out["digest"] = sent, h.hexdigest()


def drain(sock: socket.socket, out: dict) -> None:
    h, got = hashlib.sha256(), 0
    sock.setblocking(True)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        h.update(view[:n])
        got += n
    out["got"], out["digest"] = got, h.hexdigest()


def test_relay_carries_1_gib_intact_both_ways(deployment):
    enroll(deployment)
    total = 1 << 30

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
            block = os.urandom(1 << 20)
            res = {k: {} for k in ("a-sent", "b-got", "b-sent", "a-got")}
            threads = [threading.Thread(target=stream, args=(sa, total, block, res["a-sent"])),
                       threading.Thread(target=drain, args=(sb, res["b-got"])),
                       threading.Thread(target=stream, args=(sb, 1 << 24, block, res["b-sent"])),
                       threading.Thread(target=drain, args=(sa, res["a-got"]))]
            loop = asyncio.get_running_loop()
            for t in threads:
                t.start()
            for t in threads:
                await loop.run_in_executor(None, t.join, 100)
            sa.close()
            sb.close()
            for _ in range(50):
                if not server.relay.pairs:
                    break
                await asyncio.sleep(0.05)
            await a.close()
            await b.close()
            return res, server.relay.bytes_total, dict(server.relay.active), len(server.relay.pairs)

    res, relayed, active, pairs = arun(main(), timeout=200)
    assert res["a-sent"]["sent"] == res["b-got"]["got"] == total
    assert res["a-sent"]["digest"] == res["b-got"]["digest"]
    assert res["b-sent"]["digest"] == res["a-got"]["digest"] and res["a-got"]["got"] == 1 << 24
    assert relayed == total + (1 << 24)
    assert active == {} and pairs == 0                      # slots released after EOF


def test_tokens_are_single_use_and_must_be_known(deployment):
    enroll(deployment)

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            with pytest.raises(RelayError) as unknown:
                await a.relay(ra.__class__(**{**ra.__dict__, "relay_token": os.urandom(32)}))
            sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
            with pytest.raises(RelayError) as reused:
                await a.relay(ra)
            sa.close(), sb.close()
            await a.close(), await b.close()
            return unknown.value.code, reused.value.code

    assert arun(main()) == ("unknown-token", "unknown-token")


def test_a_malformed_hello_is_refused(deployment):
    enroll(deployment)

    async def main():
        server = deployment.server()
        async with running(server):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.relay_port)
            writer.write(b"HTTP" + b"x" * 32)
            status = await reader.read()
            writer.close()
            return status

    assert arun(main()) == bytes([6])          # BAD_HELLO, then closed


def test_a_peer_that_never_joins_times_out(deployment):
    enroll(deployment)

    async def main():
        server = deployment.server(relay=Relay(join_timeout=0.3))
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            with pytest.raises(RelayError) as err:
                await a.relay(ra)
            await a.close(), await b.close()
            return err.value.code, dict(server.relay.active)

    assert arun(main()) == ("peer-timeout", {})


def test_the_byte_quota_cuts_the_relay(deployment):
    enroll(deployment)
    quota = 4 << 20

    async def main():
        server = deployment.server(relay=Relay(quota_bytes=quota))
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
            res = {"a": {}, "b": {}}
            block = os.urandom(1 << 20)

            def send():
                try:
                    stream(sa, 64 << 20, block, res["a"])
                except OSError as exc:
                    res["a"]["error"] = exc

            threads = [threading.Thread(target=send), threading.Thread(target=drain, args=(sb, res["b"]))]
            for t in threads:
                t.start()
            loop = asyncio.get_running_loop()
            for t in threads:
                await loop.run_in_executor(None, t.join, 30)
            # the next relay for this device is refused outright
            a2, b2, ra2, rb2 = await paired(deployment, addr)
            with pytest.raises(RelayError) as err:
                await a2.relay(ra2)
            sa.close(), sb.close()
            for d in (a, b, a2, b2):
                await d.close()
            return res, err.value.code

    res, code = arun(main(), timeout=60)
    assert quota <= res["b"]["got"] < 64 << 20          # cut soon after the quota
    assert "error" in res["a"]
    assert code == "quota"


@pytest.mark.parametrize("cap", ["global", "device"])
def test_relay_caps(deployment, cap):
    enroll(deployment)

    async def main():
        relay = Relay(max_relays=1) if cap == "global" else Relay(per_device=1)
        server = deployment.server(relay=relay)
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
            a2, b2, ra2, rb2 = await paired(deployment, addr)
            with pytest.raises(RelayError) as err:
                await a2.relay(ra2)
            sa.close(), sb.close()
            for d in (a, b, a2, b2):
                await d.close()
            return err.value.code

    assert arun(main()) == ("relay-busy" if cap == "global" else "device-busy")



def test_expired_tickets_are_dropped_as_new_ones_are_issued():
    import time

    relay = Relay(token_ttl=0.05)
    old = relay.issue("cam", "viewer")
    assert set(old) <= set(relay.tickets)
    time.sleep(0.1)
    new = relay.issue("cam", "viewer")
    assert set(relay.tickets) == set(new)          # the expired pair is gone, the new one kept


def test_the_probe_port_reports_address_and_filtering(deployment, monkeypatch):
    """natcheck's two probes against a real CCS on loopback: the reflexive
    address, and the filtering verdict (nothing filters loopback: "open"); a
    node at its cap on concurrent filtering probes says busy ("unknown")."""
    from fastpunch.ccs import relay as relay_mod

    enroll(deployment)

    async def main():
        async with running(deployment.server()) as addr:
            dev = deployment.device(addr, "cam", reconnect=False)
            await dev.login()
            try:
                ip, port = await dev.whoami()
                assert ip == "127.0.0.1" and 0 < port < 65536
                assert await dev.filtering() == "open"
                monkeypatch.setattr(relay_mod, "MAX_FILTER_PROBES", 0)
                assert await dev.filtering() == "unknown"
            finally:
                await dev.close()

    arun(main())


def test_the_filtering_probe_sees_a_reset_and_a_drop(deployment):
    """The verdicts themselves, from the relay's side: nobody listening on the
    asker's port (its kernel resets) is "R"; an address that never answers
    would be "D" (tested in the lab, tests/punch/test_natcheck_predict.py)."""
    from fastpunch.ccs.relay import FILTERING

    enroll(deployment)

    async def main():
        server = deployment.server()
        async with running(server):
            loop = asyncio.get_running_loop()
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", server.relay_port))
            await loop.sock_sendall(s, FILTERING + bytes(32))
            verdict = await asyncio.wait_for(loop.sock_recv(s, 1), 5)
            s.close()
            return verdict

    assert arun(main()) == b"R"


def test_the_filtering_probe_waits_four_round_trips_within_bounds():
    from fastpunch.ccs.relay import FILTER_PROBE_MIN, FILTER_PROBE_SECONDS, filter_probe_seconds

    assert filter_probe_seconds(None) == FILTER_PROBE_SECONDS      # unknown: the whole wait
    assert filter_probe_seconds(0.0001) == FILTER_PROBE_MIN        # loopback: the floor
    assert filter_probe_seconds(0.1) == pytest.approx(0.4)         # 4 round trips
    assert filter_probe_seconds(2.0) == FILTER_PROBE_SECONDS       # never longer than before


def test_the_probe_reads_the_connections_round_trip_from_the_kernel():
    from fastpunch.ccs.relay import _rtt_seconds

    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        with socket.create_connection(lst.getsockname()) as c:
            conn, _ = lst.accept()
            with conn:
                rtt = _rtt_seconds(conn)        # sampled from the handshake
                assert rtt is not None and 0 < rtt < 0.05
    closed = socket.socket()
    closed.close()
    assert _rtt_seconds(closed) is None          # no kernel socket behind it


def test_a_side_refused_at_the_join_releases_the_side_waiting_for_it():
    """b already holds its one relay; its refused join to a's relay must
    tell a (waiting) "peer-gone" at once and free a's slot, not leave it
    waiting for the join timeout."""
    from fastpunch.ccs.relay import DEVICE_BUSY, MAGIC, PEER_GONE

    async def main():
        relay = Relay(per_device=1, join_timeout=20)
        port = await relay.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        socks = []

        async def join(token):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, MAGIC + token)
            socks.append(s)
            return s

        try:
            a1, b1 = relay.issue("a", "b")
            b2, c2 = relay.issue("b", "c")
            await join(b2)                          # b's one relay slot, waiting for c
            waiter = await join(a1)                 # a waits for b
            await asyncio.sleep(0.1)
            refused = await join(b1)                # b is at its cap
            assert await asyncio.wait_for(loop.sock_recv(refused, 1), 5) == bytes([DEVICE_BUSY])
            assert await asyncio.wait_for(loop.sock_recv(waiter, 1), 5) == bytes([PEER_GONE])
            await asyncio.sleep(0.05)
            assert relay.active == {"b": 1} and len(relay.pairs) == 1
        finally:
            for s in socks:
                s.close()
            await relay.close()

    arun(main(), 30)


def test_the_relay_gives_both_legs_the_nodes_keepalive(deployment):
    # an idle relayed stream keeps each leg's NAT entries; a leg whose device
    # vanished ends the pair instead of holding a slot (docs/liveness.md)
    from fastpunch import liveness

    enroll(deployment)

    async def main():
        server = deployment.server(keepalive=25)
        async with running(server) as addr:
            a, b, ra, rb = await paired(deployment, addr)
            assert a.advertised_keepalive == b.advertised_keepalive == 25
            assert a.keepalive == liveness.Keepalive(25)
            sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
            for _ in range(100):
                if server.relay.pairs and all(p.running for p in server.relay.pairs.values()):
                    break
                await asyncio.sleep(0.02)
            (pair,) = server.relay.pairs.values()
            legs = [(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                     s.getsockopt(socket.IPPROTO_TCP, liveness.TCP_KEEPIDLE),
                     s.getsockopt(socket.IPPROTO_TCP, liveness.TCP_USER_TIMEOUT))
                    for s in pair.socks]
            sa.close()
            sb.close()
            await a.close()
            await b.close()
            return legs

    assert arun(main()) == [(1, 25, 43_000)] * 2     # 25 + 3 probe intervals of 6 s


def test_an_out_of_range_advertised_keepalive_is_ignored_with_a_warning(deployment, caplog):
    # the CCS is trusted, but a misconfigured one must not break the device:
    # a period outside 1-3600 s is logged and the default used
    from fastpunch import liveness

    enroll(deployment)

    async def main():
        server = deployment.server()
        with pytest.raises(ValueError, match="whole seconds"):
            deployment.server(keepalive=0)            # a node refuses it in its settings
        server.keepalive = 0                          # what a broken node would send
        async with running(server) as addr:
            a = deployment.device(addr, "cam", reconnect=False)
            async with a:
                return a.advertised_keepalive, a.keepalive

    with caplog.at_level("WARNING", logger="fastpunch.client"):
        advertised, used = arun(main())
    assert advertised is None and used == liveness.DEFAULT
    assert any("keepalive period of 0 s" in r.getMessage() for r in caplog.records)


def test_a_node_advertises_the_keepalive_of_the_relay_it_was_given(deployment):
    from fastpunch.liveness import DEFAULT, Keepalive

    assert deployment.server().keepalive == DEFAULT.period
    assert deployment.server(relay=Relay(keepalive=Keepalive(30))).keepalive == 30
    assert deployment.server(relay=Relay(keepalive=None)).keepalive is None
    server = deployment.server(relay=Relay(keepalive=Keepalive(30)), keepalive=12)
    assert server.keepalive == 12 and server.relay.keepalive == Keepalive(12)
