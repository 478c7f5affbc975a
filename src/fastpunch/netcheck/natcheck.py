"""What this device's gateway does, measured with the CCS's help: one typed
report (Tailscale's netcheck is the model), an input to candidates, pair
priorities and spray decisions, never the plan on its own.

Mapping (RFC 4787 4.1). From each of ``probes`` fresh local ports, a
``whoami`` to each of the CCS's probe ports (two when the CCS has two):

* external address among our own: no NAT (``Mapping.NONE``);
* external port == local port: the port is kept (``PRESERVE``);
* the same external port toward both CCS ports, another than the local
  one: endpoint-independent, port-changing (``INDEPENDENT``); the
  server-reflexive candidate of the punch port is then exact;
* a new port per destination: ``SEQUENTIAL`` when successive mappings step
  by the same small delta, else ``RANDOM``.

Each local port gets its own verdict and the majority decides, so one odd
probe (a port another host behind the same NAT held at that moment: the
NAT gave that probe another port) no longer flips the class; the evidence
says what each probe saw. With one CCS probe port, endpoint independence
cannot be seen, and a port-changing mapping reads as sequential or random.

Filtering (RFC 4787 5): one more connection asks the CCS to connect back
from another port of its address to the mapping that connection opened:
let in (``OPEN``), no answer (``DROP``), a RST (``RST``). Port-dependent
filtering only (the CCS has one address).

Port mapping: meanwhile PCP, NAT-PMP and UPnP-IGD are asked at once for a
mapping (each deleted at once); the first protocol that grants one is
reported, and gathering then maps each punch port.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fastpunch.netcheck import probes
from fastpunch.proto.kinds import Filtering, Mapping, NatClass

__all__ = ["Probe", "NatReport", "classify", "natcheck", "probe_portmap"]

MAX_DELTA = 16
PORTMAP_TIMEOUT = 0.5       # per protocol; a gateway without a daemon often answers ICMP at once
ROUNDS = 3                  # probe rounds at most, while some ports keep their number and some not
PROBE_TIMEOUT = 2.0         # one whoami (a CCS round trip; a lost SYN is resent after 1 s)
DEADLINE = 6.0              # natcheck's probes in all: a gateway that drops some costs this, no more


@dataclass(frozen=True)
class Probe:
    local: int            # our local port
    server_port: int      # the CCS port probed
    external: int         # the port the CCS saw
    addr: str             # the address the CCS saw


@dataclass(frozen=True)
class NatReport:
    public_addr: Optional[str]
    mapping: Mapping
    filtering: Filtering
    nat: NatClass                         # the one-word summary (reports, version-1 peers)
    probes: tuple = ()
    evidence: tuple = ()                  # sentences: what the probes showed
    delta: Optional[int] = None           # SEQUENTIAL: the step between mappings
    offset: Optional[int] = None          # INDEPENDENT: external - local, when constant
    portmap: Optional[str] = None         # the protocol that granted a mapping
    portmap_detail: str = ""
    behind: Optional[NatClass] = None     # with a mapping (nat "upnp"): the NAT it maps through

    def as_dict(self) -> dict:
        out = {"nat": self.nat.value, "mapping": self.mapping.value,
               "filtering": self.filtering.value, "public_addr": self.public_addr,
               "probes": [{"local": p.local, "server_port": p.server_port,
                           "external": p.external} for p in self.probes],
               "evidence": list(self.evidence), "portmap": self.portmap}
        for key in ("delta", "offset"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.portmap_detail:
            out["portmap_detail"] = self.portmap_detail
        if self.behind is not None:
            out["behind"] = self.behind.value
        return out


def _per_port(probes_of_port: Sequence[Probe]) -> str:
    """One local port's verdict: preserve, collided (kept toward one CCS
    port, translated toward another: another host behind the NAT held the
    port toward that one at that moment), independent, dependent."""
    ext = {p.external for p in probes_of_port}
    local = probes_of_port[0].local
    if ext == {local}:
        return "preserve"
    if local in ext:
        # a NAT that maps at random or in sequence keeps a port by chance
        # about once in 60,000; a port-preserving one gives another exactly
        # when the tuple is taken
        return "collided"
    if len(ext) == 1 and len(probes_of_port) > 1:
        return "independent"
    return "dependent" if len(probes_of_port) > 1 else "changed"


def _mixed(found: Sequence[Probe]) -> bool:
    """Some local ports kept their number and some got another, without a
    clear majority either way: a round more will tell."""
    by_port: dict = {}
    for p in found:
        by_port.setdefault(p.local, []).append(p)
    kept = sum(_per_port(ps) in ("preserve", "collided") for ps in by_port.values())
    return 0 < kept and kept * 3 < len(by_port) * 2 and kept < len(by_port)


def classify(found: Sequence[Probe], local_addrs: set,
             filtering: Filtering = Filtering.UNKNOWN) -> NatReport:
    """Pure: the report from the probes (in the order they were made)."""
    if not found:
        return NatReport(None, Mapping.UNKNOWN, filtering, NatClass.UNKNOWN,
                         evidence=("no probe was answered",))
    addrs = collections.Counter(p.addr for p in found)
    public = addrs.most_common(1)[0][0]
    evidence = []
    if len(addrs) > 1:
        evidence.append(f"the CCS saw several addresses: {dict(addrs)}")
    by_port: dict = {}
    for p in found:
        by_port.setdefault(p.local, []).append(p)
    verdicts = {port: _per_port(ps) for port, ps in by_port.items()}
    tally = collections.Counter(verdicts.values())
    kept = tally["preserve"] + tally["collided"]
    two_ports = any(len(ps) > 1 for ps in by_port.values())
    evidence.append(", ".join(f"{n} of {len(verdicts)} local ports {_SAID[v]}"
                              for v, n in tally.most_common()))
    delta = offset = None
    if public in local_addrs:
        mapping = Mapping.NONE
        evidence.append(f"{public} is one of this host's own addresses: no NAT")
    else:
        verdict, n = tally.most_common(1)[0]
        majority = n * 2 > len(verdicts)
        if kept * 2 > len(verdicts):
            mapping = Mapping.PRESERVE
        elif majority and verdict == "independent":
            mapping = Mapping.INDEPENDENT
            offsets = {(ps[0].external - ps[0].local) & 0xFFFF for ps in by_port.values()
                       if _per_port(ps) == "independent"}
            if len(offsets) == 1:
                offset = offsets.pop()
        else:
            # a new port per destination: does each new mapping take the next
            # one? Small forward steps, most of the time: other hosts behind
            # the same NAT, probing or connecting meanwhile, take mappings
            # too and stretch a step now and then (1, 2, 1, 3 ...); a random
            # allocator steps by 1..16 about once in 4,000. Neighbours only
            # ever stretch a step, so the allocator's own stride is the least
            # one seen, not the commonest: on a busy NAT most steps are 2 or
            # more, and a punch aimed at probe + 2 misses the port its flow
            # gets when no neighbour comes in between
            ext = [p.external for p in found]
            steps = [(b - a) & 0xFFFF for a, b in zip(ext, ext[1:])]
            small = [d for d in steps if 0 < d <= MAX_DELTA]
            if steps and len(small) * 2 > len(steps):
                step = min(small)
                mapping, delta = Mapping.SEQUENTIAL, step
                common = collections.Counter(small).most_common(1)[0][0]
                evidence.append(f"{len(small)} of {len(steps)} successive mappings stepped "
                                f"forward by at most {MAX_DELTA} (by {step} at least, most "
                                f"often {common})")
            else:
                mapping = Mapping.RANDOM
                if not two_ports:
                    evidence.append("one CCS probe port: an endpoint-independent mapping "
                                    "that changes the port cannot be told from a random one")
    return NatReport(public, mapping, filtering, _summary(mapping, filtering), tuple(found),
                     tuple(evidence), delta, offset)


_SAID = {"preserve": "kept their number", "independent": "got one other port for every "
         "destination", "dependent": "got a new port per destination",
         "changed": "got another port", "collided": "kept their number toward one CCS port "
         "and not the other (another host behind the NAT held it)"}


def _summary(mapping: Mapping, filtering: Filtering) -> NatClass:
    if mapping is Mapping.NONE:
        return NatClass.FIREWALL if filtering in (Filtering.DROP, Filtering.RST) else \
            NatClass.OPEN
    return {Mapping.PRESERVE: NatClass.NAT_RST if filtering is Filtering.RST else NatClass.NAT,
            Mapping.INDEPENDENT: NatClass.NAPT_EI, Mapping.SEQUENTIAL: NatClass.NAPT_SEQUENTIAL,
            Mapping.RANDOM: NatClass.NAPT_RANDOM}.get(mapping, NatClass.UNKNOWN)


def local_addresses() -> set:
    from fastpunch.netcheck.interfaces import interfaces

    addrs = {i.addr for i in interfaces()}
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


async def natcheck(ccs_ip: str, probe_ports: Sequence[int], probes_n: int = 3,
                   portmap: bool = True) -> NatReport:
    """Probe, classify, and meanwhile ask the gateway for a port mapping."""
    from fastpunch.netcheck.route import route_source
    from fastpunch.punch.base import free_port

    ports = [p for p in probe_ports if p]
    if not ports:
        raise probes.ProbeError("no-probe", "the CCS answers no address probes")
    asking = asyncio.ensure_future(probe_portmap()) if portmap else None
    try:
        found: list = []
        addrs = local_addresses() | {route_source(ccs_ip)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        for extra in range(ROUNDS):
            for _ in range(max(2, probes_n)):
                local = free_port()
                for port in ports:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        addr, ext = await probes.whoami(ccs_ip, port, local,
                                                        min(PROBE_TIMEOUT, left))
                    except (probes.ProbeError, OSError):
                        break                    # that port's other probe would fare no better
                    found.append(Probe(local, port, ext, addr))
            if not _mixed(found) or loop.time() >= deadline:
                break
            # some ports kept their number and some did not: other hosts
            # behind the NAT were using the same ports at the same time (a
            # crowded LAN, a narrow range); collisions pass, so probe again a
            # little later, at a moment of our own, and let the majority say
            await asyncio.sleep(random.uniform(0.02, 0.1))
        # after the whoami probes, not beside them: its connection takes a
        # mapping too, which would break a sequential NAPT's steady delta
        try:
            verdict = await probes.filtering(ccs_ip, ports[0])
        except OSError:
            verdict = Filtering.UNKNOWN
        report = classify(found, addrs, verdict)
        if asking is not None:
            protocol, detail = await asking
            if protocol and report.mapping is not Mapping.NONE:
                report = NatReport(**{**report.__dict__, "portmap": protocol,
                                      "portmap_detail": detail, "behind": report.nat,
                                      "nat": NatClass.UPNP})
            else:
                report = NatReport(**{**report.__dict__, "portmap_detail": detail})
        return report
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
