"""This host's own addresses and their on-link prefixes: host candidates.

IPv4: read with the kernel's interface ioctls (SIOCGIFFLAGS, SIOCGIFADDR,
SIOCGIFNETMASK). IPv6: from /proc/net/if_inet6 (every address, with its
prefix, scope and flags). Both in the calling thread's network namespace,
with no dependency (pyroute2 is for the lab only).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = ["Interface", "interfaces", "interfaces6", "parse_if_inet6", "parse_ifreq_addr",
           "proc_net"]

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


# /proc/net/if_inet6: scope and the flags that make an address unusable
_SCOPE_GLOBAL = 0x00
_IFA_F_DADFAILED, _IFA_F_DEPRECATED, _IFA_F_TENTATIVE = 0x08, 0x20, 0x40
_IFA_F_TEMPORARY = 0x01


def parse_if_inet6(text: str) -> list:
    """The usable global-scope IPv6 addresses of a /proc/net/if_inet6 dump
    (``addr ifindex prefix scope flags name`` per line, hex): not
    link-local, loopback or site-local; not tentative (DAD unfinished: the
    kernel would not send from it yet), failed or deprecated. Stable ones
    before temporary (RFC 8981) ones: a peer may keep them longer."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or len(f[0]) != 32:
            continue
        try:
            raw = bytes.fromhex(f[0])
            prefix, scope, flags = int(f[2], 16), int(f[3], 16), int(f[4], 16)
        except ValueError:
            continue
        if scope != _SCOPE_GLOBAL or flags & (_IFA_F_DADFAILED | _IFA_F_DEPRECATED |
                                              _IFA_F_TENTATIVE):
            continue
        addr = ipaddress.IPv6Address(raw)
        if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.ipv4_mapped:
            continue
        out.append((bool(flags & _IFA_F_TEMPORARY), Interface(f[5], str(addr), prefix)))
    return [i for _, i in sorted(out, key=lambda t: t[0])]


def interfaces6() -> list:
    """This host's usable global IPv6 addresses (``parse_if_inet6``); none
    when the kernel has no IPv6."""
    try:
        with open(proc_net("if_inet6")) as f:
            return parse_if_inet6(f.read())
    except OSError:
        return []


def proc_net(name: str) -> str:
    """/proc's view of this thread's network namespace: /proc/net is the
    process's (its main thread's), and a device's loop may run in a thread
    that entered another (the lab's, an agent's per-namespace worker)."""
    import os

    path = f"/proc/thread-self/net/{name}"
    return path if os.path.exists(path) else f"/proc/net/{name}"
