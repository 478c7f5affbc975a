"""Candidates: the addresses a peer may reach us at, and the pairs a punch tries.

RFC 8445 (ICE) is the model, for TCP: a device announces several candidates
of the one local port it punches from (its LAN addresses, what the CCS saw
for that very port, a port its gateway forwards to it, a guessed port), each
with a priority; both sides form the same candidate *pairs* from both lists
and try them at once, highest pair priority first (the punch machine,
``fastpunch.proto.punch``). Pure: no sockets, no clock.

Wire form of one candidate (``encode``/``decode``), big endian, in a list of
at most ``MAX_CANDIDATES``:

    kind:u8  family:u8 (4|6)  addr[4|16]  port:u16  priority:u32  prefix:u8

``prefix`` is the length of a host candidate's on-link network (0: unknown),
so both sides can tell, from what both know, whether a LAN address of the
peer's is reachable from their own LAN.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from fastpunch.proto.kinds import CandidateKind, Role

__all__ = ["Candidate", "CandidatePair", "MAX_CANDIDATES", "MAX_PAIRS", "CandidateError",
           "encode", "decode", "normalize", "priority", "pair_priority", "sanitize",
           "form_pairs", "same_lan", "usable_address", "v6_path", "public_v6"]

MAX_CANDIDATES = 16        # per side: every pair costs SYNs, and the wire field is bounded
MAX_PAIRS = 16             # crafted flows one punch drives (spray's are counted apart)
WIRE_BYTES = MAX_CANDIDATES * (1 + 1 + 16 + 2 + 4 + 1)   # the field's cap

_KIND_CODE = {CandidateKind.HOST: 1, CandidateKind.SRFLX: 2, CandidateKind.MAPPED: 3,
              CandidateKind.PREDICTED: 4}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}
_TAIL = struct.Struct("!HIB")


class CandidateError(ValueError):
    """A candidate list that is not well formed; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


@dataclass(frozen=True)
class Candidate:
    kind: CandidateKind
    addr: str
    port: int
    priority: int = 0
    prefix: int = 0              # host candidates: on-link prefix length (0: not known)

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.addr).version

    @property
    def endpoint(self) -> tuple:
        return (self.addr, self.port)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.addr}:{self.port}"


def priority(kind: CandidateKind, local_preference: int = 65535, component: int = 1) -> int:
    """RFC 8445 5.1.2.1: 2^24 * type preference + 2^8 * local preference +
    (256 - component)."""
    if not 0 <= local_preference <= 65535:
        raise ValueError("local preference is 0..65535")
    return (kind.type_preference << 24) | (local_preference << 8) | (256 - component)


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 6.1.2.3: the same number on both sides, from the controlling
    (initiator's) and the controlled (responder's) candidate priorities."""
    g, d = controlling, controlled
    return (1 << 32) * min(g, d) + 2 * max(g, d) + (1 if g > d else 0)


def usable_address(addr: str) -> Optional[str]:
    """Why ``addr`` can never be a peer's address (None when it can):
    unspecified, loopback, multicast, broadcast, reserved."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "not an address"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and (ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_reserved):
        return "reserved"
    return None


def normalize(candidates: Iterable[Candidate]) -> tuple:
    """What a device may announce: each endpoint once (its first, highest
    kind kept), no unusable address, at most MAX_CANDIDATES. (An open host's
    reflexive address is its host candidate: one entry, not two.)"""
    out, seen = [], set()
    for c in candidates:
        if c.endpoint in seen or usable_address(c.addr) is not None:
            continue
        seen.add(c.endpoint)
        out.append(c)
    return tuple(out[:MAX_CANDIDATES])


def encode(candidates: Sequence[Candidate]) -> bytes:
    if len({c.endpoint for c in candidates}) != len(candidates):
        raise CandidateError("duplicate", "a candidate given twice")
    if len(candidates) > MAX_CANDIDATES:
        raise CandidateError("too-many", f"{len(candidates)} candidates, at most "
                                         f"{MAX_CANDIDATES}")
    out = bytearray()
    for c in candidates:
        if c.kind not in _KIND_CODE:
            raise CandidateError("bad-kind", f"{c.kind.value} candidates are never announced")
        ip = ipaddress.ip_address(c.addr)
        if not 0 < c.port < 65536 or not 0 <= c.priority < 1 << 32 or \
                not 0 <= c.prefix <= ip.max_prefixlen:
            raise CandidateError("bad-field", f"candidate {c} out of range")
        out += bytes([_KIND_CODE[c.kind], ip.version]) + ip.packed + \
            _TAIL.pack(c.port, c.priority, c.prefix)
    return bytes(out)


def decode(data: bytes) -> tuple:
    """The candidates of a wire field; CandidateError for anything malformed,
    unusable (see usable_address), duplicated or too many."""
    out: list = []
    seen: set = set()
    off = 0
    while off < len(data):
        if len(out) == MAX_CANDIDATES:
            raise CandidateError("too-many", f"more than {MAX_CANDIDATES} candidates")
        if off + 2 > len(data):
            raise CandidateError("truncated", "candidate header cut short")
        code, family = data[off], data[off + 1]
        if code not in _CODE_KIND:
            raise CandidateError("bad-kind", f"unknown candidate kind {code}")
        if family not in (4, 6):
            raise CandidateError("bad-family", f"address family {family}")
        size = 4 if family == 4 else 16
        end = off + 2 + size + _TAIL.size
        if end > len(data):
            raise CandidateError("truncated", "candidate cut short")
        raw = data[off + 2:off + 2 + size]
        addr = str(ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw))
        port, prio, prefix = _TAIL.unpack_from(data, off + 2 + size)
        why = usable_address(addr)
        if why is not None:
            raise CandidateError("bad-address", f"candidate address {addr}: {why}")
        if port == 0:
            raise CandidateError("bad-port", f"candidate {addr} with port 0")
        if prefix > (32 if family == 4 else 128):
            raise CandidateError("bad-prefix", f"prefix /{prefix} for {addr}")
        if (addr, port) in seen:
            raise CandidateError("duplicate", f"candidate {addr}:{port} given twice")
        seen.add((addr, port))
        out.append(Candidate(_CODE_KIND[code], addr, port, prio, prefix))
        off = end
    return tuple(out)


def _private(ip) -> bool:
    """An address only a LAN (or a carrier's shared space) can reach."""
    if ip.version == 4:
        return any(ip in net for net in _PRIVATE_V4)
    return ip.is_private and not ip.is_loopback


_PRIVATE_V4 = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"))


V6_SITE_PREFIX = 64       # an IPv6 host's addresses (stable, temporary) share its /64


def _v6_global(ip) -> bool:
    return ip.version == 6 and ip in _V6_GLOBAL


_V6_GLOBAL = ipaddress.ip_network("2000::/3")
_V6_ULA = ipaddress.ip_network("fc00::/7")
# a /64 that is not one site's: Teredo's (RFC 4380) is every client of one
# server, its low 64 bits an arbitrary IPv4 address and port
_V6_NO_SITE = (ipaddress.ip_network("2001::/32"),)


def sanitize(candidates: Iterable[Candidate], reflexive: str,
             refused: Iterable[str] = (), seen: Iterable[str] = (),
             ports: Optional[dict] = None) -> tuple:
    """The CCS's check of what a device announces, before the peer sees it:
    (kept, dropped as (candidate, why)).

    A device must not make its peer send SYNs anywhere it likes. The CCS
    has seen the device at ``reflexive`` (its login) and at ``seen`` (what
    its token-carrying probes came from: its address in the other family).
    A candidate of a family in which the CCS has seen the device at no
    address is dropped. IPv4: every candidate that is not a host candidate
    must carry the address seen (its gateway's public address), and a host
    candidate must be a LAN address (private, shared or link-local) or that
    same public address. IPv6: a candidate carries the address seen, or,
    as a host candidate, another address of the seen one's /64 (a host's
    stable and temporary addresses) on a port the device's token probes
    came from (``ports``, per family: the /64 of a public network or a
    shared server holds other people's machines, and the device must not
    steer its peers at their ports; not for Teredo's 2001::/32, whose /64 is
    a whole relay's clients), or a unique local address (a LAN's, fc00::/7);
    never a link-local one (it means nothing without the interface it is
    on). None of them may be ``refused`` (the CCS's own
    addresses: devices that reach it over a private network must not aim
    their peers at it)."""
    evidence = {}
    for addr in (*seen, reflexive):            # the login's address last: it wins its family
        try:
            evidence[ipaddress.ip_address(addr).version] = ipaddress.ip_address(addr)
        except ValueError:
            continue
    refused = set(refused) - {str(a) for a in evidence.values()}
    kept, dropped = [], []
    for c in candidates:
        ip = ipaddress.ip_address(c.addr)
        at = evidence.get(ip.version)
        if at is None:
            dropped.append((c, f"the CCS has seen this device at no IPv{ip.version} address"))
        elif c.addr in refused:
            dropped.append((c, "the CCS's own address"))
        elif ip == at:
            kept.append(c)
        elif c.kind is not CandidateKind.HOST:
            dropped.append((c, f"not the address the CCS sees ({at})"))
        elif ip.version == 4:
            if _private(ip):
                kept.append(c)
            else:
                dropped.append((c, "a host candidate is a LAN address or the public one"))
        elif ip.is_link_local:
            dropped.append((c, "a link-local address (no interface to reach it by)"))
        elif ip in _V6_ULA:
            kept.append(c)
        elif _v6_global(ip) and _v6_global(at) and not any(at in n for n in _V6_NO_SITE) \
                and ip in ipaddress.IPv6Network(f"{at}/{V6_SITE_PREFIX}", strict=False):
            if c.port in (ports or {}).get(6, ()):
                kept.append(c)
            else:
                dropped.append((c, f"port {c.port} of another address of its /64 is none "
                                   "it probed from"))
        else:
            dropped.append((c, f"an IPv6 host candidate is in the /{V6_SITE_PREFIX} of the "
                               f"address the CCS sees ({at}) or a unique local one"))
    return tuple(kept), tuple(dropped)


@dataclass(frozen=True)
class CandidatePair:
    """One crafted flow: from our base (local address, punch port) toward one
    remote candidate. ``ours`` is the candidate of ours the peer will see
    the flow come from (for the pair priority and the report)."""
    remote: Candidate
    ours: Candidate
    priority: int

    @property
    def kind(self) -> str:
        return f"{self.ours.kind.value}-{self.remote.kind.value}"

    def __str__(self) -> str:
        return f"{self.ours} -> {self.remote}"


# the shortest prefix taken as a LAN's: a device announcing 10.0.0.1/1 must
# not pass for everybody's neighbour (and learn their LAN addresses)
MIN_LAN_PREFIX = {4: 16, 6: 48}


def _on_link(addr: str, host: Candidate) -> bool:
    """Whether ``addr`` is inside the LAN ``host`` announced."""
    try:
        ip = ipaddress.ip_address(host.addr)
        if not host.prefix or host.prefix < MIN_LAN_PREFIX[ip.version]:
            return False
        net = ipaddress.ip_network(f"{host.addr}/{host.prefix}", strict=False)
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False


def same_lan(ours: Sequence[Candidate], theirs: Sequence[Candidate]) -> bool:
    """Whether the two sides share a LAN by the prefixes they announced: a
    host address of each inside the other's announced LAN (both ways, so
    neither side's claim alone decides), no LAN shorter than
    ``MIN_LAN_PREFIX``. The rule both sides and the CCS evaluate alike."""
    mine = [c for c in ours if c.kind is CandidateKind.HOST]
    peer = [c for c in theirs if c.kind is CandidateKind.HOST]
    return any(_on_link(p.addr, m) and _on_link(m.addr, p) for m in mine for p in peer)


def public_v6(addr: str) -> bool:
    """A global unicast IPv6 address: reachable from anywhere over IPv6
    (through the stateful firewall a punch opens), unlike a ULA or a
    link-local one."""
    try:
        return _v6_global(ipaddress.ip_address(addr))
    except ValueError:
        return False


def v6_path(ours: Optional[Sequence[Candidate]], theirs: Optional[Sequence[Candidate]]) -> bool:
    """Whether both sides announced a global IPv6 candidate: a pair no NAT
    translates (the plan's ``v6``)."""
    return any(public_v6(c.addr) for c in ours or ()) and \
        any(public_v6(c.addr) for c in theirs or ())


def form_pairs(ours: Sequence[Candidate], theirs: Sequence[Candidate], role: Role, *,
               our_public: str, peer_public: str, limit: int = MAX_PAIRS) -> list:
    """The pairs to try, highest priority first, the same logical pairs on
    both sides (a flow toward each remote candidate, from our one port, in
    the remote's family: a family we announced no candidate in has no base
    to send from, and pairs none).

    Host candidates pair only when they can be reached: a global IPv6
    address whenever we have one too (no NAT between: the firewalls are
    what the punch opens); otherwise both sides behind the same public
    address (one gateway: the LAN), or, across public addresses, a LAN
    address of the peer inside one of our own announced LANs while the two
    share a LAN (``same_lan``). A LAN address of someone else's LAN would
    send our SYNs out of our default route to nobody."""
    one_gateway = our_public == peer_public
    lan = one_gateway or same_lan(ours, theirs)
    our_hosts = [c for c in ours if c.kind is CandidateKind.HOST]
    families = {c.family for c in ours}

    def reachable(remote: Candidate) -> bool:
        if public_v6(remote.addr):
            return any(public_v6(c.addr) for c in ours)
        return lan and (one_gateway or any(_on_link(remote.addr, m) for m in our_hosts))

    def ours_for(remote: Candidate) -> Candidate:
        want = CandidateKind.HOST if remote.kind is CandidateKind.HOST else CandidateKind.SRFLX
        same = [c for c in ours if c.family == remote.family]
        if remote.family == 6 and public_v6(remote.addr):
            # over IPv6 our host address is what the peer sees (no NAT)
            fitting = [c for c in same if public_v6(c.addr)] or same
        else:
            fitting = [c for c in same if c.kind is want] or same
        if not fitting:
            return Candidate(want, "0.0.0.0", 1, priority(want))
        return max(fitting, key=lambda c: c.priority)

    best: dict = {}
    for remote in theirs:
        if ours and remote.family not in families:
            continue
        if not ours and remote.family != 4:
            continue
        if remote.kind is CandidateKind.HOST and not reachable(remote):
            continue
        mine = ours_for(remote)
        g, d = (mine.priority, remote.priority) if role is Role.INITIATOR else \
            (remote.priority, mine.priority)
        pair = CandidatePair(remote, mine, pair_priority(g, d))
        old = best.get(remote.endpoint)
        if old is None or pair.priority > old.priority:
            best[remote.endpoint] = pair
    return sorted(best.values(), key=lambda p: (-p.priority, p.remote.addr, p.remote.port))[:limit]
