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

Filtering: one more connection to the probe port asks the CCS to connect
back, from another port of its address, to the mapping that connection
opened (a listener on our side waits on that port). Let in: no filter;
no answer: ``drop``; a RST: the gateway answers unsolicited SYNs with RST.
So ``open`` vs ``firewall`` and ``nat`` vs ``nat-rst`` are told apart (the
lab's names). It tests port-dependent filtering only (the CCS has one
address), and cannot see a firewall's TCP window tracking (``firewall``
and ``firewall-liberal`` look alike). The result feeds the device's NAT
guess, which the CCS's plan uses.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

MAX_DELTA = 16
PORTMAP_TIMEOUT = 0.5       # per protocol; a gateway without a daemon often answers ICMP at once


def classify(pairs: list, local_addrs: set, public_addr: str,
             filtering: str = "unknown") -> dict:
    """Pure: pairs of (local port, external port) from successive probes,
    and the filtering probe's verdict ("open", "drop", "rst", "unknown")."""
    deltas = [b[1] - a[1] for a, b in zip(pairs, pairs[1:])]
    if public_addr in local_addrs:
        nat, mapping = ("firewall" if filtering in ("drop", "rst") else "open"), "none"
    elif all(loc == ext for loc, ext in pairs):
        nat, mapping = ("nat-rst" if filtering == "rst" else "nat"), "preserve"
    elif deltas and all(d == deltas[0] for d in deltas) and 0 < deltas[0] <= MAX_DELTA:
        nat, mapping = "napt-sequential", "sequential"
    else:
        nat, mapping = "napt-random", "random"
    out = {"nat": nat, "mapping": mapping, "filtering": filtering, "public_addr": public_addr,
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
    """(protocol, why): does the gateway grant a TCP port mapping? PCP,
    NAT-PMP and UPnP-IGD are asked at once, each for a free local port of
    its own (no two ask for the same mapping), so a gateway that answers
    none costs one timeout, not three in a row. Every granted mapping is
    deleted; the first protocol of ``portmap.PROTOCOLS`` that got one is
    reported."""
    from fastpunch import portmap
    from fastpunch.punch.base import free_port

    async def ask(protocol: str):
        try:
            return await portmap.map_port("0.0.0.0", free_port(), lifetime=60, timeout=timeout,
                                          protocols=(protocol,))
        except portmap.PortMapError as exc:
            return exc.failures.get(protocol, exc)
        except OSError as exc:
            return exc

    async def delete(mapping) -> None:
        try:
            await portmap.unmap(mapping, timeout=timeout)
        except (portmap.PortMapError, OSError):
            pass                                # it expires in a minute

    answers = dict(zip(portmap.PROTOCOLS,
                       await asyncio.gather(*(ask(p) for p in portmap.PROTOCOLS))))
    granted = [m for m in answers.values() if isinstance(m, portmap.Mapping)]
    await asyncio.gather(*(delete(m) for m in granted))
    if not granted:
        why = "; ".join(f"{p}: {e}" for p, e in answers.items())
        return None, f"no port mapping from the gateway ({why})"
    return granted[0].protocol, f"granted external port {granted[0].external_port}"


async def natcheck(device, probes: int = 3, route_to: Optional[str] = None,
                   portmap: bool = True) -> dict:
    """Classify, with the CCS's whoami probes; meanwhile ask the gateway for
    a port mapping. A NAT that grants one is announced as ``upnp`` (its
    mapping behaviour stays in ``behind``)."""
    from fastpunch.punch.base import free_port, route_source

    asking = asyncio.ensure_future(probe_portmap()) if portmap else None
    try:
        pairs, public = [], None
        for _ in range(max(2, probes)):
            local = free_port()
            public, ext = await device.whoami(local)
            pairs.append((local, ext))
        addrs = local_addresses() | {route_source(route_to or device.ccs[0])}
        # after the whoami probes, not beside them: its connection takes a
        # mapping too, which would break a sequential NAPT's steady delta
        out = classify(pairs, addrs, public, await _filtering(device))
        if asking is not None:
            out["portmap"], out["portmap_detail"] = await asking
            if out["portmap"] and out["nat"] != "open":
                out["behind"], out["nat"] = out["nat"], "upnp"
        return out
    finally:
        if asking is not None and not asking.done():
            asking.cancel()


async def _filtering(device) -> str:
    try:
        return await device.filtering()
    except (OSError, asyncio.TimeoutError):
        return "unknown"
