"""fastpunch.punch.portmap without a network: every encoder's bytes against
the RFC layouts, every decoder against well-formed and malformed replies.

Replies are built here with struct from the RFC layouts (or, for PCP,
from the request the way a server does: R bit set, result, epoch, assigned
address), never with the module's own encoders."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import xml.etree.ElementTree as ET

import pytest

from fastpunch.errors import FastpunchError
from fastpunch.punch import portmap as pm
from fastpunch.punch.portmap import PortMapError

NONCE = bytes(range(1, 13))
MAPPED_ANY = b"\0" * 10 + b"\xff\xff" + b"\0" * 4


def mapped(addr: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr)


def raises(code: str, fn, *args, **kw) -> PortMapError:
    with pytest.raises(PortMapError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value
    assert code in str(info.value)
    return info.value


# --- PCP --------------------------------------------------------------------------------

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
                                dict(client_addr="10.1.0")])
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


def test_port_map_error_is_a_fastpunch_error():
    err = PortMapError("timeout", "nothing")
    assert isinstance(err, FastpunchError) and isinstance(err, Exception)
    assert err.code == "timeout" and err.result is None and err.failures == {}


# --- NAT-PMP ----------------------------------------------------------------------------

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


# --- SSDP -------------------------------------------------------------------------------

def test_msearch_message():
    assert pm.ssdp_msearch() == (
        b"M-SEARCH * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b'MAN: "ssdp:discover"\r\n'
        b"MX: 1\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"\r\n")
    assert b"ST: urn:schemas-upnp-org:service:WANIPConnection:2\r\n" in \
        pm.ssdp_msearch(pm.WANIP_SERVICES[1], mx=3)
    with pytest.raises(ValueError):
        pm.ssdp_msearch(mx=0)


# as miniupnpd 2.3.9 sends it
SSDP_REPLY = (
    b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=1800\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:d0d0ecbc-4f34-40f0-ae87-4bce3a53bf06::urn:schemas-upnp-org:device:"
    b"InternetGatewayDevice:1\r\nEXT:\r\nSERVER: Debian UPnP/1.1 MiniUPnPd/2.3.9\r\n"
    b"LOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n01-NLS: 1795617001\r\n\r\n')


def test_ssdp_location():
    assert pm.ssdp_location(SSDP_REPLY) == "http://10.1.0.1:5000/rootDesc.xml"
    assert pm.ssdp_location(SSDP_REPLY, "10.1.0.1") == "http://10.1.0.1:5000/rootDesc.xml"
    lower = SSDP_REPLY.replace(b"LOCATION:", b"location:")
    assert pm.ssdp_location(lower) == "http://10.1.0.1:5000/rootDesc.xml"


@pytest.mark.parametrize("reply,code", [
    (SSDP_REPLY.replace(b"LOCATION: http://10.1.0.1:5000/rootDesc.xml\r\n", b""),
     "upnp-malformed"),
    (SSDP_REPLY.replace(b"200 OK", b"404 Not Found"), "upnp-malformed"),
    (SSDP_REPLY.replace(b"HTTP/1.1 200", b"NOTIFY * HTTP/1.1"), "upnp-malformed"),
    (SSDP_REPLY[:-2], "upnp-malformed"),                          # no end of head
    (SSDP_REPLY.replace(b"EXT:\r\n", b"no colon here\r\n"), "upnp-malformed"),
    (SSDP_REPLY.replace(b"http://10.1.0.1:5000", b"https://10.1.0.1:5000"), "upnp-bad-url"),
    (SSDP_REPLY.replace(b"http://10.1.0.1:5000", b"http://router.lan:5000"), "upnp-bad-url"),
    (SSDP_REPLY.replace(b"http://10.1.0.1:5000", b"http://10.1.0.1:99999"), "upnp-bad-url"),
    (SSDP_REPLY[:-2] + b"X-PAD: " + b"a" * 9000 + b"\r\n\r\n", "upnp-oversized"),
])
def test_ssdp_bad_replies(reply, code):
    raises(code, pm.ssdp_location, reply)


def test_ssdp_location_must_be_on_the_replying_address():
    raises("upnp-bad-url", pm.ssdp_location, SSDP_REPLY, "10.1.0.7")


# --- the root description -----------------------------------------------------------------

def service(stype: str, control: str) -> str:
    return (f"<service><serviceType>{stype}</serviceType><serviceId>x</serviceId>"
            f"<SCPDURL>/x.xml</SCPDURL><controlURL>{control}</controlURL>"
            "<eventSubURL>/evt</eventSubURL></service>")


def root_desc(*services: str, url_base: str = "") -> bytes:
    """miniupnpd's layout: IGD > WANDevice > WANConnectionDevice > services."""
    base = f"<URLBase>{url_base}</URLBase>" if url_base else ""
    return ('<?xml version="1.0"?>\r\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
            "<specVersion><major>1</major><minor>1</minor></specVersion>" + base +
            "<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1"
            "</deviceType><serviceList>"
            + service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/ctl/L3F") +
            "</serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:"
            "WANDevice:1</deviceType><serviceList>"
            + service("urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1", "/ctl/Cmn") +
            "</serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:"
            "WANConnectionDevice:1</deviceType><serviceList>" + "".join(services) +
            "</serviceList></device></deviceList></device></deviceList>"
            "<presentationURL>http://10.1.0.1/</presentationURL></device></root>").encode()


LOCATION = "http://10.1.0.1:5000/rootDesc.xml"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"


def test_root_description_finds_the_wanipconnection():
    got = pm.parse_root_description(root_desc(service(WANIP1, "/ctl/IPConn")), LOCATION)
    assert got == pm.IgdService("http://10.1.0.1:5000/ctl/IPConn", WANIP1)


def test_root_description_resolves_relative_urls_and_url_base():
    rel = pm.parse_root_description(root_desc(service(WANIP1, "ctl/IPConn")),
                                    "http://10.1.0.1:5000/desc/root.xml")
    assert rel.control_url == "http://10.1.0.1:5000/desc/ctl/IPConn"
    based = pm.parse_root_description(root_desc(service(WANIP1, "/ctl/IPConn"),
                                                url_base="http://10.1.0.1:49000/"), LOCATION)
    assert based.control_url == "http://10.1.0.1:49000/ctl/IPConn"


def test_root_description_prefers_ip_over_ppp_and_falls_back_to_ppp():
    both = root_desc(service(WANPPP1, "/ctl/PPP"), service(WANIP1, "/ctl/IP"))
    assert pm.parse_root_description(both, LOCATION).service_type == WANIP1
    ppp = pm.parse_root_description(root_desc(service(WANPPP1, "/ctl/PPP")), LOCATION)
    assert ppp == pm.IgdService("http://10.1.0.1:5000/ctl/PPP", WANPPP1)
    v2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
    assert pm.parse_root_description(root_desc(service(v2, "/c")), LOCATION).service_type == v2


def test_root_description_without_wanipconnection():
    raises("upnp-no-service", pm.parse_root_description, root_desc(), LOCATION)
    raises("upnp-no-service", pm.parse_root_description, root_desc(service(WANIP1, "")),
           LOCATION)


def test_root_description_oversized():
    big = root_desc(service(WANIP1, "/ctl/IPConn")).replace(
        b"</root>", b"<!-- " + b"x" * pm.MAX_XML + b" --></root>")
    raises("upnp-oversized", pm.parse_root_description, big, LOCATION)


@pytest.mark.parametrize("doc", [
    b"<root><device>",                                         # unclosed
    b"not xml at all",
    b"",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
    b"<root>&b;</root>",                                        # entity expansion
    b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://10.9.9.9/x.dtd"><root/>',
])
def test_root_description_bad_xml(doc):
    raises("upnp-bad-xml", pm.parse_root_description, doc, LOCATION)


@pytest.mark.parametrize("control", ["http://10.9.9.9:5000/ctl", "https://10.1.0.1/ctl",
                                     "//203.0.113.5/ctl"])
def test_control_url_must_stay_on_the_gateway(control):
    raises("upnp-bad-url", pm.parse_root_description, root_desc(service(WANIP1, control)),
           LOCATION)


# --- SOAP -------------------------------------------------------------------------------

SOAP_NS = "{http://schemas.xmlsoap.org/soap/envelope/}"


def action_of(body: bytes, service_type: str, action: str) -> list:
    root = ET.fromstring(body)
    assert root.tag == SOAP_NS + "Envelope"
    assert root.get(SOAP_NS + "encodingStyle") == "http://schemas.xmlsoap.org/soap/encoding/"
    (body_el,) = list(root)
    assert body_el.tag == SOAP_NS + "Body"
    (act,) = list(body_el)
    assert act.tag == "{%s}%s" % (service_type, action)
    return [(child.tag, child.text or "") for child in act]


def test_soap_bodies():
    assert action_of(pm.soap_get_external_ip(WANIP1), WANIP1, "GetExternalIPAddress") == []
    assert action_of(pm.soap_add_port_mapping(WANIP1, 41001, "10.1.0.2", 41000, 120),
                     WANIP1, "AddPortMapping") == [
        ("NewRemoteHost", ""), ("NewExternalPort", "41001"), ("NewProtocol", "TCP"),
        ("NewInternalPort", "41000"), ("NewInternalClient", "10.1.0.2"), ("NewEnabled", "1"),
        ("NewPortMappingDescription", "fastpunch"), ("NewLeaseDuration", "120")]
    assert action_of(pm.soap_delete_port_mapping(WANPPP1, 41001), WANPPP1,
                     "DeletePortMapping") == [
        ("NewRemoteHost", ""), ("NewExternalPort", "41001"), ("NewProtocol", "TCP")]


def test_soap_escapes_text_and_checks_arguments():
    body = pm.soap_add_port_mapping(WANIP1, 41001, "10.1.0.2", 41000, 120,
                                    description="a<b>&c")
    assert dict(action_of(body, WANIP1, "AddPortMapping"))["NewPortMappingDescription"] == \
        "a<b>&c"
    for bad in (dict(internal_addr="host"), dict(external_port=0), dict(lifetime=0)):
        args = dict(service_type=WANIP1, external_port=1, internal_addr="10.1.0.2",
                    internal_port=1, lifetime=1)
        args.update(bad)
        with pytest.raises(ValueError):
            pm.soap_add_port_mapping(**args)


def soap_reply(action: str, inner: str) -> bytes:
    return ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action}Response xmlns:u="{WANIP1}">{inner}</u:{action}Response>'
            "</s:Body></s:Envelope>\r\n").encode()


def soap_fault(code: str = "718", description: str = "ConflictInMappingEntry") -> bytes:
    desc = f"<errorDescription>{description}</errorDescription>" if description else ""
    err = f"<errorCode>{code}</errorCode>" if code else ""
    return ('<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
            "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
            f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">{err}{desc}</UPnPError>'
            "</detail></s:Fault></s:Body></s:Envelope>").encode()


def test_soap_responses():
    body = soap_reply("GetExternalIPAddress",
                      "<NewExternalIPAddress>203.0.113.10</NewExternalIPAddress>")
    assert pm.parse_soap_response(body, "GetExternalIPAddress") == \
        {"NewExternalIPAddress": "203.0.113.10"}
    assert pm.parse_soap_response(soap_reply("AddPortMapping", ""), "AddPortMapping") == {}


def test_soap_fault_is_named_by_its_upnp_error():
    err = raises("upnp-fault-718", pm.parse_soap_response, soap_fault(), "AddPortMapping", 500)
    assert err.result == 718 and "ConflictInMappingEntry" in str(err)
    err = raises("upnp-fault-606", pm.parse_soap_response, soap_fault("606", ""),
                 "AddPortMapping", 500)
    assert "ActionNotAuthorized" in str(err)             # named from the table
    raises("upnp-fault-714", pm.parse_soap_response, soap_fault("714", "NoSuchEntryInArray"),
           "DeletePortMapping", 500)


@pytest.mark.parametrize("code", ["", "abc", "²", "12345"])
def test_soap_fault_without_a_usable_error_code(code):
    raises("upnp-fault", pm.parse_soap_response, soap_fault(code), "AddPortMapping", 500)


def test_soap_other_failures():
    raises("upnp-http-500", pm.parse_soap_response, b"Internal error", "AddPortMapping", 500)
    raises("upnp-http-401", pm.parse_soap_response, soap_reply("AddPortMapping", ""),
           "AddPortMapping", 401)
    raises("upnp-malformed", pm.parse_soap_response, soap_reply("Other", ""), "AddPortMapping")
    raises("upnp-bad-xml", pm.parse_soap_response, b"<s:Envelope", "AddPortMapping")
    raises("upnp-oversized", pm.parse_soap_response, b" " * (pm.MAX_XML + 1), "AddPortMapping")


# --- HTTP -------------------------------------------------------------------------------

def test_http_request_bytes():
    req = pm.http_request("POST", "http://10.1.0.1:5000/ctl/IPConn?x=1", b"<xml/>",
                          [("SOAPAction", '"urn:x#Y"')])
    head, _, body = req.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /ctl/IPConn?x=1 HTTP/1.1"
    assert b"Host: 10.1.0.1:5000" in lines and b"Connection: close" in lines
    assert b'SOAPAction: "urn:x#Y"' in lines and b"Content-Length: 6" in lines
    assert body == b"<xml/>"
    get = pm.http_request("GET", "http://10.1.0.1/rootDesc.xml")
    assert get.startswith(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 10.1.0.1:80\r\n")
    assert b"Content-Length" not in get and get.endswith(b"\r\n\r\n")


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"


def test_http_response_content_length():
    full = HEAD + b"Content-Length: 5\r\n\r\nhello"
    for cut in (10, len(full) - 1):
        assert pm.parse_http_response(full[:cut]) is None
    got = pm.parse_http_response(full + b"trailing junk ignored")
    assert (got.status, got.reason, got.body) == (200, "OK", b"hello")
    assert got.headers["content-type"] == "text/xml"
    raises("upnp-truncated", pm.parse_http_response, full[:-1], eof=True)
    raises("upnp-truncated", pm.parse_http_response, full[:10], eof=True)


def test_http_response_chunked_and_until_eof():
    chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    assert pm.parse_http_response(chunked).body == b"hello!"
    with_trailer = chunked[:-2] + b"X-Trailer: 1\r\n\r\n"
    assert pm.parse_http_response(with_trailer).body == b"hello!"
    for cut in (len(HEAD) + 35, len(chunked) - 1):
        assert pm.parse_http_response(chunked[:cut]) is None
        raises("upnp-truncated", pm.parse_http_response, chunked[:cut], eof=True)
    until_eof = HEAD + b"\r\nall of it"
    assert pm.parse_http_response(until_eof) is None
    assert pm.parse_http_response(until_eof, eof=True).body == b"all of it"


@pytest.mark.parametrize("data,code", [
    (b"HTTP/1.1 2000 OK\r\n\r\n", "upnp-malformed"),
    (b"ICY 200 OK\r\n\r\n", "upnp-malformed"),
    (b"HTTP/1.1 OK\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Content-Length: \xb2\r\n\r\n", "upnp-malformed"),    # '²' is isdigit()
    (HEAD + b"Content-Length: -1\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Content-Length: 70000\r\n\r\n", "upnp-oversized"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nfffff\r\n", "upnp-oversized"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 100, "upnp-malformed"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * pm.MAX_HEAD, "upnp-oversized"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * pm.MAX_HEAD + b"\r\n\r\n", "upnp-oversized"),
])
def test_http_response_malformed(data, code):
    raises(code, pm.parse_http_response, data)


def test_http_body_until_eof_is_bounded():
    raises("upnp-oversized", pm.parse_http_response, HEAD + b"\r\n" + b"x" * (pm.MAX_XML + 1))


# --- the default gateway ------------------------------------------------------------------

# /proc/net/route of the lab's host a (x86: addresses little-endian), plus more
ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_default_gateway_from_proc_net_route():
    assert pm.parse_proc_net_route(ROUTE, "little") == "10.1.0.1"


def test_default_gateway_big_endian_host():
    text = ROUTE.replace("0100010A", "0A010001").replace("0000010A", "0A010000")
    assert pm.parse_proc_net_route(text, "big") == "10.1.0.1"


def test_default_gateway_lowest_metric_and_only_real_defaults():
    others = (
        "tun0\t00000000\t0102A8C0\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"     # no RTF_GATEWAY
        "eth1\t00000000\t0103A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"     # not up
        "eth2\t00000000\t0104A8C0\t0003\t0\t0\t0\t00000080\t0\t0\t0\n")    # 0/1: no default
    worse = "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
    assert pm.parse_proc_net_route(ROUTE + worse + others, "little") == "10.1.0.1"
    better = worse.replace("\t600\t", "\t0\t")
    eth0_worse = ROUTE.replace("\t0003\t0\t0\t0\t", "\t0003\t0\t0\t100\t")
    assert pm.parse_proc_net_route(eth0_worse + better + others, "little") == "192.168.1.1"


@pytest.mark.parametrize("text", [
    "",
    "Iface\tDestination\tGateway\n",
    ROUTE.splitlines()[0] + "\n" + ROUTE.splitlines()[1] + "\n",          # no default route
    ROUTE.replace("0100010A", "zzzzzzzz"),
    ROUTE.replace("\t0003\t0\t0\t0\t00000000", "\t0003"),                 # short line
    ROUTE.replace("0100010A", "00000000"),                                # gateway 0.0.0.0
    ROUTE.replace("0100010A", "1FFFFFFFF"),
])
def test_default_gateway_absent_or_garbled(text):
    assert pm.parse_proc_net_route(text, "little") is None


def test_default_gateway_of_this_namespace_is_an_address_or_none():
    got = pm.default_gateway()
    assert got is None or socket.inet_aton(got)


def test_default_gateway_without_proc(monkeypatch):
    def missing(*a, **kw):
        raise FileNotFoundError("no /proc")
    monkeypatch.setattr(pm, "open", missing, raising=False)
    assert pm.default_gateway() is None


# --- map_port's checks that need no network ----------------------------------------------

def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("kw", [dict(internal_port=0), dict(internal_addr="eth0"),
                                dict(lifetime=0), dict(external_port=65536),
                                dict(protocols=("stun",)), dict(protocols=()),
                                dict(gateway="router"), dict(timeout=0)])
def test_map_port_argument_errors(kw):
    args = dict(internal_addr="10.1.0.2", internal_port=40000)
    args.update(kw)
    with pytest.raises(ValueError):
        run(pm.map_port(**args))


def test_map_port_without_a_gateway(monkeypatch):
    monkeypatch.setattr(pm, "default_gateway", lambda: None)
    err = raises("no-mapping", run, pm.map_port("10.1.0.2", 40000, protocols=("pcp", "natpmp")))
    assert {p: e.code for p, e in err.failures.items()} == \
        {"pcp": "no-gateway", "natpmp": "no-gateway"}


def test_map_port_never_asks_pcp_or_natpmp_for_a_low_port():
    # not sent at all: miniupnpd would stall for a minute before refusing
    err = raises("no-mapping", run, pm.map_port("10.1.0.2", 80, gateway="192.0.2.1",
                                                protocols=("pcp", "natpmp")))
    assert {p: e.code for p, e in err.failures.items()} == \
        {"pcp": "low-port", "natpmp": "low-port"}
    assert "pcp: " in str(err) and "natpmp: " in str(err)


def test_mapping_is_frozen():
    m = pm.Mapping("pcp", "10.1.0.1", "10.1.0.2", 1, "203.0.113.10", 1, 120, nonce=NONCE)
    with pytest.raises(AttributeError):
        m.external_port = 2             # type: ignore[misc]
    assert "nonce" not in repr(m)
