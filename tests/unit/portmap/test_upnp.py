"""fastpunch.portmap.upnp: SSDP search and replies, the root description,
SOAP requests and responses."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from fastpunch.portmap import upnp as pm

from .helpers import raises


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
    # the same DTD where a look at the bytes cannot see it
    '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>'
    .encode("utf-16"),
    '<?xml version="1.0" encoding="cp037"?><root/>'.encode("ascii"),
    b"<root>\xff\xfe</root>",                                   # not UTF-8
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


def test_soap_arguments_are_escaped_for_text_and_attribute():
    """Markup characters in a value or the service type reach the gateway as
    text, never as structure (a description "a<b>&\"c" stays one value)."""
    import xml.etree.ElementTree as ET

    from fastpunch.portmap.upnp import soap_envelope

    body = soap_envelope('urn:x"y&<z>', "AddPortMapping",
                         [("NewPortMappingDescription", 'a<b>&"c</x>'), ("NewLeaseDuration", 5)])
    root = ET.fromstring(body)
    action = root[0][0]
    assert action.tag == '{urn:x"y&<z>}AddPortMapping'
    assert [(child.tag, child.text) for child in action] == [
        ("NewPortMappingDescription", 'a<b>&"c</x>'), ("NewLeaseDuration", "5")]
