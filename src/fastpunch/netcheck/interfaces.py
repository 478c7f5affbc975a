"""This host's own IPv4 addresses and their on-link prefixes: host candidates.

Read with the kernel's interface ioctls (SIOCGIFFLAGS, SIOCGIFADDR,
SIOCGIFNETMASK), in the calling thread's network namespace, with no
dependency (pyroute2 is for the lab only).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = ["Interface", "interfaces", "parse_ifreq_addr"]

_SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFNETMASK = 0x8913, 0x8915, 0x891B
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


@dataclass(frozen=True)
class Interface:
    name: str
    addr: str
    prefix: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.addr}/{self.prefix}", strict=False)


def parse_ifreq_addr(ifreq: bytes) -> str:
    """The IPv4 address in a struct ifreq's sockaddr_in (bytes 20-24)."""
    return socket.inet_ntoa(ifreq[20:24])


def _ioctl(s: socket.socket, request: int, name: str) -> bytes:
    return fcntl.ioctl(s.fileno(), request, struct.pack("16s16x", name.encode()[:15]))


def prefix_of(mask: str) -> int:
    """The prefix length of a dotted netmask; 0 (no LAN prefix to tell) for
    a non-contiguous one, which the kernel accepts (SIOCSIFNETMASK) and
    ``ipaddress`` refuses."""
    try:
        return ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen
    except ValueError:
        return 0


def interfaces() -> list:
    """Every up, non-loopback interface with an IPv4 address. (One address
    per interface: the primary; secondary addresses need netlink and are
    rare on devices.)"""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                flags = struct.unpack_from("H", _ioctl(s, _SIOCGIFFLAGS, name), 16)[0]
                if not flags & _IFF_UP or flags & _IFF_LOOPBACK:
                    continue
                addr = parse_ifreq_addr(_ioctl(s, _SIOCGIFADDR, name))
                mask = parse_ifreq_addr(_ioctl(s, _SIOCGIFNETMASK, name))
            except OSError:           # no IPv4 address on it (EADDRNOTAVAIL), or gone
                continue
            out.append(Interface(name, addr, prefix_of(mask)))
    return out
