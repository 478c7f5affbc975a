"""PCP (RFC 6887): a MAP request for TCP over IPv4 (addresses as IPv4-mapped
IPv6), to UDP port 5351 of the default gateway. The reply must echo the
request's random 12-byte nonce.

:func:`pcp_map_request` and :func:`pcp_decode_map_response` are pure;
``_map_pcp`` and ``_unmap_pcp`` carry them over the shared UDP exchange."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from ._common import Mapping, PortMapError, _check_lifetime, _check_port, _ipv4
from ._exchange import _check_third_party, _Exchange

__all__ = ["PCP_PORT", "PCP_RESULTS", "PcpMapResponse", "pcp_map_request",
           "pcp_decode_map_response"]


TCP = 6
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
    if reply.lifetime == 0 or reply.external_port == 0:
        # a "success" that grants nothing (RFC 6887 11.4: lifetime 0 is a
        # deletion) is no mapping to announce to a peer
        raise PortMapError("pcp-malformed", "the PCP server granted no port "
                           f"(lifetime {reply.lifetime}, port {reply.external_port})")
    return Mapping("pcp", gateway, internal_addr, internal_port, reply.external_addr,
                   reply.external_port, reply.lifetime, nonce=nonce)


async def _unmap_pcp(mapping: Mapping, deadline: float) -> None:
    """Delete ``mapping``: a MAP request with lifetime 0 and its nonce."""
    _, _, reply = await _pcp_map(mapping.gateway, mapping.internal_addr, mapping.internal_port,
                                 mapping.external_port, 0, deadline, nonce=mapping.nonce,
                                 external_addr=mapping.external_addr)
    if reply.lifetime != 0:
        raise PortMapError("pcp-not-deleted", f"the PCP server kept the mapping for "
                           f"{reply.lifetime} s")
