"""fastpunch.portmap.pcp: the MAP request's bytes, replies decoded."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from fastpunch.portmap import pcp as pm

from .helpers import NONCE, raises


MAPPED_ANY = b"\0" * 10 + b"\xff\xff" + b"\0" * 4


def mapped(addr: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr)


def pcp_server_reply(request: bytes, *, result: int = 0, lifetime: int | None = None,
                     epoch: int = 1234, port: int | None = None,
                     addr: str = "203.0.113.10") -> bytes:
    """What an RFC 6887 server sends back for a MAP request: R bit, result,
    lifetime, epoch and 12 reserved bytes in place of the client address;
    the MAP data copied, the assigned external port and address filled in."""
    _, op, _, asked = struct.unpack_from("!BBHI", request)
    lifetime = asked if lifetime is None else lifetime
    head = struct.pack("!BBBBII", 2, op | 0x80, 0, result, lifetime, epoch) + b"\0" * 12
    body = bytearray(request[24:60])
    if port is not None:
        body[18:20] = struct.pack("!H", port)
    body[20:36] = mapped(addr)
    return head + bytes(body)


def test_pcp_map_request_layout():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 120, external_port=43001)
    assert len(req) == 60
    assert req[0] == 2                                   # version
    assert req[1] == 1                                   # R=0, opcode MAP
    assert req[2:4] == b"\0\0"                           # reserved
    assert req[4:8] == (120).to_bytes(4, "big")          # requested lifetime
    assert req[8:24] == mapped("10.1.0.2")               # client IP, IPv4-mapped
    assert req[24:36] == NONCE                           # mapping nonce
    assert req[36] == 6 and req[37:40] == b"\0\0\0"      # protocol TCP, reserved
    assert req[40:42] == (43000).to_bytes(2, "big")      # internal port
    assert req[42:44] == (43001).to_bytes(2, "big")      # suggested external port
    assert req[44:60] == MAPPED_ANY                      # no preferred address: ::ffff:0.0.0.0


def test_pcp_delete_request_is_lifetime_zero_with_the_same_nonce():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 0, external_port=43000,
                             external_addr="203.0.113.10")
    assert req[4:8] == b"\0\0\0\0" and req[24:36] == NONCE
    assert req[44:60] == mapped("203.0.113.10")


@pytest.mark.parametrize("kw", [dict(nonce=b"short"), dict(internal_port=0),
                                dict(internal_port=70000), dict(lifetime=-1),
                                dict(lifetime=2 ** 32), dict(client_addr="::1"),
                                dict(client_addr="10.1.0"), dict(internal_port=True),
                                dict(lifetime=True)])
def test_pcp_map_request_refuses_bad_arguments(kw):
    args = dict(nonce=NONCE, client_addr="10.1.0.2", internal_port=43000, lifetime=120)
    args.update(kw)
    with pytest.raises(ValueError):
        pm.pcp_map_request(**args)


def test_pcp_round_trip():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 60)
    reply = pcp_server_reply(req, lifetime=120, epoch=99, port=43005)
    got = pm.pcp_decode_map_response(reply, NONCE, internal_port=43000)
    assert got == pm.PcpMapResponse(lifetime=120, epoch=99, nonce=NONCE, protocol=6,
                                    internal_port=43000, external_port=43005,
                                    external_addr="203.0.113.10")


def test_pcp_reply_with_options_is_accepted():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 60)
    option = bytes((0x80, 0, 0, 4)) + b"\0" * 4          # an optional-to-process option
    reply = pcp_server_reply(req, port=43000) + option
    assert pm.pcp_decode_map_response(reply, NONCE).external_port == 43000


@pytest.fixture
def pcp_ok():
    return pcp_server_reply(pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 120))


@pytest.mark.parametrize("cut", [0, 1, 4, 23, 24, 56])
def test_pcp_truncated(pcp_ok, cut):
    raises("pcp-truncated", pm.pcp_decode_map_response, pcp_ok[:cut], NONCE)


def test_pcp_not_a_multiple_of_four(pcp_ok):
    raises("pcp-malformed", pm.pcp_decode_map_response, pcp_ok + b"\0", NONCE)


def test_pcp_oversized(pcp_ok):
    raises("pcp-oversized", pm.pcp_decode_map_response, pcp_ok + b"\0" * 1044, NONCE)


@pytest.mark.parametrize("version", [1, 3, 0xFF])
def test_pcp_wrong_version(pcp_ok, version):
    reply = bytes((version,)) + pcp_ok[1:]
    err = raises("pcp-bad-version", pm.pcp_decode_map_response, reply, NONCE)
    assert err.result is None          # not a refusal: the transport keeps waiting


def test_pcp_server_that_speaks_only_nat_pmp():
    # RFC 6886 3.5 / RFC 6887 9: version 0, opcode 128+op, 16-bit result 1
    reply = struct.pack("!BBHI", 0, 0x81, 1, 5)
    err = raises("pcp-unsupp-version", pm.pcp_decode_map_response, reply, NONCE)
    assert err.result == 1


def test_pcp_server_with_another_version_says_unsupported(pcp_ok):
    reply = bytes((1, 0x81, 0, 1)) + pcp_ok[4:]
    assert raises("pcp-unsupp-version", pm.pcp_decode_map_response, reply, NONCE).result == 1


@pytest.mark.parametrize("op", [0x01, 0x80, 0x82])     # a request echoed, ANNOUNCE, PEER
def test_pcp_wrong_opcode(pcp_ok, op):
    raises("pcp-bad-opcode", pm.pcp_decode_map_response, pcp_ok[:1] + bytes((op,)) + pcp_ok[2:],
           NONCE)


def test_pcp_nonce_mismatch(pcp_ok):
    raises("pcp-bad-nonce", pm.pcp_decode_map_response, pcp_ok, os.urandom(12))


def test_pcp_nonce_mismatch_beats_an_error_result():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 120)
    reply = pcp_server_reply(req, result=2)
    err = raises("pcp-bad-nonce", pm.pcp_decode_map_response, reply, b"x" * 12)
    assert err.result is None          # someone else's refusal is no answer to us


@pytest.mark.parametrize("field,value", [(36, 17), (40, 0)])
def test_pcp_reply_for_another_mapping(pcp_ok, field, value):
    reply = bytearray(pcp_ok)
    reply[field] = value
    raises("pcp-mismatch", pm.pcp_decode_map_response, bytes(reply), NONCE, internal_port=43000)


def test_pcp_external_address_not_ipv4(pcp_ok):
    reply = pcp_ok[:44] + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    raises("pcp-malformed", pm.pcp_decode_map_response, reply, NONCE)


@pytest.mark.parametrize("result,name", sorted(pm.PCP_RESULTS.items())[1:])
def test_pcp_result_codes_are_named(result, name):
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 120)
    err = raises(f"pcp-{name}", pm.pcp_decode_map_response,
                 pcp_server_reply(req, result=result, lifetime=30), NONCE)
    assert err.result == result and "retry after 30 s" in str(err)


def test_pcp_named_codes_follow_rfc_6887():
    assert pm.PCP_RESULTS[2] == "not-authorized" and pm.PCP_RESULTS[8] == "no-resources"
    assert pm.PCP_RESULTS[12] == "address-mismatch" and pm.PCP_RESULTS[13] == \
        "excessive-remote-peers"


def test_pcp_unknown_result_and_short_error_reply():
    req = pm.pcp_map_request(NONCE, "10.1.0.2", 43000, 120)
    assert raises("pcp-result-99", pm.pcp_decode_map_response,
                  pcp_server_reply(req, result=99), NONCE).result == 99
    # an error reply without MAP data (cannot be matched by nonce) still ends it
    header_only = struct.pack("!BBBBII", 2, 0x81, 0, 3, 0, 7) + b"\0" * 12
    assert raises("pcp-malformed-request", pm.pcp_decode_map_response, header_only,
                  NONCE).result == 3


def test_a_success_that_grants_no_lifetime_is_no_mapping(monkeypatch):
    """A PCP server on loopback (a free port in place of 5351) answers the
    MAP with result SUCCESS and lifetime 0: that is a deletion, nothing to
    announce to a peer, and is refused as such."""
    import asyncio
    import threading
    import time

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    monkeypatch.setattr(pm, "PCP_PORT", server.getsockname()[1])

    def answer():
        with server:
            request, peer = server.recvfrom(1100)
            server.sendto(pcp_server_reply(request, lifetime=0, port=40000), peer)

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(pm.PortMapError) as err:
            asyncio.run(pm._map_pcp("127.0.0.1", "", 40000, 40000, 120, time.monotonic() + 3))
        assert err.value.code == "pcp-malformed" and "granted no port" in str(err.value)
    finally:
        t.join(10)
