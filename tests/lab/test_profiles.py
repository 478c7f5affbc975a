"""Each gateway profile proven by real traffic, not by reading its rules back."""

from __future__ import annotations

import socket
import time

import pytest

from fastpunch.lab import PROFILE_NAMES
from fastpunch.lab.profiles import SEQUENTIAL_BASE, ei_port
from tests.lab.probes import TcpServer, connect, simultaneous_open

pytestmark = pytest.mark.lab

SPORTS = [40001, 40002, 40003, 40004, 40005]


def mapped_ports(lab, site="a"):
    with TcpServer(lab, "inet", lab.ccs_addr, 7000) as server:
        for sport in SPORTS:
            assert connect(lab, site, lab.ccs_addr, 7000, sport=sport) == "ok"
        deadline = time.monotonic() + 3
        while len(server.peers) < len(SPORTS) and time.monotonic() < deadline:
            time.sleep(0.02)
    return server.peers


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_mapping(lab_factory, profile):
    lab = lab_factory(a=profile)
    site = lab.sites["a"]
    peers = mapped_ports(lab)
    addrs = {addr for addr, _ in peers}
    ports = [port for _, port in peers]
    assert addrs == {site.public_addr}
    if profile in ("open", "firewall", "firewall-liberal"):
        assert site.public_addr == site.host_addr and ports == SPORTS   # no translation
    elif profile in ("nat", "nat-rst", "strict", "cgn", "upnp"):
        assert site.public_addr != site.host_addr and ports == SPORTS   # port preserved
    elif profile == "napt-ei":
        assert ports == [ei_port(p) for p in SPORTS] and not set(ports) & set(SPORTS)
    elif profile == "napt-sequential":
        assert all(p >= SEQUENTIAL_BASE and p not in SPORTS for p in ports)
        assert [b - a for a, b in zip(ports, ports[1:])] == [1] * (len(ports) - 1)
    elif profile == "napt-random":
        assert not set(ports) & set(SPORTS)
        assert [b - a for a, b in zip(ports, ports[1:])] != [1] * (len(ports) - 1)
    else:
        pytest.fail(f"no expectation for {profile}")


EXPECTED_UNSOLICITED = {"open": "ok", "firewall": "timeout", "firewall-liberal": "timeout",
                        "nat": "timeout",
                        "nat-rst": "refused", "napt-ei": "timeout", "napt-sequential": "timeout",
                        "napt-random": "timeout", "strict": "timeout", "cgn": "timeout",
                        "upnp": "timeout"}     # until a mapping is asked for (test_upnp.py)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_unsolicited_syn_filtering(lab_factory, profile):
    lab = lab_factory(a=profile)
    site = lab.sites["a"]
    with TcpServer(lab, "a", "0.0.0.0", 8000):
        outcome = connect(lab, "inet", site.public_addr, 8000, timeout=1.5)
    assert outcome == EXPECTED_UNSOLICITED[profile]


@pytest.mark.parametrize("profile", ["nat", "nat-rst", "napt-random", "strict", "cgn"])
def test_outbound_synack_that_starts_a_flow(lab_factory, profile):
    """netfilter-facts 2: conntrack finds a first SYN-ACK INVALID and does not
    translate it: it leaves with the private source, unless INVALID is dropped."""
    from fastpunch import netfilter
    from fastpunch.packet import Flags, RawReceiver, RawSender, build, parse

    lab = lab_factory(a=profile)
    site = lab.sites["a"]
    with lab.inside("inet"):
        rx = RawReceiver(dport=9100)
        guard = netfilter.suppress_rsts([netfilter.RstSuppression(9100)])
    with lab.inside("inet"), guard, rx:
        with lab.inside("a"), RawSender() as tx:
            for i in range(3):
                tx.send(build(site.host_addr, lab.ccs_addr, 46000, 9100, seq=1000, ack=5000,
                              flags=Flags.SYN | Flags.ACK))
        time.sleep(0.5)
        seen = [parse(d) for d in rx.recv_many()]
    if profile == "strict":
        assert seen == []                                    # INVALID dropped
    else:
        assert seen and {s.src for s in seen} == {site.host_addr}   # untranslated: leaks 10.x
        assert site.host_addr.startswith("10.")


@pytest.mark.parametrize("a, b, works", [
    ("nat", "nat", True), ("nat-rst", "nat", True), ("strict", "strict", True),
    ("firewall", "nat", True), ("open", "nat", True), ("cgn", "nat", True),
    # a translated port defeats plain simultaneous open: the peer aims at the
    # wrong port (what port prediction and the spray are for)
    ("open", "napt-sequential", False), ("napt-random", "napt-random", False),
])
def test_plain_kernel_simultaneous_open(lab_factory, a, b, works):
    lab = lab_factory(a=a, b=b)
    assert simultaneous_open(lab, "a", "b", limit=10.0 if works else 3.0) is works


def test_mapping_expires_after_the_conntrack_timeout(lab_factory):
    lab = lab_factory(a="nat", conntrack_timeouts={"syn_sent": 3})
    with lab.inside("a"):
        s = socket.socket()
    s.bind(("0.0.0.0", 46001))
    s.setblocking(False)
    s.connect_ex(("203.0.113.99", 9))      # nobody there: the SYN goes unanswered
    time.sleep(0.3)
    s.close()                              # no retransmissions from here on

    def mapping():
        return [e for e in lab.conntrack("gw-a") if e["orig"][1] == 46001]

    entries = mapping()
    assert entries and entries[0]["state"] == "SYN_SENT"
    assert entries[0]["reply"][2] == lab.sites["a"].public_addr   # the translated side
    deadline = time.monotonic() + 8
    while mapping() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert mapping() == []
