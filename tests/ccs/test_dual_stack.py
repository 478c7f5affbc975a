"""A dual-stack CCS on loopback: one listener on "::" serves devices over
IPv4 and IPv6 alike, tells each its reflexive address in its own family
(never the ::ffff: spelling), names its address in the other family, learns
a device's other-family address from a token-carrying probe (and only from
one), gives each side of a rendezvous the relay in its own family, and
relays between the two families."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fastpunch.client import AuthenticationError, NextInfo
from fastpunch.netcheck import probes
from fastpunch.proto import wire

from .conftest import arun, rendezvous

A_INFO = NextInfo(port=40001, isn=1, nat="nat")
B_INFO = NextInfo(port=40002, isn=2, nat="nat")


def _v6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:          # a failure, not a skip: CI's hosts have ::1
        pytest.fail(f"this test needs IPv6 loopback (::1): {exc}")


async def _dual(deployment):
    server = deployment.server(public_addr="127.0.0.1", public_addr6="::1")
    _, port = await server.start("::", 0, 0)
    return server, port


def test_devices_log_in_over_either_family_and_meet_at_the_relay(deployment):
    _v6_loopback()
    deployment.enroll_pair()

    async def main():
        server, port = await _dual(deployment)
        try:
            async with deployment.device(("127.0.0.1", port), "cam") as a, \
                    deployment.device(("::1", port), "viewer") as b:
                assert (a.public_addr[0], a.ccs_alt_addr) == ("127.0.0.1", "::1")
                assert (b.public_addr[0], b.ccs_alt_addr) == ("::1", "127.0.0.1")
                assert server.sessions["cam"].peer[0] == "127.0.0.1"       # not ::ffff:
                assert len(a.probe_token) == len(b.probe_token) == wire.PROBE_TOKEN
                ra, rb, _ = await rendezvous(a, b, "viewer", A_INFO, B_INFO)
                # each is told the other's address, and the relay's, in its own family
                assert (ra.addr, ra.relay_addr) == ("::1", "127.0.0.1")
                assert (rb.addr, rb.relay_addr) == ("127.0.0.1", "::1")
                sa, sb = await asyncio.gather(a.relay(ra), b.relay(rb))
                assert (sa.family, sb.family) == (socket.AF_INET, socket.AF_INET6)
                loop = asyncio.get_running_loop()
                try:
                    await loop.sock_sendall(sa, b"across families")
                    got = b""
                    while len(got) < 15:
                        got += await asyncio.wait_for(loop.sock_recv(sb, 64), 5)
                    assert got == b"across families"
                finally:
                    sa.close(), sb.close()
        finally:
            await server.close()

    arun(main())


def test_a_probe_with_a_token_tells_the_ccs_the_other_family_and_no_other_does(deployment):
    _v6_loopback()
    deployment.enroll("cam")

    async def main():
        server, port = await _dual(deployment)
        try:
            async with deployment.device(("127.0.0.1", port), "cam") as a:
                session = server.sessions["cam"]
                assert session.seen == {4: "127.0.0.1"}
                # no token, a wrong one: the address is answered, nothing recorded
                assert (await probes.whoami("::1", a.probe_port))[0] == "::1"
                await probes.whoami("::1", a.probe_port, token=bytes(16))
                await probes.whoami("::1", a.probe_port, token=b"x" * 16)
                await asyncio.sleep(0.05)
                assert session.seen == {4: "127.0.0.1"}
                # an IPv4 probe with the token never replaces the login's address
                await probes.whoami("127.0.0.1", a.probe_port, token=a.probe_token)
                addr, _ = await probes.whoami("::1", a.probe_port, token=a.probe_token)
                await asyncio.sleep(0.05)
                assert addr == "::1" and session.seen == {4: "127.0.0.1", 6: "::1"}
                with pytest.raises(ValueError):
                    await probes.whoami("::1", a.probe_port, token=b"short")
            # the token dies with the session
            assert server._probe_tokens == {}
        finally:
            await server.close()

    arun(main())


def test_a_device_speaking_version_4_may_not_log_in_over_ipv6(deployment):
    _v6_loopback()
    deployment.enroll("cam")

    async def main():
        server, port = await _dual(deployment)
        try:
            old = deployment.device(("::1", port), "cam", protocol=4, reconnect=False)
            with pytest.raises(AuthenticationError) as err:
                await old.login()
            assert err.value.code == "protocol-too-old"
            await old.close()
            # over IPv4 the same device is welcome, and hears of no IPv6 at all
            async with deployment.device(("127.0.0.1", port), "cam", protocol=4) as dev:
                assert dev.public_addr[0] == "127.0.0.1"
                assert dev.probe_token is None and dev.ccs_alt_addr is None
        finally:
            await server.close()

    arun(main())


def test_a_version_4_device_is_refused_a_peer_it_could_not_address(deployment):
    # the peer logged in over IPv6 and showed the CCS no IPv4 address: the
    # old device could not read it; both hear why, and nothing is left behind
    _v6_loopback()
    deployment.enroll_pair()

    async def main():
        from fastpunch.client import RendezvousRefusedError

        server, port = await _dual(deployment)
        try:
            async with deployment.device(("127.0.0.1", port), "cam", protocol=4) as a, \
                    deployment.device(("::1", port), "viewer") as b:
                asking = asyncio.create_task(a.rendezvous("viewer", A_INFO))
                offer = await asyncio.wait_for(b.incoming().__anext__(), 5)
                with pytest.raises(RendezvousRefusedError) as refused:
                    await offer.answer(B_INFO)
                with pytest.raises(RendezvousRefusedError) as err:
                    await asking
                assert err.value.code == refused.value.code == "no-common-family"
                assert server.pending == {} and server.offers == {}
        finally:
            await server.close()

    arun(main())


def test_the_wildcard_listener_takes_ipv4_whatever_bindv6only_says():
    from fastpunch.ccs.relay import listen

    sock = listen("::", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        sock.close()
