"""The networks real devices live on, each proven with real traffic (kernel
sockets, the engine's raw sockets): an endpoint-independent port-translating
NAT, several hosts behind one gateway, hairpinning, small MTUs and lost ICMP
fragmentation-needed, narrow ephemeral port ranges. docs/lab.md, "Topologies"."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time

import pytest

from fastpunch.lab.profiles import EI_OFFSET, ei_port

pytestmark = pytest.mark.lab

CCS_PORT = 7000
RELAY_PORT = 7001


class Server:
    """A kernel TCP listener in a namespace that keeps every connection it
    accepts open (so the client's mapping lives) and records who connected."""

    def __init__(self, lab, where: str, addr: str, port: int, on_accept=None) -> None:
        with lab.inside(where):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.peers: list = []
        self.conns: list = []
        self._on_accept = on_accept
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.peers.append(peer)
            self.conns.append(conn)
            if self._on_accept:
                threading.Thread(target=self._on_accept, args=(conn,), daemon=True).start()

    def wait(self, count: int, limit: float = 3.0) -> list:
        deadline = time.monotonic() + limit
        while len(self.peers) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.peers)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sock(lab, where: str, kind=socket.SOCK_STREAM, port: int = 0) -> socket.socket:
    """A socket in ``where`` with SO_REUSEADDR and SO_REUSEPORT, bound to
    ``port`` when given: one port may carry an outbound connection and a
    listener at once, as a punching peer's does."""
    with lab.inside(where):
        s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if port:
        s.bind(("0.0.0.0", port))
    return s


def connect_from(lab, where: str, port: int, dst: tuple, timeout: float = 2.0) -> socket.socket:
    s = sock(lab, where, port=port)
    s.settimeout(timeout)
    s.connect(dst)
    return s


def try_connect(lab, where: str, port: int, dst: tuple, timeout: float = 1.5) -> str:
    """'ok', 'refused' (a RST came back) or 'timeout'."""
    try:
        connect_from(lab, where, port, dst, timeout).close()
        return "ok"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "timeout"


def nft_counters(lab, where: str, family: str, table: str) -> int:
    """Packets counted by every counter of one table in a namespace."""
    out = lab.run(where, ["nft", "-j", "list", "table", family, table])
    assert out.returncode == 0, out.stderr
    packets = 0
    for item in json.loads(out.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                packets += expr["counter"]["packets"]
    return packets


# -- napt-ei ---------------------------------------------------------------------------
def test_napt_ei_maps_one_internal_port_to_one_other_external_port(lab_factory):
    """RFC 4787 REQ-1: from one local port, connections to two destinations
    (different address and port) leave from the same external port, which is
    not the local port; other local ports get other external ports."""
    lab = lab_factory(a="napt-ei")
    public = lab.sites["a"].public_addr
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs, \
            Server(lab, "inet", lab.relay_addr, RELAY_PORT) as relay:
        held = []
        for sport in (40001, 40002, 65000):
            held.append(connect_from(lab, "a", sport, (lab.ccs_addr, CCS_PORT)))
            held.append(connect_from(lab, "a", sport, (lab.relay_addr, RELAY_PORT)))
        seen_ccs, seen_relay = ccs.wait(3), relay.wait(3)
        for s in held:
            s.close()
    assert seen_ccs == seen_relay                       # endpoint-independent
    assert {addr for addr, _ in seen_ccs} == {public}
    ports = [port for _, port in seen_ccs]
    assert ports == [40001 + EI_OFFSET, 40002 + EI_OFFSET, ei_port(65000)]
    assert ei_port(65000) == 1024 + (65000 + EI_OFFSET - 65536)    # wraps inside 1024-65535


def test_napt_ei_filters_and_leaks_like_the_other_nats(lab_factory):
    """The profile table's cells: unsolicited inbound SYNs are dropped
    silently, and a first outbound SYN-ACK leaves untranslated (netfilter-facts
    item 2: conntrack finds it INVALID and skips NAT)."""
    from fastpunch import netfilter
    from fastpunch.packet import Flags, RawReceiver, RawSender, build, parse

    lab = lab_factory(a="napt-ei")
    site = lab.sites["a"]
    listener = sock(lab, "a", port=ei_port(8000))
    listener.listen(4)
    with listener:
        assert try_connect(lab, "inet", 0, (site.public_addr, ei_port(8000))) == "timeout"
    with lab.inside("inet"):
        rx = RawReceiver(dport=9100)
        guard = netfilter.suppress_rsts([netfilter.RstSuppression(9100)])
    with lab.inside("inet"), guard, rx:
        with lab.inside("a"), RawSender() as tx:
            for _ in range(3):
                tx.send(build(site.host_addr, lab.ccs_addr, 46000, 9100, seq=1000, ack=5000,
                              flags=Flags.SYN | Flags.ACK))
        time.sleep(0.5)
        seen = [parse(d) for d in rx.recv_many()]
    assert seen and {(s.src, s.sport) for s in seen} == {(site.host_addr, 46000)}


def test_napt_ei_port_map_loads_in_one_transaction(lab_factory):
    """The 64,512-element port map is applied in one libnftables transaction
    per gateway: time a fresh apply of the whole NAT table. One transaction
    takes about half a second on this 2-core VM (0.45-0.54 s); an element a
    command would take a minute, so the bound is set far from both: a
    tighter one measured the VM's speed of the day (docs/benchmarks.md for
    figures), not how the map is loaded."""
    from fastpunch.lab.profiles import PROFILES, gateway_tables
    from fastpunch.netfilter import Nftables

    lab = lab_factory(a="napt-ei")
    (table,) = [t for t in gateway_tables(PROFILES["napt-ei"], "wan", "lan",
                                          lab.sites["a"].public_addr) if t.name == "lab_nat"]
    nft = Nftables()
    timings = []
    with lab.inside("gw-a"):
        for _ in range(3):
            t0 = time.perf_counter()
            nft.run(table.apply_commands())
            timings.append(time.perf_counter() - t0)
    print(f"napt-ei NAT table apply: {', '.join(f'{t * 1000:.0f} ms' for t in timings)}")
    assert min(timings) < 5.0
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:      # and it still maps
        connect_from(lab, "a", 41000, (lab.ccs_addr, CCS_PORT)).close()
        assert ccs.wait(1) == [(lab.sites["a"].public_addr, 41000 + EI_OFFSET)]


def test_napt_ei_two_hosts_one_internal_port_one_destination_collide(lab_factory):
    """The map gives a one-port range, for which the kernel skips its
    uniqueness search: the second host's flow gets the first one's tuple and
    conntrack drops it on confirm. (A real EI NAT would pick another port.)"""
    lab = lab_factory(a="napt-ei", hosts={"a": 2})
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        first = connect_from(lab, "a", 40001, (lab.ccs_addr, CCS_PORT))
        with first:
            assert try_connect(lab, "a2", 40001, (lab.ccs_addr, CCS_PORT)) == "timeout"
            # towards another destination the same external port is fine
            # (nobody listens there: the core's RST proves the SYN got through)
            assert try_connect(lab, "a2", 40001, (lab.relay_addr, CCS_PORT)) == "refused"
        assert ccs.wait(1) == [(lab.sites["a"].public_addr, ei_port(40001))]


# -- several hosts on one LAN ---------------------------------------------------------
def test_three_hosts_share_one_gateway_and_switch_between_themselves(lab_factory):
    lab = lab_factory(a="nat", b="nat", hosts={"a": 3})
    site = lab.sites["a"]
    assert [(h.name, h.addr) for h in site.hosts] == [
        ("a", "10.1.0.2"), ("a2", "10.1.0.3"), ("a3", "10.1.0.4")]
    assert site.host_ns == site.hosts[0].ns == lab.ns("a") and site.host_addr == "10.1.0.2"
    assert [lab.ns(h) for h in ("a2", "a3")] == [h.ns for h in site.hosts[1:]]
    assert set(lab.namespaces) >= {h.ns for h in site.hosts}
    assert lab.sites["b"].hosts[0].name == "b" and len(lab.sites["b"].hosts) == 1
    described = lab.describe()["sites"]["a"]["hosts"]
    assert [h["name"] for h in described] == ["a", "a2", "a3"]
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        for i, host in enumerate(("a", "a2", "a3")):
            connect_from(lab, host, 42000 + i, (lab.ccs_addr, CCS_PORT)).close()
        assert sorted(ccs.wait(3)) == [(site.public_addr, 42000 + i) for i in range(3)]
    # host to host on the LAN: switched by the bridge, no NAT in between
    with Server(lab, "a3", "10.1.0.4", 7100) as local:
        connect_from(lab, "a", 42100, ("10.1.0.4", 7100)).close()
        connect_from(lab, "a2", 42101, ("10.1.0.4", 7100)).close()
        assert sorted(local.wait(2)) == [("10.1.0.2", 42100), ("10.1.0.3", 42101)]
    # and the far site reaches none of them unsolicited (the stateful filter)
    assert try_connect(lab, "b", 0, (site.public_addr, 42000)) == "timeout"


def test_hosts_of_a_public_site_take_the_next_addresses_of_its_prefix(lab_factory):
    lab = lab_factory(a="open", hosts={"a": 2})
    site = lab.sites["a"]
    assert [h.addr for h in site.hosts] == ["198.51.100.18", "198.51.100.19"]
    with Server(lab, "a2", "198.51.100.19", 7200) as server:
        assert try_connect(lab, "inet", 43000, ("198.51.100.19", 7200)) == "ok"
        assert server.wait(1) == [(lab.ccs_addr, 43000)]     # routed, not translated


@pytest.mark.parametrize("kwargs, message", [
    (dict(a="nat", hosts={"z": 2}), "'z', not a site of this lab"),
    (dict(a="nat", hosts={"a": 9}), r"hosts for 'a' must be 1..8"),
    (dict(a="nat", hosts={"a": 2}, a2="nat"), "has the name of site a2"),
])
def test_bad_host_specs_are_refused(kwargs, message):
    from fastpunch.lab import Lab, LabError

    with pytest.raises(LabError, match=message):
        Lab(**kwargs)


# -- hairpin ---------------------------------------------------------------------------
def open_mapping_with_listener(lab, host: str, port: int, ccs) -> tuple:
    """``host`` connects out from ``port`` (its mapping) and listens on the same
    port; returns (outbound socket, listener, the external port the core saw)."""
    out = connect_from(lab, host, port, (lab.ccs_addr, CCS_PORT))
    listener = sock(lab, host, port=port)
    listener.listen(4)
    listener.settimeout(2.0)
    external = ccs.wait(len(ccs.peers) + 1)[-1][1]
    return out, listener, external


def test_hairpin_off_the_gateway_itself_answers_with_rst(lab_factory):
    lab = lab_factory(a="nat", hosts={"a": 2})
    public = lab.sites["a"].public_addr
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        out, listener, e2 = open_mapping_with_listener(lab, "a2", 45002, ccs)
        with out, listener, raw_syns(lab, "a", src=public, sport=e2) as rx:
            assert try_connect(lab, "a", 45001, (public, e2)) == "refused"
            rsts = collect(rx, lambda seg: "R" in seg.flags_str)
            listener.settimeout(0.5)
            with pytest.raises(socket.timeout):
                listener.accept()                      # nothing reached a2
    # TTL 64, not decremented by a forwarding hop: the gateway's own stack
    assert rsts and rsts[0].ttl == 64


@pytest.mark.parametrize("profile", ["nat", "napt-ei", "napt-random"])
def test_hairpin_wan_reaches_the_mapping_owner_from_the_senders_own_mapping(lab_factory,
                                                                              profile):
    """RFC 4787 REQ-9: a's connection to WAN_ADDR:<a2's external port> arrives
    at a2 from WAN_ADDR:<a's own external port>, as from a remote peer."""
    lab = lab_factory(a=profile, hosts={"a": 2}, hairpin={"a": "wan"})
    public = lab.sites["a"].public_addr
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        out2, listener, e2 = open_mapping_with_listener(lab, "a2", 45002, ccs)
        out1 = connect_from(lab, "a", 45001, (lab.ccs_addr, CCS_PORT))     # a's mapping
        e1 = ccs.wait(2)[-1][1]
        with out1, out2, listener:
            hairpin = connect_from(lab, "a", 45001, (public, e2))
            conn, peer = listener.accept()
            with hairpin, conn:
                hairpin.sendall(b"through the gateway")
                assert conn.recv(64) == b"through the gateway"
    assert peer == (public, e1)
    if profile == "nat":
        assert e1 == 45001 and e2 == 45002
    elif profile == "napt-ei":
        assert (e1, e2) == (ei_port(45001), ei_port(45002))
    else:
        assert e1 != 45001


def test_hairpin_wan_without_a_mapping_reaches_the_gateway(lab_factory):
    lab = lab_factory(a="nat", hosts={"a": 2}, hairpin={"a": "wan"})
    assert try_connect(lab, "a", 45001, (lab.sites["a"].public_addr, 45999)) == "refused"


def test_hairpin_wan_carries_udp_with_the_senders_mapping(lab_factory):
    lab = lab_factory(a="napt-ei", hosts={"a": 2}, hairpin={"a": "wan"})
    public = lab.sites["a"].public_addr
    with lab.inside("inet"):
        core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core.bind((lab.ccs_addr, 7300))
    core.settimeout(2.0)
    s1 = sock(lab, "a", socket.SOCK_DGRAM, port=46001)
    s2 = sock(lab, "a2", socket.SOCK_DGRAM, port=46002)
    s2.settimeout(2.0)
    with core, s1, s2:
        s2.sendto(b"map a2", (lab.ccs_addr, 7300))
        _, (_, e2) = core.recvfrom(64)
        s1.sendto(b"map a", (lab.ccs_addr, 7300))
        _, (_, e1) = core.recvfrom(64)
        s1.sendto(b"hairpin", (public, e2))
        data, peer = s2.recvfrom(64)
    assert (data, peer) == (b"hairpin", (public, e1))
    assert (e1, e2) == (ei_port(46001), ei_port(46002))


def test_hairpin_lan_reflects_from_the_gateways_lan_address(lab_factory):
    """OpenWrt-style reflection: the hairpinned flow arrives from 10.i.0.1."""
    lab = lab_factory(a="napt-ei", hosts={"a": 2}, hairpin={"a": "lan"})
    site = lab.sites["a"]
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        out2, listener, e2 = open_mapping_with_listener(lab, "a2", 45002, ccs)
        with out2, listener:
            hairpin = connect_from(lab, "a", 45001, (site.public_addr, e2))
            conn, peer = listener.accept()
            hairpin.close()
            conn.close()
    assert peer[0] == site.gateway_lan == "10.1.0.1"
    assert peer[1] == 45001          # masquerade keeps the port where it can


def test_hairpin_needs_a_single_nat(lab_factory):
    from fastpunch.lab import Lab, LabError

    for profile in ("open", "cgn"):
        with pytest.raises(LabError, match="needs a single NAT gateway"):
            Lab(a=profile, hosts={"a": 2}, hairpin={"a": "wan"})
    with pytest.raises(LabError, match="unknown hairpin mode 'loop'"):
        Lab(a="nat", hairpin={"a": "loop"})
    Lab(a="nat", hairpin="wan")              # one host: allowed, if pointless


# -- MTU and ICMP fragmentation-needed ------------------------------------------------
def raw_syns(lab, where: str, **match):
    from fastpunch.packet import RawReceiver

    with lab.inside(where):
        return RawReceiver(**match)


def collect(rx, want, limit: float = 2.0) -> list:
    from fastpunch.packet import parse

    seen, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        seen += [parse(d) for d in rx.recv_many()]
        if any(want(s) for s in seen):
            break
        time.sleep(0.02)
    return [s for s in seen if want(s)]


def test_small_lan_mtu_gives_a_small_mss_and_carries_4_mib(lab_factory):
    lab = lab_factory(a="nat", mtu={"a": 1280})
    for where, ifname in (("a", "eth0"), ("gw-a", "lan")):
        assert "mtu 1280" in lab.run(where, ["ip", "link", "show", ifname]).stdout
    payload = os.urandom(4 * 1024 * 1024)
    server_mss = []

    def send_all(conn):
        server_mss.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
        with contextlib.suppress(OSError):
            conn.sendall(payload)
        conn.close()

    with raw_syns(lab, "inet", dport=7400) as rx, \
            Server(lab, "inet", lab.ccs_addr, 7400, on_accept=send_all):
        s = connect_from(lab, "a", 0, (lab.ccs_addr, 7400), timeout=30)
        with s:
            client_mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            received = bytearray()
            deadline = time.monotonic() + 30
            while len(received) < len(payload) and time.monotonic() < deadline:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        syns = collect(rx, lambda seg: seg.flags_str == "S")
    print(f"mtu 1280: SYN MSS {syns[0].options.mss}, TCP_MAXSEG client {client_mss} "
          f"server {server_mss}")
    assert syns and syns[0].options.mss == 1240
    assert client_mss <= 1240 and server_mss and server_mss[0] <= 1240
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2


def frag_needed_seen(icmp: socket.socket, limit: float) -> list:
    """(source, next-hop MTU) of every ICMP fragmentation-needed on a raw socket."""
    seen, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        icmp.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, (src, _) = icmp.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 0x0F) * 4
        icmp_type, code = data[ihl], data[ihl + 1]
        if (icmp_type, code) == (3, 4):
            seen.append((src, struct.unpack("!H", data[ihl + 6:ihl + 8])[0]))
    return seen


@pytest.mark.parametrize("mode", ["pass", "drop"])
def test_frag_needed_from_the_gateway_for_a_df_datagram_too_big_for_the_lan(lab_factory, mode):
    """A 1400-byte DF datagram from the core to host a does not fit a's
    1280-byte LAN: the gateway says so (pass) or nothing comes back (drop)."""
    lab = lab_factory(a="nat", mtu={"a": 1280}, frag_needed={"a": mode})
    public = lab.sites["a"].public_addr
    with lab.inside("inet"):
        core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    host = sock(lab, "a", socket.SOCK_DGRAM, port=46000)
    host.settimeout(1.0)
    with core, icmp, host:
        core.bind((lab.ccs_addr, 7500))
        core.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        host.sendto(b"open the mapping", (lab.ccs_addr, 7500))
        _, mapped = core.recvfrom(64)
        for _ in range(3):
            with contextlib.suppress(OSError):       # EMSGSIZE once the path MTU is known
                core.sendto(b"x" * (1400 - 28), mapped)
            time.sleep(0.1)
        seen = frag_needed_seen(icmp, 1.0)
        with pytest.raises(socket.timeout):
            host.recvfrom(2048)                      # too big for the LAN either way
    counted = nft_counters(lab, "gw-a", "inet", "lab_pmtu") if mode == "drop" else 0
    print(f"frag_needed={mode}: ICMP seen {seen}, dropped in gw-a {counted}")
    if mode == "pass":
        assert seen and seen[0] == (public, 1280)
    else:
        assert seen == [] and counted >= 1


@pytest.mark.parametrize("mode", ["pass", "drop"])
def test_frag_needed_from_the_core_for_a_site_behind_a_small_wan_link(lab_factory, mode):
    """The core itself cannot fit a 1450-byte DF datagram for host a into a's
    1400-byte access link: the ICMP it sends to host b is dropped too (it is
    about a packet for site a)."""
    lab = lab_factory(a="open", b="open", wan_mtu={"a": 1400}, frag_needed={"a": mode})
    a_addr = lab.sites["a"].host_addr
    with lab.inside("b"):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sender, icmp:
        sender.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        for _ in range(3):
            with contextlib.suppress(OSError):
                sender.sendto(b"x" * (1450 - 28), (a_addr, 9))
            time.sleep(0.1)
        seen = frag_needed_seen(icmp, 1.0)
    if mode == "pass":
        assert seen and seen[0][1] == 1400
    else:
        assert seen == [] and nft_counters(lab, "inet", "inet", "lab_pmtu_a") >= 1


def test_wan_mtu_clamps_the_mss_of_syns_both_ways(lab_factory):
    """As PPPoE routers do: a's SYN reaches the core with MSS 1400 - 40, and the
    core's SYN-ACK reaches a with it too (nft's rt mtu takes the smaller of the
    route out and the route back to the sender)."""
    lab = lab_factory(a="nat", wan_mtu={"a": 1400})
    assert "mtu 1400" in lab.run("gw-a", ["ip", "link", "show", "wan"]).stdout
    payload = os.urandom(1024 * 1024)
    got = []

    def read_all(conn):
        conn.settimeout(30)
        data = bytearray()
        with contextlib.suppress(OSError):
            while chunk := conn.recv(1 << 16):
                data += chunk
        got.append(bytes(data))

    with raw_syns(lab, "inet", dport=7600) as core_rx, raw_syns(lab, "a", sport=7600) as host_rx, \
            Server(lab, "inet", lab.ccs_addr, 7600, on_accept=read_all) as server:
        s = connect_from(lab, "a", 0, (lab.ccs_addr, 7600), timeout=30)
        with s:
            s.sendall(payload)
        syn = collect(core_rx, lambda seg: seg.flags_str == "S")
        synack = collect(host_rx, lambda seg: seg.flags_str == "SA")
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        server.close()
    print(f"wan_mtu 1400: SYN MSS at the core {syn[0].options.mss}, "
          f"SYN-ACK MSS at the host {synack[0].options.mss}")
    assert syn[0].options.mss == 1360 and synack[0].options.mss == 1360
    assert got and got[0] == payload


@pytest.mark.parametrize("kwargs, message", [
    (dict(a="nat", mtu={"a": 500}), r"mtu for 'a' must be 576..9000"),
    (dict(a="nat", wan_mtu={"b": 1400}), "'b', not a site of this lab"),
    (dict(a="nat", frag_needed={"a": "eat"}), "frag_needed for 'a' must be one of pass, drop"),
    (dict(a="nat", port_range={"a": (500, 600)}), "port_range for 'a' must lie in 1024..65535"),
    (dict(a="nat", port_range={"a": (40010, 40000)}), "low <= high"),
])
def test_bad_link_specs_are_refused(kwargs, message):
    from fastpunch.lab import Lab, LabError

    with pytest.raises(LabError, match=message):
        Lab(**kwargs)


# -- ephemeral port ranges and collisions ---------------------------------------------
def test_two_hosts_one_port_one_destination_collide_in_a_port_preserving_nat(lab_factory):
    lab = lab_factory(a="nat", hosts={"a": 2}, port_range={"a": (40000, 40007)})
    public = lab.sites["a"].public_addr
    for host in ("a", "a2"):
        value = lab.run(host, ["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).stdout.split()
        assert value == ["40000", "40007"]
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs, \
            Server(lab, "inet", lab.relay_addr, RELAY_PORT) as relay:
        # same local port, same destination, both open at once: the NAT must
        # translate one of them
        same = [connect_from(lab, h, 40003, (lab.ccs_addr, CCS_PORT)) for h in ("a", "a2")]
        seen_same = ccs.wait(2)
        # same local port, different destinations: both keep it
        other = [connect_from(lab, "a", 40005, (lab.ccs_addr, CCS_PORT)),
                 connect_from(lab, "a2", 40005, (lab.relay_addr, RELAY_PORT))]
        seen_ccs, seen_relay = ccs.wait(3)[2:], relay.wait(1)
        for s in same + other:
            s.close()
    assert {addr for addr, _ in seen_same} == {public}
    ports = [port for _, port in seen_same]
    assert ports[0] == 40003 and ports[1] != 40003          # the collision, translated
    assert seen_ccs == [(public, 40005)] and seen_relay == [(public, 40005)]


def test_identical_narrow_port_ranges_collide_on_their_own(lab_factory):
    """Each host has 8 ephemeral ports and opens 8 connections to one listener:
    both hosts use the same 8 ports, and the NAT translates every second one."""
    low, high = 40000, 40007
    lab = lab_factory(a="nat", hosts={"a": 2}, port_range={"a": (low, high)})
    with Server(lab, "inet", lab.ccs_addr, CCS_PORT) as ccs:
        held = []
        for _ in range(8):
            for host in ("a", "a2"):
                with lab.inside(host):
                    s = socket.socket()
                s.settimeout(2)
                s.connect((lab.ccs_addr, CCS_PORT))
                held.append((host, s.getsockname()[1], s))
        seen = ccs.wait(16)
        for _, _, s in held:
            s.close()
    local = {host: sorted(port for h, port, _ in held if h == host) for host in ("a", "a2")}
    assert local["a"] == local["a2"] == list(range(low, high + 1))
    assert len(set(seen)) == 16 and {addr for addr, _ in seen} == {lab.sites["a"].public_addr}
    # each local port number is used by both hosts: at most one flow keeps it
    flows = [e for e in lab.conntrack("gw-a") if e["orig"][2:] == (lab.ccs_addr, CCS_PORT)]
    translated = [e for e in flows if e["reply"][3] != e["orig"][1]]
    print(f"port_range {low}-{high}: {len(translated)} of {len(flows)} flows translated")
    assert len(flows) == 16 and len(translated) >= 8


# -- the CLI ----------------------------------------------------------------------------
def test_cli_up_with_hosts_hairpin_mtu_and_port_range(cli):
    state = json.loads(cli("lab", "up", "--a", "nat", "--b", "napt-ei", "--hosts", "a=2",
                           "--hairpin", "a=wan", "--mtu", "a=1400", "--wan-mtu", "b=1450",
                           "--frag-needed", "drop", "--port-range", "a=40000-40063",
                           "--json").stdout)
    a, b = state["sites"]["a"], state["sites"]["b"]
    assert [h["name"] for h in a["hosts"]] == ["a", "a2"] and a["hosts"][1]["addr"] == "10.1.0.3"
    assert (a["hairpin"], a["mtu"], a["port_range"]) == ("wan", 1400, [40000, 40063])
    assert (b["wan_mtu"], a["frag_needed"], b["frag_needed"]) == (1450, "drop", "drop")
    out = cli("lab", "exec", "a2", "--", "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout
    assert out.split() == ["40000", "40063"]
    assert "mtu 1400" in cli("lab", "exec", "a2", "--", "ip", "link", "show", "eth0").stdout
    text = cli("lab", "status").stdout
    assert "hosts: a 10.1.0.2, a2 10.1.0.3" in text and "hairpin wan" in text
    proc = cli("lab", "up", "--a", "nat", "--hosts", "a=9", check=False)
    assert proc.returncode == 1 and "hosts for 'a' must be 1..8" in proc.stderr
    assert "Traceback" not in proc.stderr
    cli("lab", "down")
