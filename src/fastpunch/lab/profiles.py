"""Gateway profiles: each a real nftables/conntrack configuration, as data.

A profile turns into nftables tables (rendered by fastpunch.netfilter, applied
atomically inside the gateway's namespace) and per-namespace sysctls. What
each one models and how it measurably behaves is in docs/lab.md; the tests
in tests/lab/ prove the behaviour with real traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fastpunch.netfilter import Chain, Table

__all__ = ["Profile", "PROFILES", "V6_PROFILES", "gateway_tables", "v6_tables", "core_tables",
           "HAIRPIN_MODES", "NAT66",
           "FRAG_NEEDED_MODES", "EI_OFFSET", "ei_port", "Map", "MapTable"]


@dataclass(frozen=True)
class Profile:
    name: str
    nat: str                     # "none" | "preserve" | "offset" | "sequential" | "random"
    filtering: bool              # stateful: unsolicited inbound is not forwarded
    unsolicited: str             # what the gateway itself does with unsolicited WAN SYNs:
                                 # "accept" | "drop" | "rst"
    strict: bool = False         # tcp_loose=0, tcp_be_liberal=0, INVALID dropped
    upnp: bool = False           # miniupnpd on the LAN side (UPnP-IGD, NAT-PMP, PCP)
    description: str = ""
    sysctls: dict = field(default_factory=dict)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("open", "none", False, "accept",
            description="public host, a router without NAT or filtering"),
    Profile("firewall", "none", True, "drop",
            description="stateful firewall without NAT (the spoof strategy's case)"),
    Profile("firewall-liberal", "none", True, "drop",
            description="as firewall, with lenient TCP window tracking "
                        "(nf_conntrack_tcp_be_liberal=1): where spoof passes data",
            sysctls={"net/netfilter/nf_conntrack_tcp_be_liberal": "1"}),
    Profile("nat", "preserve", True, "drop",
            description="port-preserving NAT (masquerade) + stateful firewall, "
                        "unsolicited traffic silently dropped (typical home router)"),
    Profile("nat-rst", "preserve", True, "rst",
            description="as nat, but unsolicited SYNs are answered with RST"),
    Profile("napt-ei", "offset", True, "drop",
            description="endpoint-independent port-translating NAT (RFC 4787 REQ-1): one "
                        "internal port gets one external port, internal + 1000 (wrapping in "
                        "1024-65535), for every destination"),
    Profile("napt-sequential", "sequential", True, "drop",
            description="port-translating NAT whose external ports increase by one "
                        "per new mapping"),
    Profile("napt-random", "random", True, "drop",
            description="port-translating NAT with fully random external ports "
                        "(the hard 'symmetric' case)"),
    Profile("strict", "preserve", True, "drop", strict=True,
            description="port-preserving NAT with strict conntrack: tcp_loose=0, "
                        "tcp_be_liberal=0, INVALID dropped",
            sysctls={"net/netfilter/nf_conntrack_tcp_loose": "0",
                     "net/netfilter/nf_conntrack_tcp_be_liberal": "0"}),
    Profile("upnp", "preserve", True, "drop", upnp=True,
            description="nat plus miniupnpd on the LAN side granting port mappings "
                        "over UPnP-IGD, NAT-PMP and PCP"),
)}
# "cgn" is a topology (a home "nat" behind a carrier "nat"), not a ruleset.
CGN = "cgn"
UPNP_TABLE = "lab_upnp"
SEQUENTIAL_BASE = 20000
SEQUENTIAL_SPAN = 4096      # ports in the sequential allocator's cycle (20000-24095)
EI_OFFSET = 1000            # napt-ei: external = internal + EI_OFFSET, wrapping in EI_PORTS
EI_PORTS = (1024, 65535)
HAIRPIN_MODES = ("off", "wan", "lan")
FRAG_NEEDED_MODES = ("pass", "drop")
# ICMP destination unreachable, code 4: the only signal of path MTU discovery
FRAG_NEEDED = "icmp type destination-unreachable icmp code frag-needed"
_TYPE_RE = re.compile(r"^[a-z0-9_]+( \. [a-z0-9_]+)*$")


def ei_port(port: int) -> int:
    """The external port napt-ei gives internal ``port`` (1024-65535)."""
    low, high = EI_PORTS
    return low + (port - low + EI_OFFSET) % (high - low + 1)


@dataclass(frozen=True)
class Map:
    """A named nft map: ``key`` and ``data`` are nft types (``inet_service``,
    concatenations as ``ipv4_addr . inet_service``); ``elements`` nft text
    (``"1024 : 2024, ..."``); ``dynamic`` for one the packet path fills
    (``update @name { k : v }``), whose elements expire after ``timeout``."""

    name: str
    key: str
    data: str
    elements: str = ""
    dynamic: bool = False
    timeout: Optional[int] = None       # seconds, dynamic maps only

    def render(self) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,31}$", self.name):
            raise ValueError(f"not a usable map name: {self.name!r}")
        for t in (self.key, self.data):
            if not _TYPE_RE.match(t):
                raise ValueError(f"not an nft type: {t!r}")
        if "}" in self.elements or ";" in self.elements:
            raise ValueError("map elements must not close the map")
        parts = [f"type {self.key} : {self.data};"]
        if self.dynamic:
            parts.append("flags dynamic,timeout;")
            parts.append(f"timeout {int(self.timeout or 300)}s;")
        if self.elements:
            parts.append(f"elements = {{ {self.elements} }};")
        return f"map {self.name} {{ {' '.join(parts)} }}"


@dataclass(frozen=True)
class MapTable(Table):
    """A :class:`Table` that also declares named maps, in the same atomic
    transaction (fastpunch.netfilter's Table has chains only)."""

    maps: Sequence[Map] = ()

    def render(self) -> str:
        inner = super().render()                 # "table F N { chains; }"
        if not self.maps:
            return inner
        head, _, rest = inner.partition("{ ")
        maps = "; ".join(m.render() for m in self.maps)
        rest = rest if rest.strip() != "}" else "}"
        return f"{head}{{ {maps}; {rest}"


EI_MAP = "ei_ports"
HAIRPIN_BY_EXTERNAL = "hairpin_by_external"
HAIRPIN_BY_INTERNAL = "hairpin_by_internal"
HAIRPIN_TIMEOUT = 300       # s a learned mapping outlives the last packet that used it


def _mapping(profile: Profile, wan_addr: str, to_wan: str) -> list[str]:
    """NAT statements giving a new flow the profile's external port. ``to_wan``
    is the statement that puts the WAN address on a packet and picks the port
    itself ("masquerade" on the way out; an explicit ``snat ip to WAN`` for
    hairpinned flows, which leave on the LAN side where masquerade would pick
    the LAN address); rules before it choose the port where the profile does."""
    if profile.nat == "preserve":
        return [to_wan]
    if profile.nat == "random":
        return [f"{to_wan} random,fully-random"]
    if profile.nat == "offset":
        # One 64k-element map: nft 1.0.6 has no shifted port range (the
        # kernel's NF_NAT_RANGE_PROTO_OFFSET, iptables' "/base"), nor
        # arithmetic on a port. Loads in ~0.2 s (docs/lab.md). A port the map
        # lacks (below 1024) falls through to ``to_wan``. The range of this
        # snat is one port, so the kernel skips its uniqueness search: two
        # hosts using one internal port towards one destination get one
        # tuple, and the second flow is dropped on conntrack confirm.
        return [f"meta l4proto {{ tcp, udp }} snat ip to {wan_addr} : th sport map @{EI_MAP}",
                to_wan]
    if profile.nat == "sequential":
        # numgen inc advances once per new connection (NAT runs on a
        # connection's first packet only): a sequential port allocator.
        # Its value is host-order, and nft writes it into the port
        # unconverted (20000 went out as 8270, 0x4E20 byte-swapped), so
        # the counter indexes a map whose inet_service values are in
        # network order. A port mapping needs a transport match first.
        ports = ", ".join(f"{k} : {SEQUENTIAL_BASE + k}" for k in range(SEQUENTIAL_SPAN))
        return [f"meta l4proto {proto} snat ip to {wan_addr} : "
                f"numgen inc mod {SEQUENTIAL_SPAN} map {{ {ports} }}"
                for proto in ("tcp", "udp")] + [to_wan]
    raise ValueError(f"profile {profile.name} has no NAT")


def _ei_elements() -> str:
    low, high = EI_PORTS
    return ", ".join(f"{p} : {ei_port(p)}" for p in range(low, high + 1))


def gateway_tables(profile: Profile, wan: str, lan: str, wan_addr: str,
                   loss_percent: float = 0.0, *, lan_net: Optional[str] = None,
                   hairpin: str = "off", clamp_mss: bool = False,
                   frag_needed: str = "pass") -> list[Table]:
    """The tables that make a gateway namespace behave as ``profile``.

    ``lan_net`` is the LAN's prefix (needed by hairpin). ``hairpin``: "off"
    (a LAN host's packet to the WAN address reaches the gateway itself),
    "wan" (RFC 4787 REQ-9: it reaches the LAN host owning that external port,
    from the WAN address and the sender's own external port), "lan" (as
    "wan" but from the gateway's LAN address, OpenWrt's reflection).
    ``clamp_mss``: SYNs crossing the gateway get an MSS that fits the route
    they leave by. ``frag_needed="drop"``: ICMP fragmentation-needed is
    dropped in forward and output (a path MTU discovery blackhole)."""
    if hairpin not in HAIRPIN_MODES:
        raise ValueError(f"hairpin must be one of {', '.join(HAIRPIN_MODES)}: {hairpin!r}")
    if frag_needed not in FRAG_NEEDED_MODES:
        raise ValueError(f"frag_needed must be one of {', '.join(FRAG_NEEDED_MODES)}")
    if hairpin != "off" and (profile.nat == "none" or lan_net is None):
        raise ValueError("hairpin needs a NAT profile and the LAN prefix")
    tables: list[Table] = []
    if profile.filtering or profile.unsolicited != "accept":
        forward = []
        if profile.strict:
            forward.append("ct state invalid counter drop")
        forward += ["ct state established,related accept", f'iifname "{lan}" accept']
        if profile.upnp:
            forward.append("ct status dnat accept")      # inbound through a granted mapping
        inbound = [f'iifname "{wan}" ct state established,related accept']
        if profile.unsolicited == "rst":
            inbound.append(f'iifname "{wan}" tcp flags & (syn | ack) == syn '
                           "counter reject with tcp reset")
        inbound.append(f'iifname "{wan}" counter drop')
        # IPv4's: a site's IPv6 is its own profile's (V6_PROFILES, v6_tables)
        tables.append(Table("lab_filter", (
            Chain("forward", "forward", tuple(forward),
                  policy="drop" if profile.filtering else "accept"),
            Chain("input", "input", tuple(inbound)),
        ), family="ip"))
    if profile.nat != "none":
        maps: list[Map] = []
        chains: list[Chain] = []
        post: list[str] = []
        if profile.nat == "offset":
            maps.append(Map(EI_MAP, "inet_service", "inet_service", _ei_elements()))
        if hairpin != "off":
            # A mapping is learned from the packet path: every outbound
            # packet of a LAN host's flow, after SNAT (priority srcnat + 10),
            # records "external port -> internal address and port" from its
            # conntrack entry (the reply tuple holds the translated port).
            # An update refreshes an element's timeout but keeps its data:
            # when two hosts hold the same external port (towards different
            # destinations, which a port-preserving NAT allows), the first
            # one keeps the hairpin until its element expires.
            learn = (f"update @{HAIRPIN_BY_EXTERNAL} {{ meta l4proto . ct reply proto-dst : "
                     "ct original ip saddr . ct original proto-src }")
            maps.append(Map(HAIRPIN_BY_EXTERNAL, "inet_proto . inet_service",
                            "ipv4_addr . inet_service", dynamic=True, timeout=HAIRPIN_TIMEOUT))
            if hairpin == "wan":
                learn += (f" update @{HAIRPIN_BY_INTERNAL} {{ ct original ip saddr . "
                          "meta l4proto . ct original proto-src : ct reply proto-dst }")
                maps.append(Map(HAIRPIN_BY_INTERNAL, "ipv4_addr . inet_proto . inet_service",
                                "inet_service", dynamic=True, timeout=HAIRPIN_TIMEOUT))
            chains.append(Chain("hairpin_learn", "postrouting", (
                f'oifname "{wan}" ct direction original ct original ip saddr {lan_net} '
                f"meta l4proto {{ tcp, udp }} {learn}",), priority=110))
            # A LAN host's new flow to WAN_ADDR:port goes to whoever owns that
            # external port; without a mapping it reaches the gateway itself.
            chains.append(Chain("hairpin_in", "prerouting", (
                f'iifname "{lan}" ip daddr {wan_addr} meta l4proto {{ tcp, udp }} '
                f"dnat ip to meta l4proto . th dport map @{HAIRPIN_BY_EXTERNAL}",),
                type="nat", priority=-100))
            hairpinned = f'oifname "{lan}" ct status dnat ip saddr {lan_net}'
            if hairpin == "wan":
                # the sender's own external port when it has a mapping from that
                # port, else a new one chosen as the profile chooses ports
                post.append(f"{hairpinned} meta l4proto {{ tcp, udp }} snat ip to {wan_addr} : "
                            f"ip saddr . meta l4proto . th sport map @{HAIRPIN_BY_INTERNAL}")
                post += [f"{hairpinned} {stmt}"
                         for stmt in _mapping(profile, wan_addr, f"snat ip to {wan_addr}")]
            else:
                post.append(f"{hairpinned} masquerade")     # the LAN address
        post += [f'oifname "{wan}" {stmt}' for stmt in _mapping(profile, wan_addr, "masquerade")]
        chains.insert(0, Chain("postrouting", "postrouting", tuple(post), type="nat",
                               priority=100))
        tables.append(MapTable("lab_nat", tuple(chains), family="ip", maps=tuple(maps)))
    if profile.upnp:
        # miniupnpd writes its rules into these chains (named in its config)
        tables.append(Table(UPNP_TABLE, (
            Chain("forward", "forward", ("jump miniupnpd",), priority=-10),
            Chain("prerouting", "prerouting", ("jump prerouting_miniupnpd",), type="nat",
                  priority=-100),
            Chain("postrouting", "postrouting", ("jump postrouting_miniupnpd",), type="nat",
                  priority=100),
        ), family="inet", regular_chains=("miniupnpd", "prerouting_miniupnpd",
                                          "postrouting_miniupnpd")))
    if clamp_mss:
        # as PPPoE routers do: a SYN's MSS option is cut to what the route it
        # leaves by carries (route MTU - 40); priority mangle, before filtering
        tables.append(Table("lab_mss", (
            Chain("forward", "forward", ("tcp flags syn tcp option maxseg size set rt mtu",),
                  priority=-150),
        ), family="inet"))
    if frag_needed == "drop":
        rule = f"{FRAG_NEEDED} counter drop"
        tables.append(Table("lab_pmtu", (
            Chain("forward", "forward", (rule,), priority=-10),
            Chain("output", "output", (rule,), priority=-10),   # the gateway's own
        ), family="inet"))
    if loss_percent:
        if not 0 < loss_percent < 100:
            raise ValueError("loss must be a percentage between 0 and 100")
        threshold = int(round(loss_percent * 100))      # per 10,000 for 0.01% steps
        rule = f"numgen random mod 10000 < {threshold} counter drop"
        tables.append(Table("lab_impair", (
            Chain("wan_in", "prerouting", (f'iifname "{wan}" {rule}',), priority=-300),
            Chain("wan_out", "postrouting", (f'oifname "{wan}" {rule}',), priority=300),
        ), family="ip"))
    return tables


# A site's IPv6, independent of its IPv4 profile (no NAT on either side's
# IPv6 here: every host has a global address of its site's /64):
V6_PROFILES = {
    "open": "no filtering: a host reachable from anywhere over IPv6",
    "firewall": "stateful IPv6 firewall (RFC 6092, the common home-router default): "
                "replies and what the LAN opened pass, unsolicited inbound is dropped",
    "firewall-rst": "as firewall, but an unsolicited inbound SYN is answered with a RST",
    "nat66": "NAT66 masquerade (rare but real): the LAN has a unique local /64, the "
             "gateway translates it to its own global address, and filters as firewall",
}
NAT66 = "nat66"


def v6_tables(v6: str, wan: str, lan: str) -> list[Table]:
    """The gateway's IPv6 filter for site IPv6 profile ``v6``."""
    if v6 not in V6_PROFILES:
        raise ValueError(f"IPv6 profile must be one of {', '.join(V6_PROFILES)}: {v6!r}")
    if v6 == "open":
        return []
    forward = ["ct state established,related accept", f'iifname "{lan}" accept',
               # neighbour discovery is the link's, never forwarded; path MTU is related
               f'iifname "{wan}" icmpv6 type {{ echo-request, packet-too-big }} accept']
    if v6 == "firewall-rst":
        forward.append(f'iifname "{wan}" tcp flags & (syn | ack) == syn '
                       "counter reject with tcp reset")
    tables = [Table("lab_filter6", (
        Chain("forward", "forward", tuple(forward) + ("counter drop",)),), family="ip6")]
    if v6 == NAT66:
        # masquerade keeps the source port where it can, as the IPv4 "nat" does
        tables.append(Table("lab_nat6", (Chain("postrouting", "postrouting", (
            f'oifname "{wan}" masquerade',), type="nat", priority=100),), family="ip6"))
    return tables


def core_tables(site: str, link: str, public_net: str, frag_needed: str = "pass") -> list[Table]:
    """What the internet core applies for one site: with ``frag_needed="drop"``
    no ICMP fragmentation-needed crosses the site's access link ``link``
    (forward, either way) and none the core itself sends about a packet for
    the site: those go to the sender's link, so they are matched on the
    quoted header's destination (at 24 bytes into the ICMP message: 8 of
    ICMP header, 16 into the quoted IP header, before any IP options) being
    in ``public_net``, the site's public address or prefix."""
    import ipaddress

    if frag_needed not in FRAG_NEEDED_MODES:
        raise ValueError(f"frag_needed must be one of {', '.join(FRAG_NEEDED_MODES)}")
    if frag_needed == "pass":
        return []
    if not re.match(r"^[a-z][a-z0-9]{0,13}$", link):
        raise ValueError(f"not an interface name: {link!r}")
    net = ipaddress.ip_network(public_net)
    quoted_dst = (f"@th,192,32 & {int(net.netmask):#010x} == {int(net.network_address):#010x}")
    drop = "counter drop"
    return [Table(f"lab_pmtu_{site}", (
        Chain("forward", "forward", (f'iifname "{link}" {FRAG_NEEDED} {drop}',
                                     f'oifname "{link}" {FRAG_NEEDED} {drop}'), priority=-10),
        Chain("output", "output", (f'oifname "{link}" {FRAG_NEEDED} {drop}',
                                   f"{FRAG_NEEDED} {quoted_dst} {drop}"), priority=-10),
    ), family="inet")]
