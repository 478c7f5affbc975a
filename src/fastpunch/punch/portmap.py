"""Ask the gateway for an inbound TCP port mapping: PCP, NAT-PMP, UPnP-IGD.

A device behind a home router that runs a port-mapping daemon (miniupnpd
and many consumer routers) can have the router forward one external TCP
port to it; the peer then connects in directly, no punching needed. Three
protocols, tried in this order by :func:`map_port`:

* **PCP** (RFC 6887), a MAP request for TCP over IPv4 (addresses as
  IPv4-mapped IPv6), to UDP port 5351 of the default gateway. The reply must
  echo the request's random 12-byte nonce.
* **NAT-PMP** (RFC 6886), a public-address request then a TCP mapping
  request, to the same port 5351 of the default gateway.
* **UPnP-IGD**: SSDP M-SEARCH multicast to 239.255.255.250:1900 (for the
  InternetGatewayDevice:1 and the WANIPConnection:1/2 services), the root
  description fetched from the reply's LOCATION, then SOAP
  GetExternalIPAddress and AddPortMapping to the WANIPConnection (or
  WANPPPConnection) control URL.

What works where. miniupnpd (the lab's "upnp" gateway, OpenWrt and other
open router firmware) answers all three: UPnP-IGD on its HTTP port (5000 in
the lab), NAT-PMP and PCP both on UDP 5351. A plain NAT without a daemon
answers nothing, or an ICMP port unreachable that ends that protocol's try
at once ("unreachable"). miniupnpd in *secure mode* (the lab's, OpenWrt's)
maps only to the address that asks: PCP and NAT-PMP here refuse up front to
map for another host ("third-party"); UPnP asks and the gateway refuses
(fault 606 or 718). Its usual permission rules allow internal and external
ports 1024-65535 only. A refused *external* port is no error for PCP and
NAT-PMP: miniupnpd grants the next allowed one, which the returned
:class:`Mapping` carries. But a PCP or NAT-PMP request for an internal port
below 1024 makes miniupnpd 2.3 walk all 65535 external ports before it
refuses, deaf to every client for about a minute; so PCP and NAT-PMP are
never asked for internal ports below 1024 here ("low-port"). UPnP refuses
those at once (fault 718).

Mappings are requested with a short lifetime (``lifetime``, 120 s by
default; gateways may grant another, e.g. miniupnpd raises PCP lifetimes to
its ``min_lifetime``) and are meant to be deleted after use: :func:`unmap`,
or the :func:`mapped` context manager. PCP and NAT-PMP talk only to the
default gateway of this network namespace (:func:`default_gateway`, from
``/proc/thread-self/net/route``) unless ``gateway`` says otherwise; SSDP
replies are accepted only from that gateway when it is known, and only with
a LOCATION (and control URL) on the replying address itself.

Everything the wire carries is encoded and decoded by pure functions here
(``pcp_*``, ``natpmp_*``, ``ssdp_*``, ``parse_root_description``,
``soap_*``, ``parse_http_response``), tested byte by byte without a
network; the asyncio transports around them bound every wait (retries at
0.25 s and 0.5 s, then a last 0.75 s: about 1.5 s per protocol, RFC 6887's
and RFC 6886's schedules shortened) and every size (a reply, an HTTP head,
a 64 KiB XML document). Standard library only.

Every failure is a :class:`PortMapError` with a stable ``code``: the
decoders' ``pcp-*``, ``natpmp-*`` and ``upnp-*`` (``pcp-bad-nonce``,
``natpmp-refused``, ``upnp-fault-718``, ...), the transports' ``timeout``,
``unreachable``, ``no-gateway``, ``third-party``, ``low-port``,
``network``, and ``no-mapping`` from :func:`map_port` when every protocol
failed (its ``failures`` say why each did).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, Optional, Sequence, Tuple
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from fastpunch.errors import FastpunchError

__all__ = [
    "PortMapError", "Mapping", "map_port", "unmap", "mapped", "default_gateway",
    "parse_proc_net_route", "PROTOCOLS",
    # PCP
    "PCP_PORT", "PCP_RESULTS", "PcpMapResponse", "pcp_map_request", "pcp_decode_map_response",
    # NAT-PMP
    "NATPMP_PORT", "NATPMP_RESULTS", "NatPmpAddress", "NatPmpMapResponse",
    "natpmp_address_request", "natpmp_decode_address_response", "natpmp_map_request",
    "natpmp_decode_map_response",
    # UPnP-IGD
    "SSDP_ADDR", "IGD_DEVICE", "WANIP_SERVICES", "IgdService", "HttpResponse", "UPNP_ERRORS",
    "ssdp_msearch", "ssdp_location", "parse_root_description", "soap_envelope",
    "soap_get_external_ip", "soap_add_port_mapping", "soap_delete_port_mapping",
    "parse_soap_response", "http_request", "parse_http_response",
]

PROTOCOLS = ("pcp", "natpmp", "upnp")
RETRY_SCHEDULE = (0.25, 0.5, 0.75)      # seconds to wait after each (re)transmission
DEFAULT_TIMEOUT = sum(RETRY_SCHEDULE)   # per protocol
DESCRIPTION = "fastpunch"               # the UPnP mapping's description
LOW_PORTS = 1024                        # PCP/NAT-PMP never asked to map below this
TCP = 6
# A discovered IGD (its control URL) is reused this long per namespace and
# gateway: SSDP and the description GET are most of a UPnP mapping's time.
IGD_CACHE_SECONDS = 120.0


class PortMapError(FastpunchError):
    """A mapping was not made (or not deleted). ``code`` is a stable word
    (``"pcp-bad-nonce"``, ``"natpmp-refused"``, ``"upnp-fault-718"``,
    ``"timeout"``, ``"no-gateway"``, ...); ``result`` is the gateway's own
    result code when it answered with a refusal (None for malformed replies
    and local failures); ``failures`` maps protocol -> error for
    :func:`map_port`'s ``"no-mapping"``."""

    def __init__(self, code: str, message: str, *, result: Optional[int] = None,
                 failures: Optional[Dict[str, "PortMapError"]] = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.result = result
        self.failures: Dict[str, PortMapError] = dict(failures or {})


def _check_port(port: int, what: str, zero: bool = False) -> int:
    if not isinstance(port, int) or not (0 if zero else 1) <= port <= 0xFFFF:
        raise ValueError(f"{what} must be a port number: {port!r}")
    return port


def _check_lifetime(lifetime: int, zero: bool = False) -> int:
    if not isinstance(lifetime, int) or not (0 if zero else 1) <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime must be 1..2**32-1 seconds: {lifetime!r}")
    return lifetime


def _digits(text: str, most: int) -> bool:
    """1..``most`` ASCII digits (str.isdigit alone admits '²', which int() refuses)."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _ipv4(addr: str, what: str) -> bytes:
    try:
        return ipaddress.IPv4Address(addr).packed
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise ValueError(f"{what} must be an IPv4 address: {addr!r}") from exc


# --- PCP (RFC 6887) ------------------------------------------------------------------

PCP_PORT = 5351
PCP_VERSION = 2
PCP_OP_MAP = 1
PCP_RESPONSE = 0x80
PCP_MAX = 1100                         # RFC 6887 7: longest PCP message
PCP_MAP_LEN = 24 + 36                  # common header + MAP opcode data
_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"
PCP_RESULTS = {
    0: "success", 1: "unsupp-version", 2: "not-authorized", 3: "malformed-request",
    4: "unsupp-opcode", 5: "unsupp-option", 6: "malformed-option", 7: "network-failure",
    8: "no-resources", 9: "unsupp-protocol", 10: "user-ex-quota",
    11: "cannot-provide-external", 12: "address-mismatch", 13: "excessive-remote-peers",
}


@dataclass(frozen=True)
class PcpMapResponse:
    """A successful PCP MAP response (result 0)."""
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_addr: str


def _mapped(addr: str, what: str) -> bytes:
    return _MAPPED_PREFIX + _ipv4(addr, what)


def pcp_map_request(nonce: bytes, client_addr: str, internal_port: int, lifetime: int, *,
                    external_port: int = 0, external_addr: str = "0.0.0.0",
                    protocol: int = TCP) -> bytes:
    """A 60-byte MAP request. ``lifetime`` 0 deletes the mapping (same nonce);
    ``external_port`` 0 and ``external_addr`` 0.0.0.0 express no preference.

    Layout: version, R|opcode, 2 reserved, lifetime (4), client address (16,
    IPv4-mapped) | nonce (12), protocol, 3 reserved, internal port,
    suggested external port, suggested external address (16)."""
    if not isinstance(nonce, bytes) or len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    if not 0 <= protocol <= 255:
        raise ValueError(f"protocol must be an IP protocol number: {protocol!r}")
    return (struct.pack("!BBHI", PCP_VERSION, PCP_OP_MAP, 0, _check_lifetime(lifetime, True))
            + _mapped(client_addr, "client_addr") + nonce
            + struct.pack("!B3xHH", protocol, _check_port(internal_port, "internal_port"),
                          _check_port(external_port, "external_port", True))
            + _mapped(external_addr, "external_addr"))


def _pcp_refusal(result: int, lifetime: int) -> PortMapError:
    name = PCP_RESULTS.get(result, f"result-{result}")
    hint = f", retry after {lifetime} s" if lifetime else ""
    return PortMapError(f"pcp-{name}", f"the PCP server refused the mapping: result {result} "
                        f"{name.upper().replace('-', '_')}{hint}", result=result)


def pcp_decode_map_response(data: bytes, nonce: bytes, *, protocol: int = TCP,
                            internal_port: Optional[int] = None) -> PcpMapResponse:
    """Decode the answer to a MAP request with ``nonce``.

    A refusal (result != 0) raises ``pcp-<result name>`` with ``.result``
    set; so does a NAT-PMP server's version-0 "unsupported version" reply
    (``pcp-unsupp-version``, RFC 6887 9: fall back to NAT-PMP). Anything not
    a well-formed answer to this request raises ``pcp-truncated``,
    ``pcp-oversized``, ``pcp-malformed``, ``pcp-bad-version``,
    ``pcp-bad-opcode``, ``pcp-bad-nonce`` or ``pcp-mismatch``."""
    data = bytes(data)
    if len(data) > PCP_MAX:
        raise PortMapError("pcp-oversized", f"a PCP reply of {len(data)} bytes (at most {PCP_MAX})")
    if len(data) >= 4 and data[0] == 0 and data[1] >= 0x80 and data[2:4] == b"\0\1":
        # NAT-PMP's 'unsupported version' (version 0, result 1 in its 16-bit code)
        raise PortMapError("pcp-unsupp-version", "the gateway speaks NAT-PMP, not PCP",
                           result=1)
    if len(data) < 24:
        raise PortMapError("pcp-truncated", f"a PCP reply of {len(data)} bytes (header is 24)")
    version, op, _, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != PCP_VERSION:
        if result == 1 and op & PCP_RESPONSE:
            raise PortMapError("pcp-unsupp-version", f"the PCP server speaks version {version}",
                               result=1)
        raise PortMapError("pcp-bad-version", f"PCP reply version {version}, expected 2")
    if op != PCP_RESPONSE | PCP_OP_MAP:
        raise PortMapError("pcp-bad-opcode", f"PCP reply opcode {op:#x}, expected 0x81 (MAP)")
    if len(data) % 4:
        raise PortMapError("pcp-malformed",
                           f"a PCP reply of {len(data)} bytes, not a multiple of 4")
    if len(data) >= PCP_MAP_LEN and data[24:36] != nonce:
        raise PortMapError("pcp-bad-nonce", "the PCP reply's nonce is not this request's")
    if result != 0:
        # error replies copy the request's MAP data; a short one cannot be
        # matched by nonce but still ends the exchange (RFC 6887 8.3)
        raise _pcp_refusal(result, lifetime)
    if len(data) < PCP_MAP_LEN:
        raise PortMapError("pcp-truncated", f"a PCP MAP reply of {len(data)} bytes (at least 60)")
    proto, iport, eport = struct.unpack_from("!B3xHH", data, 36)
    if proto != protocol or (internal_port is not None and iport != internal_port):
        raise PortMapError("pcp-mismatch", f"the PCP reply is for protocol {proto} port {iport}")
    ext = data[44:60]
    if ext[:12] != _MAPPED_PREFIX:
        raise PortMapError("pcp-malformed", "the PCP reply's external address is not IPv4")
    return PcpMapResponse(lifetime, epoch, data[24:36], proto, iport, eport,
                          socket.inet_ntoa(ext[12:]))


# --- NAT-PMP (RFC 6886) --------------------------------------------------------------

NATPMP_PORT = 5351
NATPMP_OP_ADDRESS = 0
NATPMP_OP_MAP_TCP = 2
NATPMP_RESULTS = {
    0: "success", 1: "unsupported-version", 2: "refused", 3: "network-failure",
    4: "out-of-resources", 5: "unsupported-opcode",
}


@dataclass(frozen=True)
class NatPmpAddress:
    epoch: int
    external_addr: str


@dataclass(frozen=True)
class NatPmpMapResponse:
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def natpmp_address_request() -> bytes:
    """The 2-byte external address request: version 0, opcode 0."""
    return bytes((0, NATPMP_OP_ADDRESS))


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A 12-byte TCP mapping request: version 0, opcode 2, 2 reserved,
    internal port, suggested external port, lifetime (0 deletes; then the
    external port must be 0, RFC 6886 3.4)."""
    return struct.pack("!BBHHHI", 0, NATPMP_OP_MAP_TCP, 0,
                       _check_port(internal_port, "internal_port"),
                       _check_port(external_port, "external_port", True),
                       _check_lifetime(lifetime, True))


def _natpmp_head(data: bytes, op: int, size: int) -> int:
    """Validate version/opcode/result; returns the epoch."""
    data = bytes(data)
    if len(data) > 1100:
        raise PortMapError("natpmp-oversized", f"a NAT-PMP reply of {len(data)} bytes")
    if len(data) >= 4 and data[0] == PCP_VERSION and data[1] & 0x80 and data[3] == 1:
        raise PortMapError("natpmp-unsupported-version", "the gateway speaks PCP, not NAT-PMP",
                           result=1)
    if len(data) < 4:
        raise PortMapError("natpmp-truncated", f"a NAT-PMP reply of {len(data)} bytes")
    version, rop, result = struct.unpack_from("!BBH", data)
    if version != 0:
        raise PortMapError("natpmp-bad-version", f"NAT-PMP reply version {version}, expected 0")
    if rop != 0x80 | op:
        raise PortMapError("natpmp-bad-opcode",
                           f"NAT-PMP reply opcode {rop}, expected {0x80 | op}")
    if result != 0:
        name = NATPMP_RESULTS.get(result, f"result-{result}")
        raise PortMapError(f"natpmp-{name}", f"the NAT-PMP gateway refused: result {result} "
                           f"({name})", result=result)
    if len(data) < size:
        raise PortMapError("natpmp-truncated", f"a NAT-PMP reply of {len(data)} bytes, "
                           f"expected {size}")
    return struct.unpack_from("!I", data, 4)[0]


def natpmp_decode_address_response(data: bytes) -> NatPmpAddress:
    """12 bytes: version 0, opcode 128, result (2), epoch (4), address (4)."""
    epoch = _natpmp_head(data, NATPMP_OP_ADDRESS, 12)
    return NatPmpAddress(epoch, socket.inet_ntoa(bytes(data[8:12])))


def natpmp_decode_map_response(data: bytes, internal_port: Optional[int] = None
                               ) -> NatPmpMapResponse:
    """16 bytes: version 0, opcode 130, result (2), epoch (4), internal port,
    mapped external port, lifetime (4)."""
    epoch = _natpmp_head(data, NATPMP_OP_MAP_TCP, 16)
    iport, eport, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal_port is not None and iport != internal_port:
        raise PortMapError("natpmp-mismatch", f"the NAT-PMP reply is for internal port {iport}")
    return NatPmpMapResponse(epoch, iport, eport, lifetime)


# --- UPnP-IGD: HTTP, SSDP, description, SOAP -----------------------------------------

SSDP_ADDR = ("239.255.255.250", 1900)
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:1",
                  "urn:schemas-upnp-org:service:WANIPConnection:2")
_SERVICE_PREFIXES = ("urn:schemas-upnp-org:service:WANIPConnection:",
                     "urn:schemas-upnp-org:service:WANPPPConnection:")
MAX_HEAD = 16 * 1024        # an HTTP or SSDP head
MAX_XML = 64 * 1024         # a description or SOAP body
MAX_SSDP = 8 * 1024
UPNP_ERRORS = {
    401: "InvalidAction", 402: "InvalidArgs", 501: "ActionFailed", 606: "ActionNotAuthorized",
    714: "NoSuchEntryInArray", 715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort", 718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired", 725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard", 727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable", 729: "ConflictWithOtherMechanisms",
    732: "WildCardNotPermittedInIntPort",
}


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: Dict[str, str]     # lower-case names
    body: bytes


@dataclass(frozen=True)
class IgdService:
    """Where to send SOAP actions: an absolute http:// control URL."""
    control_url: str
    service_type: str


def _split_head(data: bytes, what: str) -> Tuple[str, Dict[str, str], int]:
    """(start line, headers, offset of the body) of a complete head."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise PortMapError("upnp-malformed", f"{what}: no end of head")
    if end > MAX_HEAD:
        raise PortMapError("upnp-oversized", f"{what}: a head over {MAX_HEAD} bytes")
    try:
        lines = data[:end].decode("iso-8859-1").split("\r\n")
    except UnicodeDecodeError as exc:       # pragma: no cover - latin-1 decodes anything
        raise PortMapError("upnp-malformed", f"{what}: undecodable head") from exc
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise PortMapError("upnp-malformed", f"{what}: bad header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers, end + 4


def _status(line: str, what: str) -> Tuple[int, str]:
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 \
            or not _digits(parts[1], 3):
        raise PortMapError("upnp-malformed", f"{what}: bad status line {line[:60]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def ssdp_msearch(st: str = IGD_DEVICE, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for search target ``st`` (UDA 1.1: MX 1..5 seconds)."""
    if not 1 <= mx <= 5:
        raise ValueError("MX is 1..5 seconds")
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
            f'MAN: "ssdp:discover"\r\nMX: {mx}\r\nST: {st}\r\n\r\n').encode("ascii")


def _http_url(url: str, what: str) -> Tuple[str, int, str]:
    """(IPv4 host, port, path?query) of an http:// URL with a literal address."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise PortMapError("upnp-bad-url", f"{what}: bad URL {url[:100]!r}") from exc
    host = parts.hostname or ""
    try:
        ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise PortMapError("upnp-bad-url", f"{what}: not an http://IPv4 URL: {url[:100]!r}") \
            from exc
    if parts.scheme != "http":
        raise PortMapError("upnp-bad-url", f"{what}: not an http:// URL: {url[:100]!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, target


def ssdp_location(data: bytes, source: Optional[str] = None) -> str:
    """The LOCATION of an SSDP search reply (``HTTP/1.1 200 OK``). With
    ``source`` (the reply's sender) the location must be on that address."""
    if len(data) > MAX_SSDP:
        raise PortMapError("upnp-oversized", f"an SSDP reply of {len(data)} bytes")
    line, headers, _ = _split_head(bytes(data), "SSDP reply")
    status, _ = _status(line, "SSDP reply")
    if status != 200:
        raise PortMapError("upnp-malformed", f"SSDP reply status {status}")
    location = headers.get("location", "")
    if not location:
        raise PortMapError("upnp-malformed", "an SSDP reply without LOCATION")
    host, _, _ = _http_url(location, "SSDP LOCATION")
    if source is not None and host != source:
        raise PortMapError("upnp-bad-url", f"SSDP LOCATION {location[:100]} is not on the "
                           f"replying address {source}")
    return location


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_xml(data: bytes, what: str) -> ET.Element:
    data = bytes(data)
    if len(data) > MAX_XML:
        raise PortMapError("upnp-oversized",
                           f"{what}: {len(data)} bytes of XML (at most {MAX_XML})")
    if b"<!doctype" in data.lower() or b"<!entity" in data.lower():
        # no DTDs at all: no entity expansion bombs, no external entities
        raise PortMapError("upnp-bad-xml", f"{what}: XML with a DTD or entity declaration")
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError) as exc:
        raise PortMapError("upnp-bad-xml", f"{what}: {exc}") from exc


def _child_text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def parse_root_description(data: bytes, location: str) -> IgdService:
    """The first WANIPConnection service (else WANPPPConnection) of an IGD
    root description fetched from ``location``; its control URL resolved
    against URLBase (or ``location``) and required on ``location``'s host."""
    root = _parse_xml(data, "the root description")
    base = location
    for element in root.iter():
        if _local(element.tag) == "URLBase" and (element.text or "").strip():
            base = element.text.strip()
            break
    services = [(_child_text(e, "serviceType"), _child_text(e, "controlURL"))
                for e in root.iter() if _local(e.tag) == "service"]
    for prefix in _SERVICE_PREFIXES:
        for service_type, control in services:
            if service_type.startswith(prefix) and control:
                url = urljoin(base, control)
                host, port, _ = _http_url(url, "the control URL")
                lhost, lport, _ = _http_url(location, "the description's location")
                if host != lhost:
                    raise PortMapError("upnp-bad-url", f"the control URL {url[:100]} is not on "
                                       f"the gateway {lhost}")
                return IgdService(url, service_type)
    raise PortMapError("upnp-no-service", "the gateway's description has no "
                       "WANIPConnection or WANPPPConnection service with a control URL")


def soap_envelope(service_type: str, action: str, args: Sequence[Tuple[str, str]] = ()) -> bytes:
    """A SOAP 1.1 request body for ``action`` of ``service_type``, its
    arguments in the given (the specification's) order."""
    inner = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in args)
    return ('<?xml version="1.0"?>\r\n'
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}>'
            "</s:Body></s:Envelope>\r\n").encode("utf-8")


def soap_get_external_ip(service_type: str) -> bytes:
    return soap_envelope(service_type, "GetExternalIPAddress")


def soap_add_port_mapping(service_type: str, external_port: int, internal_addr: str,
                          internal_port: int, lifetime: int,
                          description: str = DESCRIPTION) -> bytes:
    _ipv4(internal_addr, "internal_addr")
    return soap_envelope(service_type, "AddPortMapping", [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(_check_port(external_port, "external_port"))),
        ("NewProtocol", "TCP"),
        ("NewInternalPort", str(_check_port(internal_port, "internal_port"))),
        ("NewInternalClient", internal_addr),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(_check_lifetime(lifetime))),
    ])


def soap_delete_port_mapping(service_type: str, external_port: int) -> bytes:
    return soap_envelope(service_type, "DeletePortMapping", [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(_check_port(external_port, "external_port"))),
        ("NewProtocol", "TCP"),
    ])


def parse_soap_response(body: bytes, action: str, status: int = 200) -> Dict[str, str]:
    """The out-arguments of ``<action>Response``; a SOAP fault raises
    ``upnp-fault-<errorCode>`` (``.result`` the code), another non-200 status
    ``upnp-http-<status>``."""
    try:
        root = _parse_xml(body, f"the {action} reply")
    except PortMapError:
        if status != 200:
            raise PortMapError(f"upnp-http-{status}", f"{action}: HTTP status {status}") from None
        raise
    for element in root.iter():
        if _local(element.tag) == "Fault":
            code_text, description, fault = "", "", _child_text(element, "faultstring")
            for e in element.iter():
                if _local(e.tag) == "errorCode":
                    code_text = (e.text or "").strip()
                elif _local(e.tag) == "errorDescription":
                    description = (e.text or "").strip()
            if not _digits(code_text, 4):
                raise PortMapError("upnp-fault", f"{action}: SOAP fault {fault[:80]!r} "
                                   f"without a UPnP error code")
            code = int(code_text)
            description = description[:120] or UPNP_ERRORS.get(code, fault[:80])
            raise PortMapError(f"upnp-fault-{code}", f"{action} failed: UPnP error {code} "
                               f"{description}", result=code)
    if status != 200:
        raise PortMapError(f"upnp-http-{status}", f"{action}: HTTP status {status}")
    for element in root.iter():
        if _local(element.tag) == f"{action}Response":
            return {_local(child.tag): (child.text or "").strip() for child in element}
    raise PortMapError("upnp-malformed", f"no {action}Response in the reply")


def http_request(method: str, url: str, body: bytes = b"",
                 headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """An HTTP/1.1 request (Connection: close) for an http://IPv4 URL."""
    host, port, target = _http_url(url, "request")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "User-Agent: Linux UPnP/1.1 fastpunch"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1") + body


def _dechunk(data: bytes, eof: bool) -> Optional[bytes]:
    body, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            if len(data) - pos > 64:
                raise PortMapError("upnp-malformed", "HTTP: a chunk size line too long")
            break
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not 0 < len(size_text) <= 8 or size_text.strip(b"0123456789abcdefABCDEF"):
            raise PortMapError("upnp-malformed", "HTTP: bad chunk size")
        size = int(size_text, 16)
        if len(body) + size > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body over {MAX_XML} bytes")
        if size == 0:
            if data.find(b"\r\n\r\n", end) < 0:     # the trailer's end (none: CRLF CRLF)
                break
            return bytes(body)
        if len(data) < end + 2 + size + 2:
            break
        if data[end + 2 + size:end + 4 + size] != b"\r\n":
            raise PortMapError("upnp-malformed", "HTTP: a chunk without its CRLF")
        body += data[end + 2:end + 2 + size]
        pos = end + 4 + size
    if eof:
        raise PortMapError("upnp-truncated", "HTTP: the connection closed inside a chunked body")
    return None


def parse_http_response(data: bytes, eof: bool = False) -> Optional[HttpResponse]:
    """The response in ``data`` once complete (Content-Length, chunked, or
    up to the end of the connection when ``eof``); None while more is
    needed. Heads over 16 KiB and bodies over 64 KiB are refused."""
    data = bytes(data)
    if data.find(b"\r\n\r\n") < 0:
        if len(data) > MAX_HEAD:
            raise PortMapError("upnp-oversized", f"HTTP: a head over {MAX_HEAD} bytes")
        if eof:
            raise PortMapError("upnp-truncated", f"HTTP: the connection closed after "
                               f"{len(data)} bytes, inside the head")
        return None
    line, headers, start = _split_head(data, "HTTP response")
    status, reason = _status(line, "HTTP response")
    rest = data[start:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest, eof)
        if body is None:
            return None
    elif "content-length" in headers:
        text = headers["content-length"]
        if not _digits(text, 9):
            raise PortMapError("upnp-malformed", f"HTTP: bad Content-Length {text[:20]!r}")
        length = int(text)
        if length > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body of {length} bytes "
                               f"(at most {MAX_XML})")
        if len(rest) < length:
            if eof:
                raise PortMapError("upnp-truncated", f"HTTP: {len(rest)} of {length} body "
                                   "bytes before the connection closed")
            return None
        body = rest[:length]
    else:
        if len(rest) > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body over {MAX_XML} bytes")
        if not eof:
            return None
        body = rest
    return HttpResponse(status, reason, headers, body)


# --- the default gateway ---------------------------------------------------------------

_RTF_UP, _RTF_GATEWAY = 0x1, 0x2


def parse_proc_net_route(text: str, byteorder: str = sys.byteorder) -> Optional[str]:
    """The default route's gateway from /proc/net/route text (the route
    with destination and mask 0, up and via a gateway, lowest metric).
    Addresses there are hexadecimal in the host's byte order (little-endian
    on x86 and ARM, big-endian on many MIPS routers)."""
    best: Optional[Tuple[int, str]] = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest, gateway, flags = (int(fields[i], 16) for i in (1, 2, 3))
            metric, mask = int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        wanted = _RTF_UP | _RTF_GATEWAY
        if dest or mask or not gateway or flags & wanted != wanted:
            continue
        if not 0 <= gateway <= 0xFFFFFFFF:
            continue
        addr = socket.inet_ntoa(gateway.to_bytes(4, "little" if byteorder == "little" else "big"))
        if best is None or metric < best[0]:
            best = (metric, addr)
    return best[1] if best else None


def default_gateway() -> Optional[str]:
    """This network namespace's default IPv4 gateway, or None. Reads
    /proc/thread-self/net/route: the calling thread's namespace (a thread
    moved into another namespace sees that one's routes; /proc/net is the
    process leader's)."""
    for path in ("/proc/thread-self/net/route", "/proc/net/route"):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return parse_proc_net_route(f.read(64 * 1024))
        except OSError:
            continue
    return None


# --- transports ------------------------------------------------------------------------

@dataclass(frozen=True)
class Mapping:
    """A granted mapping: inbound TCP to ``external_addr:external_port``
    reaches ``internal_addr:internal_port`` for ``lifetime`` seconds."""
    protocol: str               # "pcp" | "natpmp" | "upnp"
    gateway: str                # the address that granted it
    internal_addr: str
    internal_port: int
    external_addr: str
    external_port: int
    lifetime: int               # as granted (UPnP: as requested, it does not say)
    nonce: bytes = field(default=b"", repr=False)   # PCP: deleting needs it
    control_url: str = ""       # UPnP
    service_type: str = ""      # UPnP


class _Datagrams(asyncio.DatagramProtocol):
    """Received datagrams (and ICMP errors) as a bounded queue."""

    def __init__(self) -> None:
        self.queue: "asyncio.Queue[Tuple[bytes, object]]" = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((b"", exc))


async def _next(proto: _Datagrams, until: float) -> Optional[Tuple[bytes, object]]:
    """The next datagram (or error) before loop time ``until``; None after."""
    loop = asyncio.get_running_loop()
    remaining = until - loop.time()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(proto.queue.get(), remaining)
    except asyncio.TimeoutError:
        return None


class _Exchange:
    """A connected UDP socket to gateway:port (so ICMP errors surface),
    sending requests on RETRY_SCHEDULE within one budget."""

    def __init__(self, what: str, deadline: float) -> None:
        self.what = what
        self.deadline = deadline
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.proto = _Datagrams()

    async def open(self, gateway: str, port: int) -> str:
        """Returns this host's address toward the gateway."""
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: self.proto, remote_addr=(gateway, port), family=socket.AF_INET)
        except OSError as exc:
            raise PortMapError("network", f"{self.what}: cannot reach {gateway}: {exc}") from exc
        return self.transport.get_extra_info("sockname")[0]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def ask(self, request: bytes, decode):
        """Send ``request`` until ``decode`` accepts a reply. A decode error
        carrying the gateway's result code ends the exchange; any other
        (malformed, stale, not ours) is ignored and reported on timeout."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        rejected: Optional[PortMapError] = None
        for wait in RETRY_SCHEDULE:
            if loop.time() >= self.deadline:
                break
            self.transport.sendto(request)
            until = min(loop.time() + wait, self.deadline)
            while True:
                item = await _next(self.proto, until)
                if item is None:
                    break
                data, extra = item
                if isinstance(extra, ConnectionRefusedError):
                    raise PortMapError("unreachable", f"{self.what}: the gateway answered port "
                                       "unreachable (no daemon)")
                if isinstance(extra, OSError):
                    raise PortMapError("network", f"{self.what}: {extra}")
                try:
                    return decode(data)
                except PortMapError as exc:
                    if exc.result is not None:
                        raise
                    rejected = exc
        more = f"; a reply was rejected: {rejected}" if rejected else ""
        raise PortMapError("timeout", f"{self.what}: no answer in time{more}")


def _check_third_party(what: str, internal_addr: str, local: str) -> str:
    if internal_addr in ("", "0.0.0.0"):
        return local
    if internal_addr != local:
        raise PortMapError("third-party", f"{what} maps for the requesting address only "
                           f"({local}), not {internal_addr}")
    return internal_addr


async def _pcp_map(gateway: str, internal_addr: str, internal_port: int, external_port: int,
                   lifetime: int, deadline: float, nonce: Optional[bytes] = None,
                   external_addr: str = "0.0.0.0") -> Tuple[str, bytes, PcpMapResponse]:
    ex = _Exchange("PCP", deadline)
    try:
        local = await ex.open(gateway, PCP_PORT)
        internal_addr = _check_third_party("PCP", internal_addr, local)
        nonce = nonce if nonce is not None else os.urandom(12)
        request = pcp_map_request(nonce, internal_addr, internal_port, lifetime,
                                  external_port=external_port, external_addr=external_addr)
        reply = await ex.ask(request, lambda data: pcp_decode_map_response(
            data, nonce, internal_port=internal_port))
        return internal_addr, nonce, reply
    finally:
        ex.close()


async def _map_pcp(gateway: str, internal_addr: str, internal_port: int, external_port: int,
                   lifetime: int, deadline: float) -> Mapping:
    internal_addr, nonce, reply = await _pcp_map(gateway, internal_addr, internal_port,
                                                 external_port, lifetime, deadline)
    return Mapping("pcp", gateway, internal_addr, internal_port, reply.external_addr,
                   reply.external_port, reply.lifetime, nonce=nonce)


async def _map_natpmp(gateway: str, internal_addr: str, internal_port: int,
                      external_port: int, lifetime: int, deadline: float) -> Mapping:
    ex = _Exchange("NAT-PMP", deadline)
    try:
        local = await ex.open(gateway, NATPMP_PORT)
        internal_addr = _check_third_party("NAT-PMP", internal_addr, local)
        address = await ex.ask(natpmp_address_request(), natpmp_decode_address_response)
        reply = await ex.ask(natpmp_map_request(internal_port, external_port, lifetime),
                             lambda data: natpmp_decode_map_response(data, internal_port))
    finally:
        ex.close()
    if reply.lifetime == 0 or reply.external_port == 0:
        raise PortMapError("natpmp-malformed", "the NAT-PMP gateway granted no port")
    return Mapping("natpmp", gateway, internal_addr, internal_port, address.external_addr,
                   reply.external_port, reply.lifetime)


def _local_addr_toward(gateway: str) -> Optional[str]:
    from fastpunch.punch.base import route_source

    with contextlib.suppress(OSError):
        return route_source(gateway)
    return None


async def _ssdp_discover(gateway: Optional[str], deadline: float) -> str:
    """The LOCATION of the first IGD answering an M-SEARCH (from
    ``gateway`` only, when given)."""
    loop = asyncio.get_running_loop()
    proto = _Datagrams()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: proto, local_addr=("0.0.0.0", 0), family=socket.AF_INET)
    except OSError as exc:
        raise PortMapError("network", f"SSDP: {exc}") from exc
    try:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        local = _local_addr_toward(gateway) if gateway else None
        if local:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
        searches = [ssdp_msearch(st) for st in (IGD_DEVICE,) + WANIP_SERVICES]
        rejected: Optional[PortMapError] = None
        for wait in RETRY_SCHEDULE:
            if loop.time() >= deadline:
                break
            for message in searches:
                try:
                    transport.sendto(message, SSDP_ADDR)
                except OSError as exc:
                    raise PortMapError("network", f"SSDP: {exc}") from exc
            until = min(loop.time() + wait, deadline)
            while True:
                item = await _next(proto, until)
                if item is None:
                    break
                data, source = item
                if isinstance(source, Exception):
                    continue
                host = source[0] if isinstance(source, tuple) else ""
                if gateway and host != gateway:
                    continue
                try:
                    return ssdp_location(data, host)
                except PortMapError as exc:
                    rejected = exc
        more = f"; a reply was rejected: {rejected}" if rejected else ""
        raise PortMapError("timeout", f"SSDP: no gateway answered the M-SEARCH in time{more}")
    finally:
        transport.close()


async def _http(method: str, url: str, deadline: float, body: bytes = b"",
                headers: Sequence[Tuple[str, str]] = ()) -> HttpResponse:
    """One bounded HTTP/1.1 exchange (connection closed after it)."""
    loop = asyncio.get_running_loop()
    host, port, _ = _http_url(url, "request")
    request = http_request(method, url, body, headers)

    async def exchange() -> HttpResponse:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            buf = bytearray()
            while True:
                chunk = await reader.read(8192)
                buf += chunk
                if len(buf) > MAX_HEAD + MAX_XML + 1024:
                    raise PortMapError("upnp-oversized", f"HTTP: over {len(buf)} bytes")
                response = parse_http_response(bytes(buf), eof=not chunk)
                if response is not None:
                    return response
        finally:
            writer.close()

    remaining = deadline - loop.time()
    if remaining <= 0:
        raise PortMapError("timeout", f"UPnP: no time left for {method} {url[:100]}")
    try:
        return await asyncio.wait_for(exchange(), remaining)
    except asyncio.TimeoutError:
        raise PortMapError("timeout", f"UPnP: {method} {url[:100]} took too long") from None
    except OSError as exc:
        code = "unreachable" if isinstance(exc, ConnectionRefusedError) else "network"
        raise PortMapError(code, f"UPnP: {method} {url[:100]}: {exc}") from exc


async def _soap(service: IgdService, action: str, body: bytes, deadline: float
                ) -> Dict[str, str]:
    response = await _http("POST", service.control_url, deadline, body, [
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", f'"{service.service_type}#{action}"'),
    ])
    return parse_soap_response(response.body, action, response.status)


_igd_cache: Dict[tuple, Tuple[IgdService, float]] = {}


def _igd_key(gateway: Optional[str]) -> tuple:
    """Cache key: this thread's network namespace and the gateway (lab
    devices of one process live in different namespaces)."""
    try:
        netns = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        netns = 0
    return netns, gateway


async def _igd_service(gateway: Optional[str], deadline: float) -> Tuple[IgdService, bool]:
    """The gateway's WAN connection service and whether it came from the
    cache; discovered (SSDP, then the description) when not cached."""
    key = _igd_key(gateway)
    hit = _igd_cache.get(key)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0], True
    location = await _ssdp_discover(gateway, deadline)
    response = await _http("GET", location, deadline)
    if response.status != 200:
        raise PortMapError(f"upnp-http-{response.status}", f"GET {location[:100]}: HTTP "
                           f"status {response.status}")
    service = parse_root_description(response.body, location)
    _igd_cache[key] = (service, time.monotonic() + IGD_CACHE_SECONDS)
    return service, False


def _stale(exc: PortMapError) -> bool:
    """An error that says the cached control URL no longer serves (the
    gateway rebooted onto another port or path), not a refusal."""
    return exc.code in ("network", "unreachable", "timeout") or exc.code.startswith("upnp-http-")


async def _map_upnp(gateway: Optional[str], internal_addr: str, internal_port: int,
                    external_port: int, lifetime: int, deadline: float) -> Mapping:
    service, cached = await _igd_service(gateway, deadline)
    try:
        return await _add_upnp(service, internal_addr, internal_port, external_port, lifetime,
                               deadline)
    except PortMapError as exc:
        if not (cached and _stale(exc)):
            raise
        _igd_cache.pop(_igd_key(gateway), None)          # discover again, once
    service, _ = await _igd_service(gateway, deadline)
    return await _add_upnp(service, internal_addr, internal_port, external_port, lifetime,
                           deadline)


async def _add_upnp(service: IgdService, internal_addr: str, internal_port: int,
                    external_port: int, lifetime: int, deadline: float) -> Mapping:
    igd = _http_url(service.control_url, "control URL")[0]
    if internal_addr in ("", "0.0.0.0"):
        internal_addr = _local_addr_toward(igd) or internal_addr
    out = await _soap(service, "GetExternalIPAddress", soap_get_external_ip(service.service_type),
                      deadline)
    external_addr = out.get("NewExternalIPAddress", "")
    try:
        if ipaddress.IPv4Address(external_addr).is_unspecified:
            raise ValueError
    except ValueError:
        raise PortMapError("upnp-no-external-address", "the gateway has no external "
                           f"address: {external_addr[:40]!r}") from None
    await _soap(service, "AddPortMapping", soap_add_port_mapping(
        service.service_type, external_port, internal_addr, internal_port, lifetime), deadline)
    return Mapping("upnp", igd, internal_addr, internal_port, external_addr, external_port,
                   lifetime, control_url=service.control_url, service_type=service.service_type)


async def map_port(internal_addr: str, internal_port: int, *, gateway: Optional[str] = None,
                   lifetime: int = 120, external_port: Optional[int] = None,
                   protocols: Sequence[str] = PROTOCOLS,
                   timeout: float = DEFAULT_TIMEOUT) -> Mapping:
    """Ask the gateway to forward inbound TCP to ``internal_addr:internal_port``.

    ``protocols`` are tried in order; the first granted mapping is returned.
    ``gateway`` defaults to :func:`default_gateway` (PCP and NAT-PMP need
    it; UPnP then accepts SSDP replies from it only). ``external_port``
    None asks for the internal port (the gateway may grant another, PCP and
    NAT-PMP say which). ``internal_addr`` "0.0.0.0" means this host's
    address toward the gateway. ``timeout`` bounds each protocol's try.
    Raises :class:`PortMapError` ``"no-mapping"`` with ``failures`` (one
    error per protocol) when none was granted."""
    _ipv4(internal_addr or "0.0.0.0", "internal_addr")
    _check_port(internal_port, "internal_port")
    _check_lifetime(lifetime)
    want = internal_port if external_port is None else _check_port(external_port, "external_port")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols are some of {PROTOCOLS}: {tuple(protocols)!r}")
    if gateway is not None:
        _ipv4(gateway, "gateway")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive: {timeout!r}")
    gw = gateway or default_gateway()
    loop = asyncio.get_running_loop()
    failures: Dict[str, PortMapError] = {}
    for protocol in protocols:
        deadline = loop.time() + timeout
        try:
            if protocol == "upnp":
                return await _map_upnp(gw, internal_addr, internal_port, want, lifetime, deadline)
            if gw is None:
                raise PortMapError("no-gateway", "no default IPv4 gateway in this namespace")
            if internal_port < LOW_PORTS:
                raise PortMapError("low-port", f"{protocol}: not asking for internal port "
                                   f"{internal_port} (below {LOW_PORTS}: miniupnpd's default "
                                   "permissions refuse it only after a minute-long stall)")
            runner = _map_pcp if protocol == "pcp" else _map_natpmp
            return await runner(gw, internal_addr, internal_port, want, lifetime, deadline)
        except PortMapError as exc:
            failures[protocol] = exc
    why = "; ".join(f"{p}: {e}" for p, e in failures.items())
    raise PortMapError("no-mapping", f"no port mapping for {internal_addr}:{internal_port} "
                       f"({why})", failures=failures)


async def unmap(mapping: Mapping, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Delete ``mapping`` at its gateway: PCP lifetime 0 with its nonce,
    NAT-PMP lifetime 0, UPnP DeletePortMapping. Raises PortMapError when the
    gateway does not confirm (callers cleaning up may ignore it: the mapping
    expires with its lifetime anyway)."""
    deadline = asyncio.get_running_loop().time() + timeout
    if mapping.protocol == "pcp":
        _, _, reply = await _pcp_map(mapping.gateway, mapping.internal_addr,
                                     mapping.internal_port, mapping.external_port, 0, deadline,
                                     nonce=mapping.nonce, external_addr=mapping.external_addr)
        if reply.lifetime != 0:
            raise PortMapError("pcp-not-deleted", f"the PCP server kept the mapping for "
                               f"{reply.lifetime} s")
    elif mapping.protocol == "natpmp":
        ex = _Exchange("NAT-PMP", deadline)
        try:
            local = await ex.open(mapping.gateway, NATPMP_PORT)
            _check_third_party("NAT-PMP", mapping.internal_addr, local)
            reply = await ex.ask(natpmp_map_request(mapping.internal_port, 0, 0),
                                 lambda data: natpmp_decode_map_response(
                                     data, mapping.internal_port))
        finally:
            ex.close()
        if reply.lifetime != 0:
            raise PortMapError("natpmp-not-deleted", f"the NAT-PMP gateway kept the mapping "
                               f"for {reply.lifetime} s")
    elif mapping.protocol == "upnp":
        service = IgdService(mapping.control_url, mapping.service_type)
        await _soap(service, "DeletePortMapping",
                    soap_delete_port_mapping(service.service_type, mapping.external_port),
                    deadline)
    else:
        raise ValueError(f"not a mapping of {PROTOCOLS}: {mapping.protocol!r}")


@contextlib.asynccontextmanager
async def mapped(internal_addr: str, internal_port: int, **kwargs) -> AsyncIterator[Mapping]:
    """``async with mapped(addr, port) as m:`` a :func:`map_port` mapping,
    deleted on the way out (a failed deletion is ignored: it expires)."""
    mapping = await map_port(internal_addr, internal_port, **kwargs)
    try:
        yield mapping
    finally:
        with contextlib.suppress(PortMapError, OSError):
            await unmap(mapping, timeout=kwargs.get("timeout", DEFAULT_TIMEOUT))
