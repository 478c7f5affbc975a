"""Gateway profiles: each a real nftables/conntrack configuration, as data.

A profile turns into nftables tables (rendered by fastpunch.netfilter, applied
atomically inside the gateway's namespace) and per-namespace sysctls. What
each one models and how it measurably behaves is in docs/lab.md; the tests
in tests/lab/ prove the behaviour with real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastpunch.netfilter import Chain, Table

__all__ = ["Profile", "PROFILES", "gateway_tables"]


@dataclass(frozen=True)
class Profile:
    name: str
    nat: str                     # "none" | "preserve" | "sequential" | "random"
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


def gateway_tables(profile: Profile, wan: str, lan: str, wan_addr: str,
                   loss_percent: float = 0.0) -> list[Table]:
    """The tables that make a gateway namespace behave as ``profile``."""
    tables = []
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
        tables.append(Table("lab_filter", (
            Chain("forward", "forward", tuple(forward),
                  policy="drop" if profile.filtering else "accept"),
            Chain("input", "input", tuple(inbound)),
        ), family="inet"))
    if profile.nat != "none":
        if profile.nat == "preserve":
            rules = [f'oifname "{wan}" masquerade']
        elif profile.nat == "random":
            rules = [f'oifname "{wan}" masquerade random,fully-random']
        else:
            # numgen inc advances once per new connection (NAT runs on a
            # connection's first packet only): a sequential port allocator.
            # Its value is host-order, and nft writes it into the port
            # unconverted (20000 went out as 8270, 0x4E20 byte-swapped), so
            # the counter indexes a map whose inet_service values are in
            # network order. A port mapping needs a transport match first.
            ports = ", ".join(f"{k} : {SEQUENTIAL_BASE + k}" for k in range(SEQUENTIAL_SPAN))
            rules = [f'oifname "{wan}" meta l4proto {proto} snat ip to {wan_addr} : '
                     f"numgen inc mod {SEQUENTIAL_SPAN} map {{ {ports} }}"
                     for proto in ("tcp", "udp")]
            rules.append(f'oifname "{wan}" masquerade')
        tables.append(Table("lab_nat", (
            Chain("postrouting", "postrouting", tuple(rules), type="nat", priority=100),
        ), family="ip"))
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
