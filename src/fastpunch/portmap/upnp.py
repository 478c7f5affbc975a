"""UPnP-IGD: SSDP M-SEARCH multicast to 239.255.255.250:1900 (for the
InternetGatewayDevice:1 and the WANIPConnection:1/2 services), the root
description fetched from the reply's LOCATION, then SOAP
GetExternalIPAddress and AddPortMapping to the WANIPConnection (or
WANPPPConnection) control URL.

SSDP replies are accepted only from the gateway when it is known, and only
with a LOCATION (and control URL) on the replying address itself. A
discovered control URL is reused for :data:`IGD_CACHE_SECONDS` per network
namespace and gateway, and discovered again once when it stops answering.

The message builders and parsers (``ssdp_*``, :func:`parse_root_description`,
``soap_*``, :func:`parse_soap_response`) are pure; the HTTP they travel in
is :mod:`fastpunch.portmap.http`. Descriptions and SOAP bodies are bounded
(64 KiB) and parsed without DTDs."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple
from urllib.parse import urljoin

from ._common import Mapping, PortMapError, _check_lifetime, _check_port, _digits, _ipv4
from ._exchange import RETRY_SCHEDULE, _Datagrams, _next
from .gateway import _local_addr_toward

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
from .http import (MAX_HEAD, MAX_XML, HttpResponse, _http_url, _split_head, _status,
                   http_request, parse_http_response)

__all__ = ["SSDP_ADDR", "IGD_DEVICE", "WANIP_SERVICES", "IgdService", "UPNP_ERRORS",
           "ssdp_msearch", "ssdp_location", "parse_root_description", "soap_envelope",
           "soap_get_external_ip", "soap_add_port_mapping", "soap_delete_port_mapping",
           "parse_soap_response"]


SSDP_ADDR = ("239.255.255.250", 1900)
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:1",
                  "urn:schemas-upnp-org:service:WANIPConnection:2")
_SERVICE_PREFIXES = ("urn:schemas-upnp-org:service:WANIPConnection:",
                     "urn:schemas-upnp-org:service:WANPPPConnection:")
MAX_SSDP = 8 * 1024
DESCRIPTION = "fastpunch"               # the UPnP mapping's description
# A discovered IGD (its control URL) is reused this long per namespace and
# gateway: SSDP and the description GET are most of a UPnP mapping's time.
IGD_CACHE_SECONDS = 120.0
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
class IgdService:
    """Where to send SOAP actions: an absolute http:// control URL."""
    control_url: str
    service_type: str


def ssdp_msearch(st: str = IGD_DEVICE, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for search target ``st`` (UDA 1.1: MX 1..5 seconds)."""
    if not 1 <= mx <= 5:
        raise ValueError("MX is 1..5 seconds")
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
            f'MAN: "ssdp:discover"\r\nMX: {mx}\r\nST: {st}\r\n\r\n').encode("ascii")


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


_ENCODING = re.compile(r"""<\?xml[^>]*?\bencoding\s*=\s*["']([^"']+)["']""")


def _escape(text: str) -> str:
    """Text for an XML element or a double-quoted attribute (xml.sax.saxutils'
    escape would do, but importing it loads urllib.request and http.client:
    4 MB on a device that only asks its gateway for a port)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _parse_xml(data: bytes, what: str) -> ET.Element:
    data = bytes(data)
    if len(data) > MAX_XML:
        raise PortMapError("upnp-oversized",
                           f"{what}: {len(data)} bytes of XML (at most {MAX_XML})")
    # UTF-8 only (what UPnP specifies), so that the check below reads the
    # very text the parser will: a UTF-16 or EBCDIC document would hide a
    # DTD from a look at its bytes
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PortMapError("upnp-bad-xml", f"{what}: XML that is not UTF-8") from None
    declared = _ENCODING.match(text.lstrip("\ufeff"))
    if declared and declared.group(1).lower().replace("_", "-") not in ("utf-8", "utf8",
                                                                         "us-ascii", "ascii"):
        raise PortMapError("upnp-bad-xml", f"{what}: XML declared as {declared.group(1)}, "
                                           "not UTF-8")
    if "<!doctype" in text.lower() or "<!entity" in text.lower():
        # no DTDs at all: no entity expansion bombs, no external entities
        raise PortMapError("upnp-bad-xml", f"{what}: XML with a DTD or entity declaration")
    # imported here, when a gateway has answered: a device whose network has
    # no UPnP gateway never loads the XML parser (issue 18's idle memory)
    import xml.etree.ElementTree as ET

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
    inner = "".join(f"<{name}>{_escape(str(value))}</{name}>" for name, value in args)
    return ('<?xml version="1.0"?>\r\n'
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{_escape(service_type)}">{inner}</u:{action}>'
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
    now = time.monotonic()
    for stale in [k for k, (_, until) in _igd_cache.items() if until <= now]:
        del _igd_cache[stale]               # (one entry per namespace and gateway seen)
    _igd_cache[key] = (service, now + IGD_CACHE_SECONDS)
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


async def _unmap_upnp(mapping: Mapping, deadline: float) -> None:
    """Delete ``mapping``: SOAP DeletePortMapping at its control URL."""
    service = IgdService(mapping.control_url, mapping.service_type)
    await _soap(service, "DeletePortMapping",
                soap_delete_port_mapping(service.service_type, mapping.external_port), deadline)
