"""Classify this device's NAT mapping with the CCS's help.

Several fresh TCP connections to the CCS's probe port, each from a new local
port, each told the address and port the CCS saw (``Device.whoami``):

- the external address equals a local one: no NAT (``open``; a stateful
  firewall looks the same from here);
- external port == local port every time: port-preserving (``nat``);
- external ports step by the same small delta: ``napt-sequential`` (the next
  mapping is predictable: last + delta);
- anything else: ``napt-random``.

At the same time it asks the gateway for a port mapping (PCP, NAT-PMP,
UPnP-IGD; deleted at once): a NAT that grants one is reported as ``upnp``
with the protocol in ``portmap``, and the device then maps each next port
(the ``upnp`` strategy).

Filtering (drop vs RST on unsolicited SYNs) is not probed: the CCS would need
to send from a second address; the strategies cope with both. The result
feeds the device's NAT guess, which the CCS's plan uses.
"""

from __future__ import annotations

import socket
from typing import Optional

MAX_DELTA = 16
PORTMAP_TIMEOUT = 0.5       # per protocol; a gateway without a daemon often answers ICMP at once


def classify(pairs: list, local_addrs: set, public_addr: str) -> dict:
    """Pure: pairs of (local port, external port) from successive probes."""
    deltas = [b[1] - a[1] for a, b in zip(pairs, pairs[1:])]
    if public_addr in local_addrs:
        nat, mapping = "open", "none"
    elif all(loc == ext for loc, ext in pairs):
        nat, mapping = "nat", "preserve"
    elif deltas and all(d == deltas[0] for d in deltas) and 0 < deltas[0] <= MAX_DELTA:
        nat, mapping = "napt-sequential", "sequential"
    else:
        nat, mapping = "napt-random", "random"
    out = {"nat": nat, "mapping": mapping, "public_addr": public_addr,
           "probes": [{"local": a, "external": b} for a, b in pairs]}
    if mapping == "sequential":
        out["delta"] = deltas[0]
    return out


def local_addresses() -> set:
    addrs = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addrs.add(info[4][0])
    except OSError:
        pass
    return addrs


async def probe_portmap(timeout: float = PORTMAP_TIMEOUT) -> tuple:
    """(protocol, why): does the gateway grant a TCP port mapping? Asks for
    one (PCP, NAT-PMP, UPnP-IGD) for a free local port and deletes it."""
    from fastpunch.punch import portmap

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    try:
        mapping = await portmap.map_port("0.0.0.0", port, lifetime=60, timeout=timeout)
    except (portmap.PortMapError, OSError) as exc:
        return None, str(exc)
    try:
        await portmap.unmap(mapping, timeout=timeout)
    except (portmap.PortMapError, OSError):
        pass                                    # it expires in a minute
    return mapping.protocol, f"granted external port {mapping.external_port}"


async def natcheck(device, probes: int = 3, route_to: Optional[str] = None,
                   portmap: bool = True) -> dict:
    """Classify, with the CCS's whoami probes; meanwhile ask the gateway for
    a port mapping. A NAT that grants one is announced as ``upnp`` (its
    mapping behaviour stays in ``behind``)."""
    import asyncio

    from fastpunch.punch.base import route_source

    asking = asyncio.ensure_future(probe_portmap()) if portmap else None
    try:
        pairs, public = [], None
        for _ in range(max(2, probes)):
            with socket.socket() as s:
                s.bind(("0.0.0.0", 0))
                local = s.getsockname()[1]
            public, ext = await device.whoami(local)
            pairs.append((local, ext))
        addrs = local_addresses() | {route_source(route_to or device.ccs[0])}
        out = classify(pairs, addrs, public)
        if asking is not None:
            out["portmap"], out["portmap_detail"] = await asking
            if out["portmap"] and out["nat"] != "open":
                out["behind"], out["nat"] = out["nat"], "upnp"
        return out
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
