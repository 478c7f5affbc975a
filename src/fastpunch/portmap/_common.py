"""What every part of :mod:`fastpunch.portmap` shares: :class:`PortMapError`
(every failure, with a stable ``code``), :class:`Mapping` (a granted
mapping) and the checks of ports, lifetimes, digits and IPv4 addresses that
the encoders and :func:`~fastpunch.portmap.map_port` apply to their
arguments."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Dict, Optional

from fastpunch.errors import FastpunchError


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


def _check_port(port: int, what: str, zero: bool = False) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or \
            not (0 if zero else 1) <= port <= 0xFFFF:
        raise ValueError(f"{what} must be a port number: {port!r}")
    return port


def _check_lifetime(lifetime: int, zero: bool = False) -> int:
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or \
            not (0 if zero else 1) <= lifetime <= 0xFFFFFFFF:
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
