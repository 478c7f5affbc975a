"""Gather the candidates of the one local port the next punch will use.

* host: every usable local address (up, not loopback), with its on-link
  prefix; the address the default route toward the CCS uses first;
* server-reflexive: a ``whoami`` from that very port (SO_REUSEADDR), so an
  endpoint-independent NAT, whatever number it gives, needs no guessing;
* mapped: when natcheck found a gateway that grants mappings (PCP,
  NAT-PMP, UPnP-IGD), a mapping for that port, if its external address is
  the one the CCS sees (behind a carrier NAT a home router's mapping is
  useless from outside, and is left out);
* predicted: a sequential NAPT's next mapping (the reflexive one + its
  step), and, behind a port-preserving NAT whose probe of this port got
  another number (a port another host held toward the CCS at that moment),
  the port itself: toward the peer it is likely kept;
* IPv6, when the CCS has an IPv6 address (the one we logged in to, or the
  one AuthOk names): the same port number held on IPv6 too, every usable
  global address as a host candidate, and a ``whoami`` over IPv6 from the
  port, carrying our probe token: the CCS learns from it where we are over
  IPv6 (it checks our IPv6 candidates against that), and behind NAT66 it
  is our reflexive candidate there. (The same token on the IPv4 probe
  tells a CCS we logged in to over IPv6 where we are over IPv4.)

The report says what was left out and why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from fastpunch.netcheck import probes
from fastpunch.netcheck.interfaces import interfaces, interfaces6
from fastpunch.netcheck.natcheck import NatReport
from fastpunch.netcheck.route import route_source
from fastpunch.proto.candidates import (MAX_CANDIDATES, Candidate, normalize, priority,
                                       usable_address)
from fastpunch.proto.kinds import CandidateKind as Kind
from fastpunch.proto.kinds import Mapping

__all__ = ["Gathered", "gather", "with_mapping", "with_guard", "host_candidates",
           "host_candidates6", "reserve_port", "reserve_port6", "guard_port"]

MAP_TIMEOUT = 0.75
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gathered:
    local_port: int
    local_addr: str                   # our address toward the CCS (the default route's)
    candidates: tuple
    port: int                         # what a version-1 peer (and kernel strategies) aim at
    srflx: Optional[tuple] = None     # (address, port) the CCS saw from local_port
    mapping: object = None            # the portmap.Mapping made for local_port, if any
    at: float = field(default_factory=time.monotonic)
    notes: tuple = ()
    reservation: Optional[socket.socket] = None   # holds local_port (reserve_port)
    guard: object = None              # netfilter.ScopedTable: our kernel's RSTs from the port
    reservation6: Optional[socket.socket] = None  # holds local_port on IPv6 (reserve_port6)

    @property
    def v6(self) -> bool:
        """Whether the port is ours on IPv6 too (IPv6 candidates)."""
        return self.reservation6 is not None

    def age(self) -> float:
        return time.monotonic() - self.at

    def release(self) -> None:
        """Let the port go (after the punch: the kernel socket holds it now,
        or nobody needs it). Never raises: a guard table that cannot be
        removed is logged (the sweep of stale tables takes it later), and
        must not turn a punch that worked into an error."""
        for held in (self.reservation, self.reservation6):
            if held is not None:
                held.close()
        if self.guard is not None:
            try:
                self.guard.remove()
            except Exception as exc:        # NetfilterError, OSError: logged, not lost
                log.warning("RST guard of port %d not removed: %s", self.local_port, exc)


def guard_port(port: int, v6: bool = False):
    """The nftables table that keeps our kernel from resetting anything
    that arrives for ``port``, from the moment a punch takes it: a
    peer's first SYN may come before our own side has the peer's candidates
    (the CCS's Ready reaches the two at different times) and would draw a
    RST that sets that pair back (seen: the LAN pair of two devices on one
    LAN lost to the hairpinned one). The port is ours alone (reserved), so
    only punch traffic meets the rule; the punch adds nothing to the
    critical path. Crashed processes' tables are swept first (at most every
    ``SWEEP_EVERY`` s per network namespace)."""
    from fastpunch import netfilter

    _sweep(netfilter)
    table = netfilter.suppress_rsts([netfilter.RstSuppression(port)], both=v6)
    return table.apply()


SWEEP_EVERY = 10.0
_swept: dict = {}


def _sweep(netfilter) -> None:
    import os

    ns = os.stat("/proc/thread-self/ns/net").st_ino
    now = time.monotonic()
    if now - _swept.get(ns, -SWEEP_EVERY) >= SWEEP_EVERY:
        _swept[ns] = now
        netfilter.sweep_stale(unmarked=False)


def reserve_port() -> tuple:
    """(port, socket): a free TCP port, held by a bound socket until the
    punch is over. Bound (SO_REUSEADDR), never listening or connected, it
    keeps the kernel from giving the port to any connect() of this host
    (ephemeral ports skip bound ones: without it, a relay or CCS connection
    was seen taking a punch port between gathering and hand-off, and the
    hand-off's bind failed), while the probe, kernel simultaneous open and
    the TCP_REPAIR hand-off, all SO_REUSEADDR, bind it beside it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 0))
    except BaseException:
        s.close()
        raise
    return s.getsockname()[1], s


def reserve_port6(port: int) -> socket.socket:
    """Hold ``port`` on IPv6 too (IPV6_V6ONLY: the IPv4 side is
    ``reserve_port``'s socket), as ``reserve_port`` does; OSError when the
    host has no IPv6 or another socket holds the port there."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
    except BaseException:
        s.close()
        raise
    return s


V6_LOCAL_PREFERENCE = 65535 - MAX_CANDIDATES // 2   # below a LAN's IPv4 host candidates


def host_candidates6(port: int, toward: str) -> list:
    """IPv6 host candidates of ``port``: the address of the route toward
    ``toward`` first, then the other stable ones, then temporary ones
    (``interfaces6``' order), at most a quarter of the list."""
    try:
        first = route_source(toward)
    except OSError:
        first = None
    found = [i for i in interfaces6() if usable_address(i.addr) is None]
    found.sort(key=lambda i: i.addr != first)         # (stable: keeps the order otherwise)
    return [Candidate(Kind.HOST, i.addr, port, priority(Kind.HOST, V6_LOCAL_PREFERENCE - n),
                      i.prefix) for n, i in enumerate(found[:MAX_CANDIDATES // 4])]


def host_candidates(port: int, toward: Optional[str]) -> list:
    """Host candidates of ``port``: the address of the route toward
    ``toward`` first (local preference 65535), the others after it."""
    try:
        first = route_source(toward) if toward else None
    except OSError:
        first = None
    found = [i for i in interfaces() if usable_address(i.addr) is None]
    found.sort(key=lambda i: (i.addr != first, i.name))
    out = []
    for n, iface in enumerate(found[:MAX_CANDIDATES // 2]):
        out.append(Candidate(Kind.HOST, iface.addr, port, priority(Kind.HOST, 65535 - n),
                             iface.prefix))
    return out


async def gather(ccs_ip: Optional[str], probe_port: Optional[int],
                 local_port: Optional[int] = None, report: Optional[NatReport] = None,
                 portmap_protocol: Optional[str] = None, *, ccs6: Optional[str] = None,
                 token: Optional[bytes] = None) -> Gathered:
    """The candidates of ``local_port`` (None: a port reserved for it,
    ``reserve_port``; see the module docstring); a port mapping only when
    ``portmap_protocol`` is given (``with_mapping``). ``ccs_ip``: the CCS's
    IPv4 address (None: we know none, no IPv4 candidates but a host's);
    ``ccs6`` its IPv6 one (IPv6 candidates); ``token`` our probe token."""
    if ccs_ip is None and ccs6 is None:
        raise ValueError("gathering needs the CCS's address in one family at least")
    reservation = None
    if local_port is None:
        local_port, reservation = reserve_port()
    try:
        g = await _gather(ccs_ip, probe_port, local_port, report, portmap_protocol,
                          reservation, ccs6, token)
        if ccs6 is not None:
            # (inside the try: cancelled during the IPv6 probe, the IPv4
            # reservation must not outlive this call)
            g = await _with_v6(g, ccs6, probe_port, token)
    except BaseException:
        if reservation is not None:
            reservation.close()
        raise
    return g


async def _with_v6(g: Gathered, ccs6: str, probe_port: Optional[int],
                   token: Optional[bytes]) -> Gathered:
    """``g`` with its port's IPv6 candidates (see the module docstring);
    without them, and a note saying why, when the port cannot be held on
    IPv6 or this host has no global IPv6 address."""
    try:
        held = reserve_port6(g.local_port)
    except OSError as exc:
        return replace(g, notes=g.notes + (f"no IPv6 candidates: port {g.local_port} "
                                           f"not held on IPv6 ({exc})",))
    try:
        hosts = host_candidates6(g.local_port, ccs6)
        if not hosts:
            held.close()
            return replace(g, notes=g.notes + ("no IPv6 candidates: no usable global "
                                               "IPv6 address here",))
        notes = list(g.notes)
        extra = []
        if probe_port:
            try:
                addr, port = await probes.whoami(ccs6, probe_port, g.local_port, token=token)
            except (probes.ProbeError, OSError) as exc:
                notes.append(f"no IPv6 reflexive probe ({exc}): the CCS may not know our "
                             "IPv6 address, and then drops our IPv6 candidates")
            else:
                if (addr, port) not in [c.endpoint for c in hosts] and \
                        usable_address(addr) is None:
                    # NAT66 (or a prefix translator) between us and the CCS
                    extra.append(Candidate(Kind.SRFLX, addr, port, priority(Kind.SRFLX)))
        cands = normalize(list(g.candidates[:MAX_CANDIDATES - len(hosts) - len(extra)]) +
                          hosts + extra)
    except BaseException:
        held.close()
        raise
    return replace(g, candidates=cands, reservation6=held, notes=tuple(notes))


def with_guard(g: Gathered) -> Gathered:
    """``g`` with its port's RST table (``guard_port``), for a device that
    crafts segments, made when a punch takes the port: from before the
    rendezvous, so nothing that arrives before our Ready draws a RST, and
    not before (no table of ours stays in between connections)."""
    from fastpunch.errors import FastpunchError

    if g.guard is not None:
        return g
    try:
        return replace(g, guard=guard_port(g.local_port, v6=g.v6))
    except (FastpunchError, OSError) as exc:     # the punch makes its own then
        return replace(g, notes=g.notes + (f"no RST guard for port {g.local_port} ahead of "
                                           f"the punch: {exc}",))


def _next_mapping(srflx, mapping_kind, report) -> Optional[int]:
    """A sequential NAPT's next external port after the probe's, or None:
    not sequential, or past 65535 (the allocator wraps into a range of its
    own, which nobody here knows)."""
    if srflx is None or mapping_kind is not Mapping.SEQUENTIAL or not report.delta:
        return None
    port = srflx[1] + report.delta
    return port if port <= 0xFFFF else None


def _route_source_any(*toward) -> str:
    """Our address toward the first of ``toward`` this host has a route to
    (an IPv6-only host has none toward the CCS's IPv4 address)."""
    last: Optional[OSError] = None
    for addr in toward:
        if addr is None:
            continue
        try:
            return route_source(addr)
        except OSError as exc:
            last = exc
    raise last if last is not None else OSError("no address to route toward")


async def _gather(ccs_ip, probe_port, local_port, report, portmap_protocol,
                  reservation, ccs6=None, token=None) -> Gathered:
    notes = []
    local_addr = _route_source_any(ccs_ip, ccs6)
    cands = host_candidates(local_port, ccs_ip)
    srflx = None
    if ccs_ip is None:
        notes.append("no IPv4 address of the CCS known: no IPv4 reflexive candidate")
    elif probe_port:
        try:
            srflx = await probes.whoami(ccs_ip, probe_port, local_port, token=token)
        except (probes.ProbeError, OSError) as exc:
            notes.append(f"no server-reflexive candidate: {exc}")
    mapping_kind = report.mapping if report is not None else Mapping.UNKNOWN
    if srflx is not None and usable_address(srflx[0]) is not None:
        # a CCS on this very host sees us at 127.0.0.1: no address for a peer
        notes.append(f"the CCS sees us at {srflx[0]} ({usable_address(srflx[0])}): "
                     "no server-reflexive candidate")
    elif srflx is not None:
        cands.append(Candidate(Kind.SRFLX, srflx[0], srflx[1], priority(Kind.SRFLX)))
        guesses = []
        if _next_mapping(srflx, mapping_kind, report) is not None:
            # the probe took one mapping; the punch's first SYN takes the next
            guesses.append(_next_mapping(srflx, mapping_kind, report))
        elif srflx[1] != local_port and mapping_kind in (Mapping.PRESERVE, Mapping.UNKNOWN):
            # a port-preserving NAT gives another port exactly when the tuple
            # is taken (another host behind it held this port toward the
            # CCS): toward the peer the port itself is likely kept
            notes.append(f"the probe of port {local_port} came out as {srflx[1]} (another "
                         "host behind the NAT had it toward the CCS?); the port itself "
                         "is a candidate too")
            guesses.append(local_port)
        for n, port in enumerate(guesses):
            if (srflx[0], port) not in [c.endpoint for c in cands]:
                cands.append(Candidate(Kind.PREDICTED, srflx[0], port,
                                       priority(Kind.PREDICTED, 65535 - n)))
    if _next_mapping(srflx, mapping_kind, report) is not None:
        port = _next_mapping(srflx, mapping_kind, report)
    elif srflx is not None:
        port = srflx[1]
    else:
        port = local_port
    out = Gathered(local_port, local_addr, normalize(cands), port, srflx, notes=tuple(notes),
                   reservation=reservation)
    if portmap_protocol:
        out = await with_mapping(out, portmap_protocol)
    return out


async def with_mapping(g: Gathered, protocol: str) -> Gathered:
    """``g`` with a port mapping for its port, asked for now (a mapping is
    asked for when a punch is about to use the port, not for a port kept
    ready: nothing of ours stays open on the gateway between connections).
    Left out, with a note, when the gateway grants none, or grants one on
    an address the CCS does not see us at (another NAT beyond it)."""
    notes = list(g.notes)
    mapping = await _map(g.local_port, protocol, notes)
    public = g.srflx[0] if g.srflx else None
    if mapping is not None and public is not None and mapping.external_addr and \
            mapping.external_addr != public:
        notes.append(f"the gateway's mapping {mapping.external_addr}:{mapping.external_port} "
                     f"is not the address the CCS sees ({public}): another NAT beyond it; "
                     "left out")
        await _unmap(mapping)
        mapping = None
    if mapping is None:
        return replace(g, notes=tuple(notes))
    addr = mapping.external_addr or public
    cands = [c for c in g.candidates if c.endpoint != (addr, mapping.external_port)]
    if addr and usable_address(addr) is None:
        cands.insert(0, Candidate(Kind.MAPPED, addr, mapping.external_port,
                                  priority(Kind.MAPPED)))
    return replace(g, candidates=normalize(cands), port=mapping.external_port,
                   mapping=mapping, notes=tuple(notes))


async def _map(local_port: int, protocol: str, notes: list):
    from fastpunch import portmap

    order = (protocol,) + tuple(p for p in portmap.PROTOCOLS if p != protocol)
    try:
        return await portmap.map_port("0.0.0.0", local_port, protocols=order,
                                      timeout=MAP_TIMEOUT)
    except (portmap.PortMapError, OSError) as exc:
        notes.append(f"no port mapping from the gateway: {exc}")
        return None


async def _unmap(mapping) -> None:
    from fastpunch import portmap

    try:
        await asyncio.wait_for(portmap.unmap(mapping), MAP_TIMEOUT * 2)
    except (portmap.PortMapError, OSError, asyncio.TimeoutError):
        pass                       # it expires on its own
