"""Which gateway to ask: this network namespace's default IPv4 gateway (from
``/proc/thread-self/net/route``; :func:`parse_proc_net_route` is the pure
part) and this host's address toward a gateway."""

from __future__ import annotations

import contextlib
import socket
import sys
from typing import Optional, Tuple

__all__ = ["default_gateway", "parse_proc_net_route"]


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


def _local_addr_toward(gateway: str) -> Optional[str]:
    from fastpunch.punch.base import route_source

    with contextlib.suppress(OSError):
        return route_source(gateway)
    return None
