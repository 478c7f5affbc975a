"""fastpunch.portmap.natpmp: the requests' bytes, replies decoded."""

from __future__ import annotations

import socket
import struct

import pytest

from fastpunch.portmap import natpmp as pm

from .helpers import raises


def test_natpmp_requests_layout():
    assert pm.natpmp_address_request() == b"\x00\x00"     # version 0, opcode 0
    req = pm.natpmp_map_request(40000, 40001, 7200)
    assert len(req) == 12
    assert req[0] == 0 and req[1] == 2                     # version 0, opcode 2 (TCP)
    assert req[2:4] == b"\0\0"                             # reserved
    assert req[4:6] == (40000).to_bytes(2, "big")          # internal port
    assert req[6:8] == (40001).to_bytes(2, "big")          # suggested external port
    assert req[8:12] == (7200).to_bytes(4, "big")          # requested lifetime
    assert pm.natpmp_map_request(40000, 0, 0)[6:] == b"\0" * 6   # deletion


def natpmp_address_reply(addr="203.0.113.10", result=0, epoch=77) -> bytes:
    return struct.pack("!BBHI", 0, 128, result, epoch) + socket.inet_aton(addr)


def natpmp_map_reply(iport=40000, eport=40001, lifetime=3600, result=0, epoch=77,
                     op=130) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, epoch, iport, eport, lifetime)


def test_natpmp_round_trip():
    assert pm.natpmp_decode_address_response(natpmp_address_reply()) == \
        pm.NatPmpAddress(epoch=77, external_addr="203.0.113.10")
    req = pm.natpmp_map_request(40000, 40001, 3600)
    iport, eport, lifetime = struct.unpack_from("!HHI", req, 4)
    reply = natpmp_map_reply(iport, eport, lifetime)
    assert pm.natpmp_decode_map_response(reply, 40000) == \
        pm.NatPmpMapResponse(epoch=77, internal_port=40000, external_port=40001, lifetime=3600)


@pytest.mark.parametrize("cut", [0, 3, 8, 11])
def test_natpmp_address_truncated(cut):
    raises("natpmp-truncated", pm.natpmp_decode_address_response, natpmp_address_reply()[:cut])


@pytest.mark.parametrize("cut", [0, 2, 8, 15])
def test_natpmp_map_truncated(cut):
    raises("natpmp-truncated", pm.natpmp_decode_map_response, natpmp_map_reply()[:cut])


def test_natpmp_oversized():
    raises("natpmp-oversized", pm.natpmp_decode_map_response, natpmp_map_reply() + b"\0" * 1100)


def test_natpmp_wrong_version():
    reply = b"\x01" + natpmp_map_reply()[1:]
    assert raises("natpmp-bad-version", pm.natpmp_decode_map_response, reply).result is None


def test_natpmp_answered_by_a_pcp_only_server():
    reply = struct.pack("!BBBBII", 2, 0x80, 0, 1, 0, 0) + b"\0" * 16
    assert raises("natpmp-unsupported-version", pm.natpmp_decode_map_response,
                  reply).result == 1


@pytest.mark.parametrize("op", [2, 128, 129])     # an echoed request, the address reply, UDP
def test_natpmp_wrong_opcode(op):
    raises("natpmp-bad-opcode", pm.natpmp_decode_map_response, natpmp_map_reply(op=op))


def test_natpmp_address_reply_to_a_map_request_is_not_an_answer():
    raises("natpmp-bad-opcode", pm.natpmp_decode_address_response, natpmp_map_reply())


@pytest.mark.parametrize("result,name", sorted(pm.NATPMP_RESULTS.items())[1:])
def test_natpmp_result_codes_are_named(result, name):
    full = natpmp_map_reply(result=result)
    short = full[:8]                       # RFC 6886 3.5: error replies may stop at 8 bytes
    for reply in (full, short):
        err = raises(f"natpmp-{name}", pm.natpmp_decode_map_response, reply)
        assert err.result == result
    assert raises(f"natpmp-{name}", pm.natpmp_decode_address_response,
                  natpmp_address_reply(result=result)).result == result


def test_natpmp_refused_is_result_2_and_unknown_results_have_numbers():
    assert pm.NATPMP_RESULTS[2] == "refused"
    raises("natpmp-result-9", pm.natpmp_decode_map_response, natpmp_map_reply(result=9))


def test_natpmp_reply_for_another_internal_port():
    raises("natpmp-mismatch", pm.natpmp_decode_map_response, natpmp_map_reply(iport=1), 40000)
