"""The CCS over real TLS on loopback: enrollment, authentication, ACL,
rendezvous in both orders, hostile clients, presence, reconnects, metrics."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from fastpunch.ccs import metrics, pki
from fastpunch.client import AuthenticationError, CCSError, NextInfo, RendezvousRefusedError
from fastpunch.credentials import client_context
from fastpunch.proto import wire
from fastpunch.proto.connection import Connection, Role, State

from .conftest import answer_one, arun, rendezvous, running, standing_info

A_INFO = NextInfo(port=40001, isn=0x11111111, nat="nat", mss=1400, wscale=6)
B_INFO = NextInfo(port=40002, isn=0x22222222, nat="napt-random", timestamps=False, wscale=None)



def test_auth_and_reflexive_address(deployment):
    deployment.enroll("cam")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as dev:
                local = dev._writer.get_extra_info("sockname")
                assert dev.public_addr == (local[0], local[1])       # what the CCS saw
                assert dev.node == server.node and server.connected == 1
            await asyncio.sleep(0.05)
            assert server.connected == 0

    arun(main())


@pytest.mark.parametrize("who", ["wrong-key", "unknown-device"])
def test_bad_credentials_are_refused_and_the_server_serves_others(deployment, who):
    deployment.enroll("cam")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            name, key = ("cam", os.urandom(32)) if who == "wrong-key" else ("ghost", os.urandom(32))
            with pytest.raises(AuthenticationError) as err:
                async with deployment.device(addr, name, key):
                    pass
            assert err.value.code == "auth-failed"
            assert server.metrics.auth_failures == 1 and server.connected == 0
            async with deployment.device(addr, "cam"):
                assert server.connected == 1

    arun(main())


def test_the_device_pins_the_deployment_ca(deployment, tmp_path):
    deployment.enroll("cam")
    other = pki.init(str(tmp_path / "other"))

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            dev = deployment.device(addr, "cam")
            dev.ca_file = other["ca"]
            with pytest.raises(CCSError) as err:
                await dev.login()
            assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)

    arun(main())


def test_rendezvous_peer_already_connected(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, deployment.device(addr, "viewer") as b:
                ra, rb, peer = await rendezvous(a, b, "viewer", A_INFO, B_INFO)
        assert peer == "cam"
        assert (ra.role, rb.role) == ("initiator", "responder")
        assert ra.key == rb.key and len(ra.key) == 32
        assert ra.plan == rb.plan and ra.plan[-1] == "relay" and ra.start_at == rb.start_at
        assert (ra.peer, ra.port, ra.isn, ra.mss, ra.timestamps, ra.wscale, ra.nat) == \
            ("viewer", 40002, 0x22222222, 1460, False, None, "napt-random")
        assert (rb.peer, rb.port, rb.isn, rb.mss, rb.wscale, rb.nat) == \
            ("cam", 40001, 0x11111111, 1400, 6, "nat")
        assert ra.addr == rb.addr == "127.0.0.1"
        assert ra.relay_token != rb.relay_token
        assert server.metrics.rendezvous_ok == 1

    arun(main())


GUESSING = (NextInfo(port=40001, isn=1, nat="napt-sequential", mapping="sequential"),
            NextInfo(port=40002, isn=2, nat="napt-random", mapping="random"))


@pytest.mark.parametrize("b_protocol,asked,infos,want", [
    (wire.VERSION, True, (A_INFO, B_INFO), True),
    (wire.VERSION, False, (A_INFO, B_INFO), None),
    (3, True, (A_INFO, B_INFO), None),
    (wire.VERSION, "auto", (A_INFO, B_INFO), None),      # no evidence of a slow punch
    (wire.VERSION, "auto", GUESSING, True),              # guessing on both sides
], ids=["both-v4", "not-asked", "peer-v3", "auto-punch", "auto-relay"])
def test_relay_first_is_said_to_both_sides_when_both_speak_it(deployment, b_protocol, asked,
                                                              infos, want):
    # a peer whose protocol has no relay-first would punch its plan out and
    # join the relay last: the CCS tells the asker "no", and it punches too
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, \
                    deployment.device(addr, "viewer", protocol=b_protocol) as b:
                ra, rb, _ = await rendezvous(a, b, "viewer", *infos, relay_first=asked)
                assert b.protocol == b_protocol
        assert ra.relay_first is want
        assert rb.relay_first is want

    arun(main())


def test_a_relay_first_mode_the_ccs_does_not_know_is_refused(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a:
                request = 7
                fut = asyncio.get_running_loop().create_future()
                a._requests[request] = fut
                a._send(wire.RendezvousRequest(request=request, peer="viewer",
                                               **A_INFO.fields(), relay_first="maybe"))
                return await asyncio.wait_for(fut, 5)
                # (the device's own API refuses such a value before sending it)

    answer = arun(main())
    assert isinstance(answer, wire.RendezvousRefused), answer
    assert answer.code == "bad-info" and "relay_first" in answer.reason


def test_rendezvous_waits_for_a_peer_that_connects_later(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a:
                asking = asyncio.create_task(a.rendezvous("viewer", A_INFO))
                await asyncio.sleep(0.3)
                assert not asking.done() and "viewer" in server.waiting
                async with deployment.device(addr, "viewer") as b:
                    peer, rb = await answer_one(b, B_INFO)
                    ra = await asking
        assert peer == "cam" and ra.key == rb.key and ra.isn == B_INFO.isn
        assert not server.waiting and not server.pending

    arun(main())


def test_a_peer_that_never_comes_is_refused_after_the_timeout(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server(rendezvous_timeout=0.5)
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a:
                with pytest.raises(RendezvousRefusedError) as err:
                    await a.rendezvous("viewer", A_INFO)
        assert err.value.code == "peer-offline" and not server.pending and not server.waiting

    arun(main())


@pytest.mark.parametrize("peer,code", [("stranger", "not-authorized"), ("cam", "self"),
                                       ("nobody", "not-authorized")])
def test_the_acl_refuses_with_a_reason(deployment, peer, code, caplog):
    deployment.enroll_pair()
    deployment.enroll("stranger")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, \
                    deployment.device(addr, "stranger") as s:
                with pytest.raises(RendezvousRefusedError) as err:
                    await a.rendezvous(peer, A_INFO)
                assert err.value.code == code
                # the refused device and everyone else carry on
                other = asyncio.create_task(answer_one(a, B_INFO))
                if peer == "stranger":
                    with pytest.raises(RendezvousRefusedError):
                        await s.rendezvous("cam", B_INFO)
                other.cancel()
                assert a.connected and s.connected
        assert server.metrics.rendezvous_refused[code] >= 1

    with caplog.at_level("INFO", logger="fastpunch.ccs"):
        arun(main())
    assert any('"rendezvous-refused"' in r.message and code in r.message for r in caplog.records)


async def raw_client(addr, ca):
    ctx = client_context(ca)
    reader, writer = await asyncio.open_connection(*addr, ssl=ctx, server_hostname="localhost")
    return reader, writer


async def raw_login(addr, deployment, name):
    """Log in with the bare machine (no Device: no heartbeats, no checks)."""
    reader, writer = await raw_client(addr, deployment.ca)
    m = Connection(Role.CLIENT)
    writer.write(m.hello(name, deployment.keys[name], os.urandom))
    while m.state is not State.READY:
        m.receive_data(await reader.read(65536))
        while isinstance(ev := m.next_event(), wire.Message):
            if isinstance(ev, wire.Challenge):
                writer.write(m.respond())
    return reader, writer, m


async def read_error(reader) -> wire.Error:
    buf = bytearray()
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            raise AssertionError("closed without an Error frame")
        buf += data
        msg = wire.decode_frame(buf)
        while msg is not None and not isinstance(msg, wire.Error):
            msg = wire.decode_frame(buf)
        if isinstance(msg, wire.Error):
            return msg


HOSTILE = {
    "garbage": (b"GET / HTTP/1.1\r\n\r\n", "bad-version"),
    "oversized": (bytes([1, 1, 0xFF, 0xFF]), "frame-too-large"),
    "unknown-type": (bytes([1, 99, 0, 0]), "unknown-type"),
    "unauthenticated-request": (wire.encode(wire.RendezvousRequest(
        request=1, peer="viewer", **A_INFO.fields())), "unauthenticated"),
    "server-message": (wire.encode(wire.Challenge(b"x" * 32)), "out-of-order"),
    "short-nonce": (wire.encode(wire.Hello("cam", b"x" * 5)), "bad-nonce"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_clients_get_an_error_code_and_the_server_stays_up(deployment, case):
    deployment.enroll_pair()
    data, code = HOSTILE[case]

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "viewer") as b:
                reader, writer = await raw_client(addr, deployment.ca)
                writer.write(data)
                err = await read_error(reader)
                assert err.code == code
                assert await asyncio.wait_for(reader.read(), 5) == b""     # and it hangs up
                writer.close()
                # the server still serves everyone else
                async with deployment.device(addr, "cam") as a:
                    await rendezvous(a, b, "viewer", A_INFO, B_INFO)
        assert server.metrics.protocol_errors == 1

    arun(main())


def test_answering_an_offer_that_was_never_made(deployment):
    deployment.enroll("cam")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            reader, writer, m = await raw_login(addr, deployment, "cam")
            writer.write(m.send(wire.RendezvousAnswer(request=4242, **B_INFO.fields())))
            err = await read_error(reader)
            assert err.code == "unknown-request"
            writer.close()

    arun(main())


def test_a_silent_device_is_dropped_as_dead(deployment):
    deployment.enroll("cam")

    async def main():
        server = deployment.server(heartbeat=1)
        async with running(server) as addr:
            reader, writer, _ = await raw_login(addr, deployment, "cam")
            assert server.connected == 1
            err = await asyncio.wait_for(read_error(reader), 6)     # 3 missed heartbeats
            assert err.code == "dead-peer" and server.connected == 0
            writer.close()

    arun(main())


def test_a_device_that_heartbeats_stays(deployment):
    deployment.enroll("cam")

    async def main():
        server = deployment.server(heartbeat=1)
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as dev:
                await asyncio.sleep(4.5)
                assert server.connected == 1 and dev.connections == 1

    arun(main())


def test_reconnect_after_a_ccs_restart(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        addr = await server.start("127.0.0.1", 0)
        a = deployment.device(addr, "cam")
        b = deployment.device(addr, "viewer")
        await a.login()
        await b.login()
        await server.close()                                  # the CCS goes away
        await asyncio.sleep(0.2)
        assert not a.connected and not b.connected
        with pytest.raises(CCSError) as err:
            await a.rendezvous("viewer", A_INFO)
        assert err.value.code == "disconnected"
        await asyncio.sleep(0.5)                              # a few backoff rounds in vain
        server2 = deployment.server()
        async with running(server2, port=addr[1]):
            await a.wait_connected(10)
            await b.wait_connected(10)
            assert a.connections == b.connections == 2
            ra, rb, _ = await rendezvous(a, b, "viewer", A_INFO, B_INFO)
            assert rb.key == ra.key
        await a.close()
        await b.close()

    arun(main())


def test_a_second_login_replaces_the_first(deployment):
    deployment.enroll("cam")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            first = deployment.device(addr, "cam", reconnect=False)
            await first.login()
            async with deployment.device(addr, "cam"):
                await asyncio.sleep(0.2)
                assert not first.connected and server.connected == 1
                with pytest.raises(CCSError) as err:
                    async for _ in first.incoming():
                        pass
                assert err.value.code == "replaced"
            await first.close()

    arun(main())


def test_metrics_endpoint(deployment):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            mserver = await metrics.serve(server, "127.0.0.1", 0)
            mport = mserver.sockets[0].getsockname()[1]
            async with deployment.device(addr, "cam") as a, deployment.device(addr, "viewer") as b:
                await rendezvous(a, b, "viewer", A_INFO, B_INFO)
                with pytest.raises(AuthenticationError):
                    await deployment.device(addr, "cam", os.urandom(32)).login()
                reader, writer = await asyncio.open_connection("127.0.0.1", mport)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                text = (await reader.read()).decode()
                writer.close()
            mserver.close()
        head, body = text.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 200")
        from prometheus_client.parser import text_string_to_metric_families

        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(body) for s in family.samples}
        node = ("node", server.node)
        assert values["fastpunch_ccs_connected_devices", (node,)] == 2
        assert values["fastpunch_ccs_rendezvous_total", (node, ("result", "ok"))] == 1
        assert values["fastpunch_ccs_auth_failures_total", (node,)] == 1
        assert values["fastpunch_ccs_rendezvous_seconds_bucket", (("le", "+Inf"), node)] == 1
        assert values["fastpunch_ccs_relay_bytes_total", (node,)] == 0

    arun(main())


def test_standing_info_answers_the_offer_one_round_trip_sooner(deployment):
    """A device that accepts can announce its next-connection info ahead:
    the CCS answers the next offer with it at once (no RendezvousOffer goes
    out), the device learns of it from its Ready, and announces a fresh one."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, \
                    deployment.device(addr, "viewer", standing=True, nat="nat") as b:
                first = await standing_info(server, "viewer")
                assert first is not None and first.nat == "nat"
                ra = await a.rendezvous("viewer", A_INFO)
                offer = await asyncio.wait_for(b.incoming().__anext__(), 5)
                assert (offer.peer, offer.request) == ("cam", 0) and offer.ready is not None
                assert (ra.port, ra.isn) == (first.port, first.isn) == \
                    (offer.info.port, offer.info.isn)
                assert offer.ready.key == ra.key and offer.ready.start_at == ra.start_at
                assert offer.ready.isn == A_INFO.isn and offer.ready.role == "responder"
                with pytest.raises(CCSError) as err:
                    await offer.answer(B_INFO)
                assert err.value.code == "already-answered"
                second = await standing_info(server, "viewer", other_than=first)   # the next
                assert second is not None and second.isn != first.isn
                # and serves the next rendezvous
                ra2 = await a.rendezvous("viewer", A_INFO)
                assert ra2.isn == second.isn
        assert server.metrics.rendezvous_ok == 2

    arun(main())


def test_without_standing_info_the_peer_is_asked(deployment):
    """A device that announced nothing (the default) gets a RendezvousOffer
    and answers with the info it chooses then."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, \
                    deployment.device(addr, "viewer") as b:
                assert server.sessions["viewer"].standing is None
                ra, rb, peer = await rendezvous(a, b, "viewer", A_INFO, B_INFO)
        assert ra.isn == B_INFO.isn and rb.request != 0

    arun(main())


def test_the_spoof_assist_holds_a_bounded_number_of_tables(deployment, caplog):
    """Each spoof plan makes the CCS keep one nftables table for the plan's
    length; past the cap it goes without (and says so) rather than piling
    up tables under load."""
    from fastpunch.ccs import server as server_mod

    server = deployment.server()
    server._assists = {object() for _ in range(server_mod.MAX_SPOOF_ASSISTS)}
    with caplog.at_level("INFO", logger="fastpunch.ccs"):
        server._assist_spoof((("192.0.2.10", 40001), ("192.0.2.20", 40002)), 0.05)
    assert len(server._assists) == server_mod.MAX_SPOOF_ASSISTS
    assert "spoof-assist-busy" in caplog.text


def test_an_abandon_with_a_long_reason_still_reaches_the_peer(deployment):
    """The CCS tells the peer "NAME gave up: CODE: REASON": with a long
    name and a reason at its cap in non-ASCII bytes that text overflowed
    PeerLeft's field, the encoder refused it and the peer never heard."""
    cam = "c" * 64
    deployment.enroll(cam, "viewer")
    deployment.enroll("viewer")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, cam) as a, deployment.device(addr, "viewer") as b:
                ra, rb, _ = await rendezvous(a, b, "viewer", A_INFO, B_INFO)
                assert ra.session == rb.session and ra.session
                a._send(wire.Abandon(ra.session, "x" * 32, wire.fit("é" * 200)))
                for _ in range(100):
                    if rb.session in b._left_early:
                        break
                    await asyncio.sleep(0.02)
                assert rb.session in b._left_early

    arun(main())


def test_text_is_cut_to_a_field_in_bytes():
    assert wire.fit("é" * 200) == "é" * 128 and len(wire.fit("é" * 200).encode()) == 256
    assert wire.fit("ok") == "ok" and wire.fit("a€b", 3) == "a"


def test_a_peer_gone_before_its_ready_is_reported_to_the_asker(deployment):
    """Across nodes, B can leave between its answer and the Ready its node
    should hand it: its node tells A's node, and A hears PeerLeft."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a:
                for _ in range(100):                      # logged in on the server side
                    if "cam" in server.sessions:
                        break
                    await asyncio.sleep(0.01)
                server._track(77, "cam", "viewer", server.node)
                await server.handle({"op": "ready", "b": "viewer", "origin": server.node,
                                     "fields": {"session": 77, "peer": "cam"}})
                for _ in range(100):
                    if 77 in a._left_early:
                        break
                    await asyncio.sleep(0.02)
                assert 77 in a._left_early and 77 not in server.active

    arun(main())


def test_standing_info_the_ccs_no_longer_holds_lets_its_port_go(deployment):
    """A standing announcement holds a reserved port (and, crafting, a RST
    guard, a gateway mapping): a reconnect, which starts a session holding
    none, releases it; only the fresh announcement's port stays taken."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        addr = await server.start("127.0.0.1", 0)
        b = deployment.device(addr, "viewer", standing=True, nat="nat")
        await b.login()
        assert await standing_info(server, "viewer") is not None
        assert len(b.gatherer._out) == 1
        await server.close()
        server2 = deployment.server()
        async with running(server2, port=addr[1]):
            await b.wait_connected(10)
            assert await standing_info(server2, "viewer") is not None
            for _ in range(50):
                if len(b.gatherer._out) == 1:
                    break
                await asyncio.sleep(0.02)
            assert len(b.gatherer._out) == 1
        await b.close()
        assert not b.gatherer._out

    arun(main())


def test_a_standing_offer_from_a_peer_not_accepted_is_abandoned(deployment):
    """accept(peer=X) skips an offer the CCS answered ahead for someone
    else: that someone, already Ready and punching, is told at once."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            async with deployment.device(addr, "cam") as a, \
                    deployment.device(addr, "viewer", standing=True, nat="nat") as b:
                assert await standing_info(server, "viewer") is not None
                accepting = asyncio.create_task(b.accept(peer="someone-else"))
                ra = await a.rendezvous("viewer", A_INFO)
                for _ in range(100):
                    if ra.session in a._left_early:
                        break
                    await asyncio.sleep(0.02)
                assert ra.session in a._left_early
                accepting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await accepting

    arun(main())


@pytest.mark.parametrize("old_version", [1, 2])
def test_a_device_falls_back_to_the_old_ccs_version_per_login_not_for_good(deployment,
                                                                            old_version):
    """In front of the real CCS, a TLS front that plays an old CCS to newer
    Hellos (an Error in its own version, as an old decoder answers) and
    passes sessions of its version through: the device logs in speaking
    that version (not always 1: a version-2 CCS keeps the candidates), and
    after the session drops its next login tries the newest again (a
    rolling upgrade must not pin it)."""
    from fastpunch.ccs import pki as ccs_pki

    deployment.enroll_pair()
    hellos = []

    async def main():
        server = deployment.server()
        async with running(server) as real:
            client_ctx = client_context(deployment.ca)
            links = []

            async def front(reader, writer):
                head = await reader.readexactly(4)
                hellos.append(head[0])
                if head[0] != old_version:
                    writer.write(wire.encode(wire.Error("bad-version",
                                                        f"this CCS speaks {old_version}"),
                                             old_version))
                    await writer.drain()
                    writer.close()
                    return
                up_r, up_w = await asyncio.open_connection(*real, ssl=client_ctx,
                                                           server_hostname="localhost")
                up_w.write(head)

                async def pipe(r, w):
                    try:
                        while data := await r.read(65536):
                            w.write(data)
                            await w.drain()
                    except (ConnectionError, OSError):
                        pass
                    finally:
                        w.close()
                links.append(asyncio.gather(pipe(reader, up_w), pipe(up_r, writer)))

            old = await asyncio.start_server(front, "127.0.0.1", 0,
                                             ssl=ccs_pki.server_context(deployment.dir))
            addr = old.sockets[0].getsockname()[:2]
            async with deployment.device(addr, "cam") as a:
                assert a.connected and a._machine.version == old_version
                assert hellos == [wire.VERSION, old_version]
                server.sessions["cam"].close("test", "dropped")      # the session drops
                for _ in range(200):
                    if len(hellos) >= 4 and a.connected:
                        break
                    await asyncio.sleep(0.02)
                assert hellos[2:4] == [wire.VERSION, old_version]
                assert a.protocol == wire.VERSION
            old.close()
            for link in links:
                link.cancel()

    arun(main())
