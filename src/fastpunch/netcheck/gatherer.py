"""A device's gathering, kept ready in the background.

At every login the gatherer starts natcheck (``nat="auto"``) and then
prepares the *next* punch port: a free local port and its candidates
(``gather``). A ``connect()`` takes the prepared port when it is fresh and
so waits for nothing; it gathers on the spot otherwise (one CCS round trip
for the reflexive probe) and never waits for natcheck: until natcheck
reports, the mapping is UNKNOWN and the candidates alone decide. Behind a
sequential NAPT a prediction goes stale with any other traffic, so there
the port is always gathered on the spot. A port mapping (PCP, NAT-PMP,
UPnP-IGD) is asked for only when a punch is about to use the port, and
deleted after it: nothing of ours stays open on the gateway in between.

Whether this device can craft segments (CAP_NET_RAW, CAP_NET_ADMIN, a
kernel with nf_tables) is probed once and announced: a device that cannot
is planned kernel simultaneous open and the relay, and says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from typing import Optional

from fastpunch.netcheck.gather import Gathered, gather, with_guard, with_mapping
from fastpunch.netcheck.natcheck import NatReport, natcheck
from fastpunch.proto.kinds import Filtering, Mapping, NatClass, parse

__all__ = ["Gatherer", "Capability", "crafted_capability", "report_for_guess"]

log = logging.getLogger("fastpunch.netcheck")
FRESH = 30.0            # seconds a prepared port's candidates are used without a new probe
SWAPS = 3               # punch ports tried when the probe of one collided
CLOSE_TIMEOUT = 5.0     # seconds close() waits for natcheck and gathering to stop


@dataclass(frozen=True)
class Capability:
    crafted: bool
    why: str = ""
    lasting: bool = True        # False: a passing condition (EMFILE...): ask again next time


def crafted_capability() -> Capability:
    """Can this process craft segments and hand them to the kernel? (every
    feature probed, ``fastpunch._features``; ``why`` names the first one
    missing)"""
    from fastpunch import _features
    from fastpunch.errors import InsufficientPrivilegeError, KernelFeatureMissing

    try:
        _features.require_crafted()
    except InsufficientPrivilegeError as exc:
        return Capability(False, exc.strerror)
    except KernelFeatureMissing as exc:
        return Capability(False, exc.strerror)      # (without str()'s "[Errno 38]")
    except OSError as exc:
        return Capability(False, f"probing the crafted path failed: {exc}", lasting=False)
    return Capability(True)


_GUESS = {"open": (Mapping.NONE, Filtering.OPEN), "firewall": (Mapping.NONE, Filtering.DROP),
          "firewall-liberal": (Mapping.NONE, Filtering.DROP),
          "nat": (Mapping.PRESERVE, Filtering.DROP), "strict": (Mapping.PRESERVE, Filtering.DROP),
          "cgn": (Mapping.PRESERVE, Filtering.DROP), "upnp": (Mapping.PRESERVE, Filtering.DROP),
          "nat-rst": (Mapping.PRESERVE, Filtering.RST),
          "napt-ei": (Mapping.INDEPENDENT, Filtering.DROP),
          "napt-sequential": (Mapping.SEQUENTIAL, Filtering.DROP),
          "napt-random": (Mapping.RANDOM, Filtering.DROP)}


def report_for_guess(nat: str) -> NatReport:
    """The report a device told its NAT kind (``Device(nat=...)``) stands by."""
    mapping, filtering = _GUESS.get(nat, (Mapping.UNKNOWN, Filtering.UNKNOWN))
    return NatReport(None, mapping, filtering, parse(NatClass, nat),
                     evidence=(f"told: {nat}",), delta=1 if mapping is Mapping.SEQUENTIAL else None,
                     portmap="pcp" if nat == "upnp" else None)    # (then NAT-PMP, UPnP-IGD)


class Gatherer:
    def __init__(self, nat: str = "auto", *, name: str = "") -> None:
        self.nat = nat
        self.name = name
        self.report: Optional[NatReport] = None if nat == "auto" else report_for_guess(nat)
        self.capability: Optional[Capability] = None
        self._natcheck: Optional[asyncio.Task] = None
        self._prepared: Optional[Gathered] = None
        self._preparing: Optional[asyncio.Task] = None
        self._ccs: Optional[tuple] = None          # (ccs ip, probe port, second probe port)
        self._ccs4: Optional[str] = None           # the CCS's address in each family, if known
        self._ccs6: Optional[str] = None
        self._token: Optional[bytes] = None        # our probe token (AuthOk, protocol 5)
        # how our IPv6 firewall treats an unsolicited SYN (the filtering probe
        # over IPv6, after natcheck): the peer's gap before its full SYN
        self.filtering6: Filtering = Filtering.UNKNOWN
        self._lock: Optional[asyncio.Lock] = None
        self._out: dict = {}                       # id -> Gathered taken, not yet released

    # -- lifecycle -------------------------------------------------------------------
    def logged_in(self, ccs_ip: str, probe_port: Optional[int],
                  probe_port2: Optional[int], *, token: Optional[bytes] = None,
                  alt_addr: Optional[str] = None) -> None:
        """A new CCS session: natcheck (once per session, when asked for)
        and, with an IPv6 address of the CCS known, the filtering probe over
        IPv6, then the next port's candidates, in the background. ``alt_addr``:
        the CCS's address in the family ``ccs_ip`` is not of (IPv6
        candidates after an IPv4 login, and the other way round)."""
        by_family = {":" in a: a for a in (alt_addr, ccs_ip) if a}    # (the login's wins)
        self._ccs4, self._ccs6 = by_family.get(False), by_family.get(True)
        self.filtering6 = Filtering.UNKNOWN
        self._token = token
        # natcheck is about an IPv4 NAT: toward the CCS's IPv4 address when known
        self._ccs = (self._ccs4 or ccs_ip, probe_port, probe_port2)
        self.forget_prepared()
        # (natcheck is about an IPv4 NAT: none when no IPv4 address of the CCS is known)
        if self.nat == "auto" and probe_port and self._ccs4 is not None and \
                (self._natcheck is None or self._natcheck.done()):
            self._natcheck = asyncio.get_running_loop().create_task(self._check())
        elif self._ccs6 is not None and probe_port and (self._natcheck is None or
                                                        self._natcheck.done()):
            self._natcheck = asyncio.get_running_loop().create_task(self._check6())
        self._prepare_later()

    async def _check(self) -> None:
        ccs_ip, p1, p2 = self._ccs
        try:
            self.report = await natcheck(ccs_ip, [p1, p2])
            log.info("%s: natcheck: %s", self.name, self.report.as_dict())
        except (OSError, asyncio.TimeoutError, Exception) as exc:   # never fatal to the device
            log.warning("%s: natcheck failed: %s", self.name, exc)
        await self._check6()

    async def _check6(self) -> None:
        """The filtering probe over IPv6 (what natcheck's says of IPv4, for
        our IPv6 firewall), whatever NAT guess the device was told."""
        _, p1, _ = self._ccs
        if self._ccs6 is None or not p1:
            return
        from fastpunch.netcheck import probes

        try:
            self.filtering6 = await probes.filtering(self._ccs6, p1)
            log.info("%s: IPv6 filtering: %s", self.name, self.filtering6.value)
        except (OSError, probes.ProbeError) as exc:
            log.info("%s: no IPv6 filtering probe: %s", self.name, exc)

    async def settled(self) -> None:
        """Wait for the background work of this session: natcheck, then the
        next port's candidates. (connect() never waits for it; a device that
        has just logged in may, to announce what natcheck found.)"""
        for task in (self._natcheck, self._preparing):
            if task is not None and not task.done():
                await asyncio.wait({task})
        if self._preparing is not None and not self._preparing.done():
            await asyncio.wait({self._preparing})

    async def natcheck_now(self, probes: int = 3) -> NatReport:
        """Run natcheck now (the ``natcheck`` command), and keep its report:
        after the background probes, never beside them (interleaved, they
        would break a sequential NAPT's steady step)."""
        if self._ccs is None:
            raise RuntimeError("natcheck needs a CCS session")
        await self.settled()
        ccs_ip, p1, p2 = self._ccs
        self.report = await natcheck(ccs_ip, [p1, p2], probes)
        return self.report

    def _prepare_later(self) -> None:
        if self._ccs is None or self._sequential():
            return
        if self._preparing is None or self._preparing.done():
            self._preparing = asyncio.get_running_loop().create_task(self._prepare())

    async def _prepare(self) -> None:
        if self._natcheck is not None and not self._natcheck.done():
            # not beside natcheck's probes: a probe of ours takes a mapping
            # too, which would break a sequential NAPT's steady step
            await asyncio.wait({self._natcheck})
        if self._sequential():
            return
        try:
            fresh = await self._gather()
            if self._prepared is not None:
                self._prepared.release()
            self._prepared = fresh
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("%s: next port not prepared: %s", self.name, exc)

    def _sequential(self) -> bool:
        return self.report is not None and self.report.mapping is Mapping.SEQUENTIAL

    async def _gather(self, mapping: bool = False) -> Gathered:
        """Gather a fresh port. Behind a port-preserving NAT a probe that
        comes out translated means another host behind it holds that port
        toward the CCS right now, and likely elsewhere too: that port is
        swapped for another (a few tries), as its flows would collide."""
        _, p1, _ = self._ccs
        protocol = self._portmap() if mapping else None
        swapped = []
        for attempt in range(SWAPS):
            g = await gather(self._ccs4, p1, None, self.report, ccs6=self._ccs6,
                             token=self._token)
            kept = g.srflx is None or g.srflx[1] == g.local_port
            if kept or self.report is None or self.report.mapping is not Mapping.PRESERVE or \
                    attempt == SWAPS - 1:
                break
            swapped.append(g.local_port)
            g.release()
        if swapped:
            g = replace(g, notes=g.notes + (f"ports {swapped} collided toward the CCS (another "
                                            "host behind the NAT): swapped",))
        if protocol:
            g = await with_mapping(g, protocol)
        return g

    def _portmap(self) -> Optional[str]:
        return self.report.portmap if self.report is not None else None

    # -- using it ----------------------------------------------------------------------
    async def take(self, guard: bool = False) -> Gathered:
        """The next punch port and its candidates: the prepared one when
        fresh, else gathered now; the one after is prepared meanwhile. With
        ``guard`` (a punch will use it), its RST table too, for a device
        that crafts segments; the caller releases it (``release``)."""
        if self._ccs is None:
            raise RuntimeError("gathering needs a CCS session")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            ready, self._prepared = self._prepared, None
            if ready is None or ready.age() > FRESH or self._sequential():
                if ready is not None:
                    ready.release()
                ready = await self._gather(mapping=True)
            elif self._portmap():
                ready = await with_mapping(ready, self._portmap())
            capability = self.crafted()
            if guard and capability.crafted:
                ready = with_guard(ready)
            elif not capability.crafted:        # (the report says why the plan has none)
                ready = replace(ready, notes=ready.notes + (
                    f"no crafted strategies here: {capability.why}",))
            self._out[id(ready)] = ready      # released at close() if nobody does before
            self._prepare_later()
            return ready

    def forget_prepared(self) -> None:
        """Drop the prepared port (its candidates rest on an old report;
        a prepared port holds no mapping)."""
        if self._prepared is not None:
            self._prepared.release()
        self._prepared = None

    def crafted(self) -> Capability:
        if self.capability is None or not self.capability.lasting:
            self.capability = crafted_capability()
            if not self.capability.crafted:
                log.warning("%s: no crafted strategies (%s): kernel simultaneous open and "
                            "the relay only", self.name, self.capability.why)
        return self.capability

    async def release(self, gathered: Gathered) -> None:
        """Let a gathered port go: its reservation, and the port mapping
        made for it, if any (which expires anyway)."""
        gathered.release()
        self._out.pop(id(gathered), None)
        if gathered.mapping is None:
            return
        from fastpunch import portmap

        try:
            await asyncio.wait_for(portmap.unmap(gathered.mapping), 2.0)
        except (portmap.PortMapError, OSError, asyncio.TimeoutError) as exc:
            log.info("%s: mapping %s not deleted (%s); it expires in %d s", self.name,
                     gathered.mapping.external_port, exc, gathered.mapping.lifetime)

    async def close(self) -> None:
        from fastpunch import _loop

        if not await _loop.stop(self._natcheck, self._preparing, timeout=CLOSE_TIMEOUT):
            log.warning("%s: natcheck or the next port's gathering did not stop within %g s",
                        self.name, CLOSE_TIMEOUT)
        self.forget_prepared()
        for g in list(self._out.values()):
            await self.release(g)

    def isn(self) -> int:
        return int.from_bytes(os.urandom(4), "big")
