"""NAT-PMP (RFC 6886): a public-address request then a TCP mapping request,
to UDP port 5351 of the default gateway (the port PCP uses).

The request encoders and reply decoders are pure; ``_map_natpmp`` and
``_unmap_natpmp`` carry them over the shared UDP exchange."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

from ._common import Mapping, PortMapError, _check_lifetime, _check_port
from ._exchange import _check_third_party, _Exchange
from .pcp import PCP_VERSION

__all__ = ["NATPMP_PORT", "NATPMP_RESULTS", "NatPmpAddress", "NatPmpMapResponse",
           "natpmp_address_request", "natpmp_decode_address_response", "natpmp_map_request",
           "natpmp_decode_map_response"]


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


async def _unmap_natpmp(mapping: Mapping, deadline: float) -> None:
    """Delete ``mapping``: a TCP mapping request with lifetime 0 (and
    external port 0, RFC 6886 3.4)."""
    ex = _Exchange("NAT-PMP", deadline)
    try:
        local = await ex.open(mapping.gateway, NATPMP_PORT)
        _check_third_party("NAT-PMP", mapping.internal_addr, local)
        reply = await ex.ask(natpmp_map_request(mapping.internal_port, 0, 0),
                             lambda data: natpmp_decode_map_response(data, mapping.internal_port))
    finally:
        ex.close()
    if reply.lifetime != 0:
        raise PortMapError("natpmp-not-deleted", f"the NAT-PMP gateway kept the mapping "
                           f"for {reply.lifetime} s")
