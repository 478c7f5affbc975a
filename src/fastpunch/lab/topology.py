"""A small internet in network namespaces: sites behind gateways of chosen
profiles, joined by an "internet" core namespace that hosts the CCS.

    internet ns  a router; lo: 203.0.113.1 (CCS), 203.0.113.2 (relay)
       |-- sa -- gateway a  wan 203.0.113.10/32   lan 10.1.0.1/24  -- host a 10.1.0.2
       |-- sb -- gateway b  wan 203.0.113.20/32   lan 10.2.0.1/24  -- host b 10.2.0.2
                                                  (bridge)        |- host b2 10.2.0.3

    Each gateway has its own point-to-point link to the internet router
    (a /32 and an on-link default route via 203.0.113.1; no proxy ARP, whose
    reply delay of up to 0.8 s would stall first packets), so traffic between
    sites crosses one routed hop whose TTL decrement is real: a SYN sent with
    TTL 2 leaves its own NAT and dies in the core, before the far gateway.
    Dual stack (``v6=``): the core's lo also has 2001:db8::1 (CCS) and
    2001:db8::2 (relay); a site i with an IPv6 profile gets the /64
    2001:db8:i::/64 on its LAN (gateway ::1, hosts ::2...), routed over its
    access link's 2001:db8:ff0i::/64, with the site's IPv6 profile as the
    gateway's IPv6 filter (every host has a global address; a ``nat66`` site
    has fd00:i::/64 instead, masqueraded to its gateway's address); with
    ``v4=False`` its hosts have no IPv4 at all (an IPv6-only site).
    (no-NAT profiles give the site a public /28 from 198.51.100.0/24 instead;
     cgn puts a home NAT 10.i.0.1 | 100.64.i.2 behind a carrier NAT
     100.64.i.1 | 203.0.113.(10 i); a site with several hosts has a Linux
     bridge as its gateway's "lan", each host's veth a port of it)

Links are pyroute2 calls, rules are fastpunch.netfilter tables applied in
each namespace, sysctls are written per namespace. Names carry the creating
pid so a crashed lab is found and swept (:func:`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

from fastpunch import _caps, _netns
from fastpunch._netns import create_namespace, inside, veth_between
from fastpunch._proc import pid_alive
from fastpunch.errors import FastpunchError, KernelFeatureMissing
from fastpunch.lab.profiles import (CGN, FRAG_NEEDED_MODES, HAIRPIN_MODES, NAT66, PROFILES,
                                    V6_PROFILES, Profile, core_tables, gateway_tables, v6_tables)
from fastpunch.netfilter import Nftables

__all__ = ["Lab", "Site", "Host", "LabError", "sweep_stale", "CCS_ADDR", "RELAY_ADDR",
           "CCS_ADDR6", "RELAY_ADDR6"]

CCS_ADDR = "203.0.113.1"
RELAY_ADDR = "203.0.113.2"
CCS_ADDR6 = "2001:db8::1"        # RFC 3849 documentation prefix only
RELAY_ADDR6 = "2001:db8::2"
PUBLIC_NET = "203.0.113.0/24"
PREFIX = "fpl"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)x(\d+)-")
_counter = itertools.count()
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
MAX_HOSTS = 8
MTU_RANGE = (576, 9000)     # RFC 791's minimum datagram every host must take .. jumbo


class LabError(FastpunchError):
    """The lab could not be built as asked."""


@dataclass
class Host:
    """One host of a site: ``name`` is what :meth:`Lab.ns` takes ("a", "a2", ...)."""

    name: str
    ns: str
    addr: str
    addr6: Optional[str] = None     # its global IPv6 address (a site with an IPv6 profile)


@dataclass
class Site:
    name: str
    profile: str
    index: int
    host_ns: str
    gateway_ns: str                 # the gateway nearest the internet
    host_addr: str                  # the host's own address
    public_addr: str                # the address the internet sees
    gateway_lan: str
    home_ns: Optional[str] = None   # cgn only: the home NAT behind the carrier
    namespaces: list = field(default_factory=list)
    hosts: list = field(default_factory=list)   # [Host]; hosts[0] is host_ns/host_addr
    v6: Optional[str] = None        # its IPv6 profile (V6_PROFILES), None: IPv4 only

    @property
    def nat(self) -> bool:
        return self.profile == CGN or PROFILES[self.profile].nat != "none"


def _pyroute2():
    """pyroute2, or KernelFeatureMissing naming the extra that brings it."""
    return _netns._pyroute2()[0]


def _write_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


class Lab:
    """``with Lab(a="nat", b="napt-random", loss=1.0) as lab: ...``

    Sites are keyword arguments (site name -> profile). Impairments apply to
    each site's access link (its gateway's WAN side), in both directions,
    and take one value for every site or a dict per site: ``loss`` (percent
    per direction), ``delay_ms`` (one-way, so a site's RTT to the internet
    core grows by twice it), ``rate_mbit`` (each direction).
    ``conntrack_timeouts`` sets nf_conntrack_tcp_timeout_<state> on every
    gateway (e.g. ``{"syn_sent": 5}``) to make mapping expiry testable.

    Topology, again one value for every site or a dict per site (docs/lab.md,
    "Topologies"): ``hosts`` (1-8 hosts on the site's LAN, named "a", "a2",
    "a3", ...), ``hairpin`` ("off", "wan", "lan": what the gateway does with
    a LAN host's packet to its own WAN address), ``mtu`` (the LAN link's MTU,
    576-9000), ``wan_mtu`` (the gateway's WAN link, with MSS clamping in the
    gateway), ``frag_needed`` ("pass", "drop": ICMP fragmentation-needed for
    the site dropped in its gateway and in the core), ``port_range`` ((low,
    high) ephemeral ports of every host of the site), ``v6`` (the site's
    IPv6 profile, one of V6_PROFILES, or None: IPv4 only; not with cgn),
    ``v4`` (False: the site's hosts have no IPv4 address or route, an
    IPv6-only site, as on mobile networks without 464XLAT; needs ``v6``).
    """

    def __init__(self, *, loss: Union[float, dict] = 0.0, delay_ms: Union[float, dict] = 0.0,
                 rate_mbit: Union[float, dict] = 0.0,
                 conntrack_timeouts: Optional[dict] = None,
                 hosts: Union[int, dict] = 1, hairpin: Union[str, dict] = "off",
                 mtu: Union[int, None, dict] = None, wan_mtu: Union[int, None, dict] = None,
                 frag_needed: Union[str, dict] = "pass",
                 port_range: Union[Sequence[int], None, dict] = None,
                 v6: Union[str, None, dict] = None, v4: Union[bool, dict] = True,
                 **sites: str) -> None:
        if not sites:
            raise LabError("a lab needs at least one site, e.g. Lab(a='nat')")
        for name, profile in sites.items():
            if not re.match(r"^[a-z][a-z0-9]{0,5}$", name):
                raise LabError(f"site names are 1-6 lowercase letters/digits: {name!r}")
            if profile not in PROFILES and profile != CGN:
                raise LabError(f"unknown profile {profile!r} for site {name}; "
                               f"choose from {', '.join(sorted(PROFILES) + [CGN])}")
        if len(sites) > 20:
            raise LabError("at most 20 sites")
        self._owner = os.getpid()
        self.tag = f"{PREFIX}{self._owner}x{next(_counter)}"
        self.profiles = dict(sites)
        def per_site(value, what, limit):
            values = value if isinstance(value, dict) else {s: value for s in sites}
            for site, v in values.items():
                if site not in sites or not 0 <= float(v) < limit:
                    raise LabError(f"{what} for {site!r} must be a site of this lab and in "
                                   f"0..{limit}: {v!r}")
            return {s: float(values.get(s, 0.0)) for s in sites}

        self.loss = per_site(loss, "loss", 100)
        self.delay_ms = per_site(delay_ms, "delay_ms", 10_000)
        self.rate_mbit = per_site(rate_mbit, "rate_mbit", 100_000)
        self.conntrack_timeouts = dict(conntrack_timeouts or {})
        self.hosts = self._per_site(hosts, "hosts", 1, self._check_hosts)
        self.hairpin = self._per_site(hairpin, "hairpin", "off", self._check_hairpin)
        self.mtu = self._per_site(mtu, "mtu", None, self._check_mtu)
        self.wan_mtu = self._per_site(wan_mtu, "wan_mtu", None, self._check_mtu)
        self.frag_needed = self._per_site(frag_needed, "frag_needed", "pass",
                                          self._check_frag_needed)
        self.port_range = self._per_site(port_range, "port_range", None, self._check_port_range)
        self.v6 = self._per_site(v6, "v6", None, self._check_v6)
        self.v4 = self._per_site(v4, "v4", True, self._check_v4)
        self.host_names = {s: [s] + [f"{s}{k}" for k in range(2, n + 1)]
                           for s, n in self.hosts.items()}
        for site, names in self.host_names.items():
            for name in names[1:]:
                if name in sites:
                    raise LabError(f"site {site}'s host {name} has the name of site {name}; "
                                   "rename one of the sites")
        self.inet_ns = f"{self.tag}-inet"
        self.ccs_addr, self.relay_addr = CCS_ADDR, RELAY_ADDR
        self.sites: dict[str, Site] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._tmp: Optional[str] = None          # config files of daemons (miniupnpd)
        self._nft = Nftables()

    # -- validation of per-site settings ------------------------------------------
    def _per_site(self, value, what: str, default, check) -> dict:
        """{site: value} from one value for every site or a dict per site."""
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.profiles))
            if unknown:
                raise LabError(f"{what} names {', '.join(map(repr, unknown))}, not a site of "
                               f"this lab (sites: {', '.join(self.profiles)})")
            values = {s: value.get(s, default) for s in self.profiles}
        else:
            values = {s: value for s in self.profiles}
        return {s: check(s, v) for s, v in values.items()}

    @staticmethod
    def _check_hosts(site: str, n) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_HOSTS:
            raise LabError(f"hosts for {site!r} must be 1..{MAX_HOSTS}: {n!r}")
        return n

    def _check_hairpin(self, site: str, mode) -> str:
        if mode not in HAIRPIN_MODES:
            raise LabError(f"unknown hairpin mode {mode!r} for site {site}; "
                           f"choose from {', '.join(HAIRPIN_MODES)}")
        profile = self.profiles[site]
        if mode != "off" and (profile == CGN or PROFILES[profile].nat == "none"):
            raise LabError(f"hairpin {mode!r} for site {site} needs a single NAT gateway; "
                           f"{profile} has " + ("two (not modelled)" if profile == CGN
                                                else "no NAT (its hosts are public)"))
        return mode

    @staticmethod
    def _check_mtu(site: str, mtu) -> Optional[int]:
        if mtu is None:
            return None
        low, high = MTU_RANGE
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not low <= mtu <= high:
            raise LabError(f"mtu for {site!r} must be {low}..{high}: {mtu!r}")
        return mtu

    @staticmethod
    def _check_frag_needed(site: str, mode) -> str:
        if mode not in FRAG_NEEDED_MODES:
            raise LabError(f"frag_needed for {site!r} must be one of "
                           f"{', '.join(FRAG_NEEDED_MODES)}: {mode!r}")
        return mode

    def _check_v6(self, site: str, v6) -> Optional[str]:
        if v6 is None:
            return None
        if v6 not in V6_PROFILES:
            raise LabError(f"unknown IPv6 profile {v6!r} for site {site}; choose from "
                           f"{', '.join(V6_PROFILES)} (or None: IPv4 only)")
        if self.profiles[site] == CGN:
            raise LabError(f"v6 for site {site}: a cgn site's IPv6 is not modelled")
        return v6

    def _v6_site(self, inet: str, gw: str, i: int, hosts: list, v6: str) -> None:
        """Site ``i``'s IPv6 (see the module docstring): addresses without
        duplicate address detection (nothing else claims them; DAD would
        hold each address tentative, unusable, for a second), routes both
        ways, forwarding on, and the profile's filter."""
        # a NAT66 site's LAN is a unique local /64, behind its gateway's own address
        net = f"fd00:{i:x}::" if v6 == NAT66 else f"2001:db8:{i:x}::"
        link = f"2001:db8:ff{i:02x}::"
        for ns, ifname, cidr in ((inet, f"s{self._site_of(i)}", f"{link}1/64"),
                                 (gw, "wan", f"{link}2/64"), (gw, "lan", f"{net}1/64")):
            self._addr(ns, ifname, cidr)
        for k, host in enumerate(hosts, start=2):
            host.addr6 = f"{net}{k:x}"
            self._addr(host.ns, "eth0", f"{host.addr6}/64")
            self._route(host.ns, "::/0", f"{net}1")
        self._route(gw, "::/0", f"{link}1")
        if v6 != NAT66:
            self._route(inet, f"{net}/64", f"{link}2")
        self._sysctls(gw, {"net/ipv6/conf/all/forwarding": "1"})
        with inside(gw):
            for table in v6_tables(v6, "wan", "lan"):
                self._nft.run(table.apply_commands())

    def _check_v4(self, site: str, v4) -> bool:
        if not isinstance(v4, bool):
            raise LabError(f"v4 for {site!r} is True or False: {v4!r}")
        if not v4 and self.v6[site] is None:
            raise LabError(f"site {site} without IPv4 needs an IPv6 profile (v6=...)")
        if not v4 and self.profiles[site] == CGN:
            raise LabError(f"v4=False for site {site}: a cgn site's IPv6 is not modelled")
        return v4

    def _site_of(self, i: int) -> str:
        return list(self.profiles)[i - 1]

    @staticmethod
    def _check_port_range(site: str, value) -> Optional[tuple]:
        if value is None:
            return None
        try:
            low, high = (int(v) for v in value)
        except (TypeError, ValueError):
            raise LabError(f"port_range for {site!r} is (low, high): {value!r}") from None
        # the kernel refuses a range below ip_unprivileged_port_start (1024)
        if not 1024 <= low <= high <= 65535:
            raise LabError(f"port_range for {site!r} must lie in 1024..65535, low <= high: "
                           f"{value!r}")
        return (low, high)

    # -- building ----------------------------------------------------------------
    def up(self) -> "Lab":
        _caps.require("building a lab (namespaces, links, nftables)",
                      _caps.CAP_SYS_ADMIN, _caps.CAP_NET_ADMIN)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self._namespaces.append(name)           # recorded first: removed even if half-made
        return create_namespace(name)

    def _addr(self, ns: str, ifname: str, cidr: str) -> None:
        pyroute2 = _pyroute2()
        iface = ipaddress.ip_interface(cidr)
        extra = {"flags": 0x02} if iface.version == 6 else {}        # IFA_F_NODAD
        with pyroute2.NetNS(ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0],
                     address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)

    def _route(self, ns: str, dst: str, gateway: str) -> None:
        pyroute2 = _pyroute2()
        with pyroute2.NetNS(ns) as ipr:
            ipr.route("add", dst=dst, gateway=gateway)

    def _sysctls(self, ns: str, values: dict) -> None:
        with inside(ns):
            for path, value in values.items():
                _write_sysctl(path, str(value))

    def _gateway(self, ns: str, profile: Profile, wan_addr: str, loss: float, *,
                 lan_net: Optional[str] = None, hairpin: str = "off", clamp_mss: bool = False,
                 frag_needed: str = "pass") -> None:
        sysctls = {"net/ipv4/ip_forward": "1", **profile.sysctls}
        tables = gateway_tables(profile, "wan", "lan", wan_addr, loss, lan_net=lan_net,
                                hairpin=hairpin, clamp_mss=clamp_mss, frag_needed=frag_needed)
        with inside(ns):
            # conntrack's per-namespace sysctls exist once its tables are in use
            for table in tables:
                self._nft.run(table.apply_commands())
            self._nft.run("add table inet lab_ct\n"
                          "add chain inet lab_ct pre { type filter hook prerouting priority -200; }\n"
                          "add rule inet lab_ct pre ct state new counter")
            for state, seconds in self.conntrack_timeouts.items():
                sysctls[f"net/netfilter/nf_conntrack_tcp_timeout_{state}"] = str(int(seconds))
            for path, value in sysctls.items():
                _write_sysctl(path, value)

    def _delay(self, ns: str, ms: float, queue: int, link: str, v6: bool = False) -> None:
        """Hold every packet crossing ``link`` of namespace ``ns`` for ``ms``.

        The lab calls it in the core, on the core's end of a site's access
        link: the packet is delayed on the wire, after its gateway has
        translated it and confirmed its conntrack entry, as on a real access
        link. Held inside the gateway instead (its POSTROUTING, before NAT),
        a conntrack entry stays unconfirmed for the whole delay, and a second
        packet of the same flow sent meanwhile makes a duplicate entry that
        the kernel drops on confirm (insert_failed): a NAT that takes 20 ms
        per new flow, which no real NAT does (measured: it made the low-TTL
        opener need a 30 ms head start, and kernel simultaneous open lose
        one of its SYNs in about half the trials)."""
        import sys

        proc = self.spawn(ns, [sys.executable, "-m", "fastpunch.lab.delay", "--queue", str(queue),
                               "--ms", str(ms)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()            # printed once the queue is bound
        if not line.startswith("delaying"):
            raise LabError(f"the delay process failed: {proc.stderr.read().strip()}")
        tools = ("iptables", "ip6tables") if v6 else ("iptables",)   # (one queue: both)
        for tool, (chain, flag) in [(t, c) for t in tools
                                    for c in (("PREROUTING", "-i"), ("POSTROUTING", "-o"))]:
            argv = [tool, "-t", "mangle", "-A", chain, flag, link, "-j", "NFQUEUE",
                    "--queue-num", str(queue)]
            try:
                result = self.run(ns, argv)
            except FileNotFoundError as exc:
                raise KernelFeatureMissing(
                    "iptables", "the NFQUEUE target for lab delay needs it: "
                    "apt-get install iptables") from exc
            if result.returncode:
                raise LabError(f"{' '.join(argv)}: {result.stderr.strip()}")

    def _miniupnpd(self, ns: str, wan_addr: str, lan_net: str) -> None:
        """Start miniupnpd on the gateway's LAN side and wait until it serves."""
        import tempfile
        import uuid

        from fastpunch.lab.profiles import UPNP_TABLE

        binary = find_miniupnpd()
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.tag}-")
        conf = os.path.join(self._tmp, f"miniupnpd-{os.path.basename(ns)}.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                "ext_ifname=wan", f"ext_ip={wan_addr}", "ext_allow_private_ipv4=yes",
                "listening_ip=lan", "port=5000", "enable_natpmp=yes", "enable_upnp=yes",
                "secure_mode=yes", "system_uptime=yes", f"uuid={uuid.uuid4()}",
                f"upnp_table_name={UPNP_TABLE}", f"upnp_nat_table_name={UPNP_TABLE}",
                "upnp_forward_chain=miniupnpd", "upnp_nat_chain=prerouting_miniupnpd",
                "upnp_nat_postrouting_chain=postrouting_miniupnpd",
                f"allow 1024-65535 {lan_net} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""]))
        proc = self.spawn(ns, [binary, "-d", "-f", conf, "-P", conf + ".pid"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = []
        for line in proc.stdout:                  # -d: logs on stderr, never detaches
            log.append(line.rstrip())
            if "Listening for NAT-PMP/PCP" in line:
                break
        else:
            raise LabError("miniupnpd did not start: " + " | ".join(log[-5:]))
        # keep draining its log so it never blocks on a full pipe
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()

    def _rate(self, ns: str, mbit: float) -> None:
        """Token bucket on both egresses of the gateway: wan (upload), lan (download)."""
        pyroute2 = _pyroute2()
        rate = int(mbit * 1_000_000 / 8)                 # bytes per second
        burst = max(64 * 1024, rate // 100)              # whole GSO segments, 10 ms at rate
        with pyroute2.NetNS(ns) as ipr:
            for ifname in ("wan", "lan"):
                ipr.tc("add", "tbf", index=ipr.link_lookup(ifname=ifname)[0], handle="1:",
                       rate=rate, burst=burst, latency="50ms")

    def _lan(self, gw: str, hosts: list, lan_gw: str, prefix: int, mtu: Optional[int],
             v4: bool = True) -> None:
        """The site's LAN between gateway namespace ``gw`` (interface "lan",
        address ``lan_gw``) and its hosts (each "eth0" with a default route
        via ``lan_gw``). One host: a veth whose gateway end is "lan", as it
        always was. Several: "lan" is a Linux bridge in the gateway and each
        host's veth ("lan1", "lan2", ... there) is a port of it, so the
        profile rules written for "lan" see every host's routed traffic, and
        traffic between the hosts is switched, never routed, as by a home
        router's built-in switch."""
        pyroute2 = _pyroute2()
        if len(hosts) == 1:
            veth_between(hosts[0].ns, "eth0", gw, "lan")
            gw_links = ["lan"]
        else:
            with pyroute2.NetNS(gw) as ipr:
                ipr.link("add", ifname="lan", kind="bridge")      # STP off: ports forward at once
            gw_links = [f"lan{k}" for k in range(1, len(hosts) + 1)]
            for host, port in zip(hosts, gw_links):
                veth_between(host.ns, "eth0", gw, port)
            with pyroute2.NetNS(gw) as ipr:
                bridge = ipr.link_lookup(ifname="lan")[0]
                for port in gw_links:
                    ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)
                ipr.link("set", index=bridge, state="up")
            gw_links.append("lan")        # the bridge last: its MTU is capped by its ports'
            # br_netfilter is built in and on by default in every namespace: it
            # would run switched frames between two hosts through the
            # gateway's IP hooks (conntrack, the forward filter). A home
            # router's switch does not.
            self._sysctls(gw, {"net/bridge/bridge-nf-call-iptables": "0"})
        if mtu is not None:
            for ns, links in [(gw, gw_links)] + [(h.ns, ["eth0"]) for h in hosts]:
                with pyroute2.NetNS(ns) as ipr:
                    for ifname in links:
                        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)
        self._addr(gw, "lan", f"{lan_gw}/{prefix}")
        for host in hosts:
            if v4:                    # (an IPv6-only site's hosts have no IPv4 at all)
                self._addr(host.ns, "eth0", f"{host.addr}/{prefix}")
                self._route(host.ns, "default", lan_gw)

    def _build(self) -> None:
        pyroute2 = _pyroute2()
        inet = self._ns("inet")
        with pyroute2.NetNS(inet) as ipr:          # (no dummy links in this kernel)
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        dual = any(v is not None for v in self.v6.values())
        for cidr in (f"{CCS_ADDR}/32", f"{RELAY_ADDR}/32") + \
                ((f"{CCS_ADDR6}/128", f"{RELAY_ADDR6}/128") if dual else ()):
            self._addr(inet, "lo", cidr)
        if dual:
            self._sysctls(inet, {"net/ipv6/conf/all/forwarding": "1"})
        # accept_local: the core forwards packets whose source is the CCS's
        # address (the spoof strategy's), as a real router that does not own
        # that address would; Linux drops them as martians otherwise.
        self._sysctls(inet, {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/accept_local": "1",
                             "net/ipv4/conf/default/accept_local": "1"})

        for i, (name, profile) in enumerate(self.profiles.items(), start=1):
            loss = self.loss[name]
            wan_addr = f"203.0.113.{10 * i}"
            nat = profile == CGN or PROFILES[profile].nat != "none"
            if nat:
                lan_gw, prefix, public_net = f"10.{i}.0.1", 24, f"{wan_addr}/32"
                addrs = [f"10.{i}.0.{1 + k}" for k in range(1, self.hosts[name] + 1)]
            else:
                base = 16 * i
                lan_gw, prefix = f"198.51.100.{base + 1}", 28
                public_net = f"198.51.100.{base}/28"
                addrs = [f"198.51.100.{base + 1 + k}" for k in range(1, self.hosts[name] + 1)]
            # host namespaces: "h" + the host's name (ha, ha2, ...), first: the
            # stale sweep and the teardown tests know a site by ha, ga (, na)
            hosts = [Host(h, self._ns(f"h{h}"), addr)
                     for h, addr in zip(self.host_names[name], addrs)]
            gw = self._ns(f"g{name}")
            site_ns = [h.ns for h in hosts[:1]] + [gw] + [h.ns for h in hosts[1:]]
            veth_between(gw, "wan", inet, f"s{name}")
            self._addr(gw, "wan", f"{wan_addr}/32")
            with pyroute2.NetNS(inet) as ipr:
                ipr.route("add", dst=f"{wan_addr}/32", oif=ipr.link_lookup(ifname=f"s{name}")[0],
                          scope=253)              # link scope: usable as a gateway
            with pyroute2.NetNS(gw) as ipr:
                wan = ipr.link_lookup(ifname="wan")[0]
                ipr.route("add", dst=f"{CCS_ADDR}/32", oif=wan, scope=253)
                ipr.route("add", dst="0.0.0.0/0", gateway=CCS_ADDR, oif=wan)
            if self.wan_mtu[name] is not None:
                for ns, ifname in ((gw, "wan"), (inet, f"s{name}")):
                    with pyroute2.NetNS(ns) as ipr:
                        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0],
                                 mtu=self.wan_mtu[name])
            edge = dict(clamp_mss=self.wan_mtu[name] is not None,
                        frag_needed=self.frag_needed[name])
            home = None
            if profile == CGN:
                # host -- home NAT (10.i/24 | 100.64.i.2) -- carrier NAT (100.64.i.1 | wan)
                home = self._ns(f"n{name}")
                site_ns.append(home)
                veth_between(home, "wan", gw, "lan")
                self._addr(gw, "lan", f"100.64.{i}.1/24")
                self._addr(home, "wan", f"100.64.{i}.2/24")
                self._route(home, "default", f"100.64.{i}.1")
                self._lan(home, hosts, lan_gw, prefix, self.mtu[name])
                self._gateway(gw, PROFILES["nat"], wan_addr, loss, **edge)
                self._gateway(home, PROFILES["nat"], f"100.64.{i}.2", 0.0,
                              frag_needed=self.frag_needed[name])
            else:
                p = PROFILES[profile]
                if p.nat == "none":
                    self._route(inet, public_net, wan_addr)
                self._lan(gw, hosts, lan_gw, prefix, self.mtu[name], v4=self.v4[name])
                self._gateway(gw, p, wan_addr, loss, lan_net=f"10.{i}.0.0/24" if nat else None,
                              hairpin=self.hairpin[name], **edge)
                if p.upnp:
                    self._miniupnpd(gw, wan_addr, f"10.{i}.0.0/24")
            public = wan_addr if nat else hosts[0].addr
            if self.v6[name] is not None:
                self._v6_site(inet, gw, i, hosts, self.v6[name])
            if self.port_range[name] is not None:
                low, high = self.port_range[name]
                for host in hosts:        # a per-namespace sysctl
                    self._sysctls(host.ns, {"net/ipv4/ip_local_port_range": f"{low} {high}"})
            with inside(inet):
                for table in core_tables(name, f"s{name}", public_net, self.frag_needed[name]):
                    self._nft.run(table.apply_commands())
            if self.delay_ms[name]:
                self._delay(inet, self.delay_ms[name], queue=i, link=f"s{name}",
                            v6=self.v6[name] is not None)
            if self.rate_mbit[name]:
                self._rate(gw, self.rate_mbit[name])
            self.sites[name] = Site(name, profile, i, hosts[0].ns, gw, hosts[0].addr, public,
                                    lan_gw, home, site_ns, hosts, self.v6[name])
        # the public /28s of no-NAT sites are routed by the core (default routes)

    # -- teardown ---------------------------------------------------------------
    def down(self) -> None:
        if os.getpid() != self._owner:
            return      # a forked copy (pyroute2 helpers fork) never tears down
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        pyroute2 = _pyroute2()
        for ns in reversed(self._namespaces):   # links die with their namespaces
            with contextlib.suppress(OSError, FileNotFoundError):
                pyroute2.netns.remove(ns)
        self._namespaces.clear()
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # -- using it -----------------------------------------------------------------
    def _hosts(self) -> dict:
        return {h.name: h for site in self.sites.values() for h in site.hosts}

    def host(self, name: str) -> Host:
        """A host by name: "a" (site a's first host), "a2", "a3", ..."""
        hosts = self._hosts()
        if name not in hosts:
            raise LabError(f"no host {name!r} in this lab (hosts: {', '.join(hosts)})")
        return hosts[name]

    def ns(self, where: str) -> str:
        """Namespace of a host ("a" for site a's first host, "a2", ... for the
        others), a gateway ("gw-a", "home-a" for cgn), the core ("inet"), or a
        raw namespace name."""
        if where in ("inet", "internet", "ccs"):
            return self.inet_ns
        if where in self.sites:
            return self.sites[where].host_ns
        hosts = self._hosts()
        if where in hosts:
            return hosts[where].ns
        m = re.match(r"^(gw|home)-(\w+)$", where)
        if m and m.group(2) in self.sites:
            site = self.sites[m.group(2)]
            ns = site.gateway_ns if m.group(1) == "gw" else site.home_ns
            if ns:
                return ns
        if where in self._namespaces:
            return where
        raise LabError(f"no such place in this lab: {where!r} (sites: {', '.join(self.sites)}, "
                       f"hosts: {', '.join(hosts)}, gw-SITE, home-SITE for cgn, inet)")

    def inside(self, where: str):
        """Context manager: this thread works in that namespace."""
        return inside(self.ns(where))

    def _preexec(self, where: str):
        return setns_preexec(self.ns(where))

    def run(self, where: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside a namespace and wait for it."""
        fd, enter = self._preexec(where)
        try:
            kwargs.setdefault("capture_output", True)
            kwargs.setdefault("text", True)
            kwargs.setdefault("timeout", 120)
            return subprocess.run(list(argv), preexec_fn=enter, **kwargs)
        finally:
            os.close(fd)

    def spawn(self, where: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a command inside a namespace; it is killed at teardown."""
        fd, enter = self._preexec(where)
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=enter, **kwargs)
        finally:
            os.close(fd)
        self._procs.append(proc)
        return proc

    def conntrack(self, where: str) -> list[dict]:
        """Live conntrack entries of a gateway: original and reply tuples, the
        TCP state and the seconds left."""
        return conntrack_entries(self.ns(where))

    def conntrack_flush(self, where: str) -> None:
        """Forget every conntrack entry of a gateway, as its reboot does:
        the flows it translated lose their mappings mid-stream."""
        pyroute2 = _pyroute2()
        with inside(self.ns(where)), pyroute2.Conntrack() as ct:
            ct.flush()

    def describe(self) -> dict:
        return {
            "tag": self.tag, "ccs": self.ccs_addr, "relay": self.relay_addr,
            "namespaces": self.namespaces,
            "sites": {n: {"profile": s.profile, "host": s.host_addr, "public": s.public_addr,
                          "host_ns": s.host_ns, "gateway_ns": s.gateway_ns,
                          "home_ns": s.home_ns, "gateway_lan": s.gateway_lan,
                          "hosts": [{"name": h.name, "ns": h.ns, "addr": h.addr}
                                    for h in s.hosts],
                          "loss": self.loss[n],
                          "delay_ms": self.delay_ms[n], "rate_mbit": self.rate_mbit[n],
                          "hairpin": self.hairpin[n], "mtu": self.mtu[n],
                          "wan_mtu": self.wan_mtu[n], "frag_needed": self.frag_needed[n],
                          "port_range": self.port_range[n]}
                      for n, s in self.sites.items()},
        }


# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
_TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
               "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")


def _tcp_state(entry) -> Optional[str]:
    state = getattr(getattr(entry, "protoinfo", None), "state", None)
    if state is None:
        return None
    if isinstance(state, int) and 0 <= state < len(_TCP_STATES):
        return _TCP_STATES[state]
    return str(getattr(state, "name", state))


MINIUPNPD_MIN = (2, 3, 9)
_MINIUPNPD_CANDIDATES = ("/usr/local/sbin/miniupnpd-fastpunch", "/usr/sbin/miniupnpd")


def find_miniupnpd() -> str:
    """A miniupnpd that accepts the lab's RFC 5737 WAN addresses (>= 2.3.9,
    ``ext_allow_private_ipv4``); FASTPUNCH_MINIUPNPD overrides the search."""
    import shutil

    candidates = [os.environ.get("FASTPUNCH_MINIUPNPD", "")] + list(_MINIUPNPD_CANDIDATES)
    candidates.append(shutil.which("miniupnpd") or "")
    seen = []
    for path in filter(None, candidates):
        if not os.access(path, os.X_OK):
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        m = re.search(r"miniupnpd (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
        if m and tuple(map(int, m.groups())) >= MINIUPNPD_MIN:
            return path
        seen.append(f"{path} ({m.group(0) if m else 'unknown version'})")
    raise KernelFeatureMissing(
        "miniupnpd >= 2.3.9",
        "the upnp gateway needs ext_allow_private_ipv4 for its RFC 5737 WAN address; "
        "Debian 12's miniupnpd 2.3.1 refuses it. Run scripts/build-miniupnpd (builds "
        "Debian 13's source package) or install miniupnpd-nftables from Debian 13+"
        + (f"; found only {', '.join(seen)}" if seen else ""))


def conntrack_entries(ns: str) -> list[dict]:
    pyroute2 = _pyroute2()
    entries = []
    with inside(ns), pyroute2.Conntrack() as ct:
        for e in ct.dump_entries():
            orig, reply = e.tuple_orig, e.tuple_reply
            entries.append({
                "proto": {6: "tcp", 17: "udp", 1: "icmp"}.get(orig.proto, orig.proto),
                "state": _tcp_state(e),
                "orig": (orig.saddr, orig.sport, orig.daddr, orig.dport),
                "reply": (reply.saddr, reply.sport, reply.daddr, reply.dport),
                "timeout": getattr(e, "timeout", None),
            })
    return entries


def setns_preexec(ns: str):
    """(fd, fn): fn moves a forked child into ``ns`` before exec; close fd after."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            os._exit(126)
    return fd, enter


def lab_namespaces() -> Iterator[tuple[str, int]]:
    for name in _netns.listed():
        m = _NS_RE.match(name)
        if m:
            yield name, int(m.group(1))


def sweep_stale(all_labs: bool = False) -> list[str]:
    """Remove the namespaces of labs whose creating process is gone (or every
    lab's with ``all_labs``). Returns the names removed."""
    removed = []
    for name, pid in lab_namespaces():
        if all_labs or not pid_alive(pid):
            with contextlib.suppress(OSError):
                _netns.remove(name)
                removed.append(name)
    return removed
