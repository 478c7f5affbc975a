"""Which strategies to try, in which order: a pure function of both sides'
next-connection info. The CCS sends the result with every rendezvous.

Version 2 devices (candidates and NAT evidence): the crafted race first,
``symmetric`` over every candidate pair, joined by ``predict`` where a side
is a sequential NAPT and by ``spray`` where exactly one side is a random
one and the other offers no port mapping; ``spoof`` after it between two
hosts without NAT; the relay last,
and alone (joined at once) when nothing direct can work: two random NAPTs
with no port mapping on either side, no LAN in common and no IPv6 path
(``v6``: both sides announced a global IPv6 candidate, which no NAT
translates: the crafted race's IPv6 pairs go through the firewalls). A side that cannot craft segments
(no privilege, no nf_tables) gets the kernel strategies only: ``upnp``
where a side has a mapped candidate, then ``simopen``.

A pair with a version-1 device gets the plan version 1 made
(``legacy_plan``), which both understand.
"""

from __future__ import annotations

from fastpunch.proto.kinds import CandidateKind, Mapping, parse

__all__ = ["plan", "legacy_plan", "mapping_of", "relay_first_helps", "CRAFTED", "PRESERVING"]

CRAFTED = {"spoof", "symmetric", "nat", "predict", "spray"}   # need raw sockets + TCP_REPAIR
PRESERVING = {"open", "firewall", "firewall-liberal", "nat", "nat-rst", "strict", "cgn", "upnp",
              "unknown"}
_MAPPING_OF_CLASS = {"open": Mapping.NONE, "firewall": Mapping.NONE,
                     "firewall-liberal": Mapping.NONE, "nat": Mapping.PRESERVE,
                     "nat-rst": Mapping.PRESERVE, "strict": Mapping.PRESERVE,
                     "cgn": Mapping.PRESERVE, "upnp": Mapping.PRESERVE,
                     "napt-ei": Mapping.INDEPENDENT, "napt-sequential": Mapping.SEQUENTIAL,
                     "napt-random": Mapping.RANDOM}


def mapping_of(info) -> Mapping:
    """A side's mapping: its evidence, or what its NAT class implies."""
    m = parse(Mapping, getattr(info, "mapping", None) or "unknown")
    if m is Mapping.UNKNOWN:
        return _MAPPING_OF_CLASS.get(info.nat, Mapping.UNKNOWN)
    return m


def _mapped(info) -> bool:
    return any(c.kind is CandidateKind.MAPPED for c in (getattr(info, "candidates", None) or ()))


def plan(a, b, *, legacy: bool = False, lan: bool = False, v6: bool = False) -> tuple:
    """Ordered strategy names for sides ``a`` and ``b`` (NextInfo-like);
    "relay" always last. ``legacy``: one side speaks version 1. ``lan``:
    the two share a LAN (one public address, or a prefix), and their LAN
    candidates make a pair whatever their NATs do. ``v6``: both have a
    global IPv6 candidate (``candidates.v6_path``): the NATs' mappings,
    which are IPv4's, do not decide alone."""
    crafted = a.crafted is not False and b.crafted is not False
    if legacy:
        return legacy_plan(a.nat, b.nat, crafted)
    ma, mb = mapping_of(a), mapping_of(b)
    mapped = _mapped(a) or _mapped(b)
    if not crafted:
        # neither side's raw SYNs leave NAT state the other cannot use
        return (("upnp",) if mapped else ()) + ("simopen", "relay")
    steps = ["symmetric"]
    if Mapping.SEQUENTIAL in (ma, mb):
        steps.append("predict")
    randoms = (ma is Mapping.RANDOM) + (mb is Mapping.RANDOM)
    if randoms == 2 and not mapped and not lan and not v6:
        return ("relay",)
    other = b if ma is Mapping.RANDOM else a
    if randoms == 1 and not _mapped(other) and not lan:
        # a mapping on the other side takes the random side's SYNs in
        # (symmetric, answered as a peer-reflexive flow): no spray needed
        steps.append("spray")
    if ma is Mapping.NONE and mb is Mapping.NONE:
        # spoof works only where symmetric does too (docs/punch.md): after it
        steps.append("spoof")
    return tuple(steps) + ("relay",)


def relay_first_helps(a, b, *, lan: bool = False, v6: bool = False) -> bool:
    """RelayFirst.AUTO's rule: start on the relay where the punch rests on
    guessing on both sides: both gateways give each destination its own
    port (endpoint-dependent mapping, RFC 4787: sequential or random), at
    least one of them unpredictably, and neither side has a port mapping
    nor a LAN in common with the other. There the plan sprays for seconds
    and mostly ends on the relay (docs/compatibility.md); elsewhere the
    punch takes about a round trip and relay-first only adds its join."""
    if lan or v6 or _mapped(a) or _mapped(b):
        return False
    ma, mb = mapping_of(a), mapping_of(b)
    dependent = (Mapping.SEQUENTIAL, Mapping.RANDOM)
    return ma in dependent and mb in dependent and Mapping.RANDOM in (ma, mb)


def legacy_plan(a_nat: str, b_nat: str, crafted: bool = True) -> tuple:
    """The plan of protocol version 1, from both NAT guesses alone."""
    sides = {a_nat, b_nat}
    steps: list = ["upnp"] if "upnp" in sides else []
    if not crafted:
        return tuple(steps) + ("simopen", "relay")
    if sides <= {"open", "firewall", "firewall-liberal"}:
        steps += ["symmetric", "spoof", "simopen"]
    elif "napt-random" in sides:
        steps += ["spray"] if not sides <= {"napt-random"} else []
    elif "napt-sequential" in sides:
        steps += ["predict", "symmetric"]
    else:
        steps += ["symmetric", "nat", "simopen"]
    return tuple(steps) + ("relay",)
