"""Addresses as sockets give them: one spelling per address, its family,
and the key a per-source budget counts it under.

A dual-stack listener (``::``) sees an IPv4 peer as ``::ffff:a.b.c.d``;
everything past the socket (the reflexive address a device is told, the
candidates the CCS checks against it, budgets, logs) uses the plain IPv4
spelling, so one device is one address whichever socket it came through.
"""

from __future__ import annotations

import ipaddress
from typing import Union

__all__ = ["unmap", "family", "source_key", "V6_SOURCE_PREFIX"]

# one IPv6 subscriber holds at least a /64 (RFC 6177: often a /56 or /48):
# a budget per IPv6 address would give one attacker 2**64 budgets
V6_SOURCE_PREFIX = 64


def unmap(addr: str) -> str:
    """``addr`` without an IPv4 mapping (``::ffff:192.0.2.1`` -> ``192.0.2.1``)
    and in its canonical spelling; an IPv6 zone (``%eth0``) is kept."""
    text, _, zone = addr.partition("%")
    try:
        ip: Union[ipaddress.IPv4Address, ipaddress.IPv6Address] = ipaddress.ip_address(text)
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ip}%{zone}" if zone else str(ip)


def family(addr: str) -> int:
    """4 or 6 (ValueError for what is not an address)."""
    return ipaddress.ip_address(unmap(addr).partition("%")[0]).version


def source_key(addr: str) -> str:
    """What a per-source budget counts ``addr`` under: an IPv4 address
    itself, an IPv6 address's /64."""
    text = unmap(addr).partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if ip.version == 4:
        return text
    return str(ipaddress.IPv6Network(f"{ip}/{V6_SOURCE_PREFIX}", strict=False))
