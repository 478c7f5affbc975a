"""Dual stack: sites whose IPv4 only the relay can join, but whose IPv6
(global addresses behind stateful firewalls, the common case of mobile
carriers and home ISPs) goes direct; a device logged in over IPv6; a site
with IPv6 beside one without. Real CCS, real punches, real data."""

from __future__ import annotations

import pytest

from .conftest import tables_in
from .test_punch import exchange
from .test_topologies import connect as connect_in
from .test_topologies import deployed

pytestmark = pytest.mark.lab


PAIR = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}


def dual(tmp_path, over: dict = None, **lab_kw):
    return deployed(tmp_path, PAIR, over=over, **lab_kw)


def connect(devs):
    return connect_in(devs, "cam", "viewer")


@pytest.mark.parametrize("v6", ["firewall", "firewall-rst", "open"])
def test_ipv4_only_relays_but_ipv6_goes_direct(tmp_path, v6):
    # napt-random on both sides: over IPv4 the plan is the relay alone
    # (docs/compatibility.md); both sites' IPv6 is behind its firewall
    with dual(tmp_path, a="napt-random", b="napt-random", v6=v6) as (lab, ccs, devs):
        for _ in range(3):
            ca, cb = connect(devs)
            lines = ca.report.lines() + cb.report.lines()
            assert (ca.path, cb.path) == ("direct", "direct"), lines
            assert ca.sock.family == cb.sock.family == 10, lines       # AF_INET6
            assert ca.sock.getpeername()[0] == lab.host("b").addr6, lines
            assert cb.sock.getpeername()[0] == lab.host("a").addr6, lines
            assert "2001:db8:" in ca.report.pair and ca.report.family == "IPv6", lines
            assert ca.report.lines()[0].startswith("viewer: direct via symmetric over IPv6"), lines
            lost = [p.outcome for a in ca.report.attempts for p in a.pairs if ":" not in p.remote[0]]
            assert all(o in ("lost to the IPv6 pair", "") or o.startswith("dead") for o in lost), lines
            d = exchange(ca.sock, cb.sock, 4 << 20)
            assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
            ca.close(), cb.close()
        assert ccs.server.relay.bytes_total == 0
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_a_device_logged_in_over_ipv6_goes_direct_and_its_peer_over_ipv4(tmp_path):
    with dual(tmp_path, over={"cam": 6}, a="napt-random", b="napt-random",
              v6="firewall") as (lab, ccs, devs):
        cam = devs["cam"][1]
        assert cam.ccs_ip == "2001:db8::1" and cam.public_addr[0] == lab.host("a").addr6
        assert cam.ccs_alt_addr == "203.0.113.1"
        ca, cb = connect(devs)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path) == ("direct", "direct"), lines
        assert ca.sock.getpeername()[0] == lab.host("b").addr6, lines
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()


def test_ipv6_on_one_side_only_leaves_ipv4_to_do_what_it_can(tmp_path):
    # the viewer's site has no IPv6: no IPv6 pair forms, the IPv4 NATs
    # connect as they always did
    with dual(tmp_path, a="nat", b="nat", v6={"a": "firewall"}) as (lab, ccs, devs):
        ca, cb = connect(devs)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path) == ("direct", "direct"), lines
        assert ca.sock.family == 2 and "2001:db8:" not in ca.report.pair, lines
        ca.close(), cb.close()


def test_v4_relay_when_both_have_nothing_direct_even_with_v6_on_one_side(tmp_path):
    with dual(tmp_path, a="napt-random", b="napt-random", v6={"a": "firewall"}) as \
            (lab, ccs, devs):
        ca, cb = connect(devs)
        assert (ca.path, cb.path) == ("relay", "relay"), ca.report.lines()
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()


def test_two_ipv6_only_sites_go_direct(tmp_path):
    # no IPv4 address at all on either host: both log in over IPv6
    with dual(tmp_path, over={"cam": 6, "viewer": 6}, a="nat", b="nat", v6="firewall",
              v4=False) as (lab, ccs, devs):
        ca, cb = connect(devs)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path, ca.report.family) == ("direct", "direct", "IPv6"), lines
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        ca.close(), cb.close()


def test_an_ipv6_only_device_and_an_ipv4_only_one_meet_at_the_relay(tmp_path):
    # no family in common: no pair forms on either side, and each joins the
    # relay over its own family (the CCS joins an IPv6 leg to an IPv4 one)
    with dual(tmp_path, over={"cam": 6}, a="nat", b="nat", v6={"a": "firewall"},
              v4={"a": False}) as (lab, ccs, devs):
        ca, cb = connect(devs)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path) == ("relay", "relay"), lines
        assert (ca.report.family, cb.report.family) == ("IPv6", "IPv4"), lines
        assert ca.report.sent == 0 and cb.report.sent == 0, lines
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        ca.close(), cb.close()
        assert ccs.server.relay.bytes_total > 1 << 20


@pytest.mark.parametrize("far", ["firewall", "nat66"])
def test_behind_nat66_the_reflexive_ipv6_candidate_goes_direct(tmp_path, far):
    # NAT66 (rare but real): the LAN has a unique local /64, the gateway
    # masquerades it. Its device announces the ULA (LAN-only: dropped across
    # sites) and the reflexive address its token probe came from
    with dual(tmp_path, a="napt-random", b="napt-random", v6={"a": "nat66", "b": far}) as \
            (lab, ccs, devs):
        assert lab.host("a").addr6.startswith("fd00:")
        ca, cb = connect(devs)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path, ca.report.family) == ("direct", "direct", "IPv6"), lines
        # the accepting side sees the cam's gateway's address, not its ULA
        assert cb.sock.getpeername()[0].startswith("2001:db8:ff01::"), lines
        assert ca.sock.getsockname()[0] == lab.host("a").addr6, lines
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        ca.close(), cb.close()


def test_kernel_simultaneous_open_goes_over_ipv6_too(tmp_path):
    # a device that cannot craft segments gets simopen: its kernel sockets
    # for the IPv6 pair are IPv6 sockets on the punch port
    with dual(tmp_path, a="napt-random", b="napt-random", v6="firewall") as (lab, ccs, devs):
        (la, da), (lb, db) = devs["cam"], devs["viewer"]
        accepting = lb.submit(db.accept(peer="cam", strategies=["simopen"]))
        ca = la.run(da.connect("viewer", strategies=["simopen"]), 60)
        cb = accepting.result(60)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.strategy, ca.report.family) == ("simopen", "IPv6"), lines
        assert ca.sock.getpeername()[0] == lab.host("b").addr6, lines
        d = exchange(ca.sock, cb.sock, 1 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()
