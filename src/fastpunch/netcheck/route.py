"""What the kernel's routing says toward an address: the source address it
would use, and the MSS our crafted SYN must announce.

The MSS is what the kernel's own SYN would announce (tcp_connect_init:
``dst_metric_advmss``): the route's ``advmss`` when one is set, else the
path MTU toward the address minus 40 bytes of IPv4 and TCP headers (60
over IPv6). The path MTU comes from a connected UDP socket's ``IP_MTU``
(``IPV6_MTU``): the route's MTU or
the outgoing interface's, lowered by any PMTU the kernel has learned (an
ICMP "fragmentation needed"). A SYN announcing 1460 on a 1280-byte link
made the peer send segments no router would carry; where the ICMP that
says so is dropped, the stream stalled with nothing delivered.

No packet is sent by any of these.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Optional

__all__ = ["route_source", "path_mtu", "mss_toward", "advmss_of", "parse_proc_net_route_advmss"]

IP_MTU = 14
IPV6_MTU = 24
HEADERS = 40             # IPv4 (20, no options) + TCP (20) beyond the MSS
HEADERS6 = 60            # IPv6 (40, no extension header) + TCP (20)
MIN_MSS = 536            # RFC 9293's default; never announce less


def _six(addr: str) -> bool:
    return ":" in addr


def route_source(addr: str) -> str:
    """The local address the kernel would use toward ``addr``."""
    with socket.socket(socket.AF_INET6 if _six(addr) else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def path_mtu(addr: str) -> int:
    """The kernel's path MTU toward ``addr`` (route, interface, learned PMTU)."""
    six = _six(addr)
    with socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) if six else \
            s.getsockopt(socket.IPPROTO_IP, IP_MTU)


def parse_proc_net_route_advmss(text: str, addr: str,
                                byteorder: str = sys.byteorder) -> Optional[int]:
    """The advmss of the longest-prefix route toward ``addr`` in a
    /proc/net/route dump (its "MTU" column is advmss + 40 when the route has
    an advmss, 0 otherwise), or None. The main table only: policy routing
    is not visible there, and then the path MTU alone decides."""
    target = int(ipaddress.IPv4Address(addr))
    best: Optional[tuple] = None
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 11:
            continue
        try:
            dest, mask = _host_order(f[1], byteorder), _host_order(f[7], byteorder)
            mtu = int(f[8])
        except ValueError:
            continue
        if target & mask != dest & mask:
            continue
        length = bin(mask).count("1")
        if best is None or length > best[0]:
            best = (length, mtu)
    if best is None or not best[1]:
        return None
    return best[1] - HEADERS


def _host_order(hexword: str, byteorder: str) -> int:
    """A /proc/net/route address column (the kernel's __be32 printed as a
    native-endian number) as an address integer."""
    raw = int(hexword, 16).to_bytes(4, byteorder)
    return int.from_bytes(raw, "big")


def advmss_of(addr: str) -> Optional[int]:
    """The advmss of the main table's route toward an IPv4 ``addr`` (IPv6
    routes' advmss is not in /proc: the path MTU alone decides there)."""
    if _six(addr):
        return None
    try:
        from fastpunch.netcheck.interfaces import proc_net

        with open(proc_net("route")) as f:
            return parse_proc_net_route_advmss(f.read(), addr)
    except OSError:
        return None


def mss_toward(addr: str) -> int:
    """The MSS a SYN toward ``addr`` announces, as the kernel's would."""
    headers = HEADERS6 if _six(addr) else HEADERS
    try:
        mss = path_mtu(addr) - headers
    except OSError:
        mss = 1500 - headers
    advmss = advmss_of(addr)
    if advmss:
        mss = min(mss, advmss)
    return max(MIN_MSS, min(mss, 65535 - headers))
