"""Port mappings: a device whose gateway grants them (the lab's miniupnpd)
finds out in natcheck and maps each punch port: the mapped candidate. A
peer behind any NAT, napt-random included, reaches it: by the race (the
random side's SYN through the mapping, answered as a peer-reflexive flow)
or, without crafted segments, by the ``upnp`` strategy's plain connect().
The mapping is gone afterwards."""

from __future__ import annotations

import time

import pytest

from .conftest import connect_pair, tables_in
from .test_punch import exchange

pytestmark = pytest.mark.lab


def forwarded_rules(lab, site: str = "a") -> str:
    """miniupnpd's DNAT rules in a site's gateway (one per live mapping)."""
    out = lab.run(f"gw-{site}", ["nft", "list", "chain", "inet", "lab_upnp",
                                 "prerouting_miniupnpd"]).stdout
    return "\n".join(line for line in out.splitlines() if "dnat" in line)


def test_natcheck_finds_the_gateways_port_mapping(lab_pair):
    with lab_pair("upnp", "nat") as (lab, ccs, cam, viewer):
        mapped = cam[0].run(cam[1].natcheck())
        plain = viewer[0].run(viewer[1].natcheck())
    assert (mapped["nat"], mapped["behind"], mapped["portmap"]) == ("upnp", "nat", "pcp"), mapped
    assert (plain["nat"], plain["portmap"]) == ("nat", None), plain
    assert "no port mapping" in plain["portmap_detail"]


@pytest.mark.parametrize("a,b", [("upnp", "napt-random"), ("napt-random", "upnp")])
def test_a_mapped_port_goes_direct_even_to_a_random_napt(lab_pair, a, b):
    with lab_pair(a, b) as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer)
        lines = ca.report.lines() + cb.report.lines()
        assert (ca.path, cb.path) == ("direct", "direct"), lines
        upnp_side, random_side = (ca, cb) if a == "upnp" else (cb, ca)
        # no spray: the random side aimed at the mapped candidate, and the
        # mapped side answered its SYN, which came from a port nobody announced
        assert [t.strategy for t in ca.report.attempts] == ["symmetric"], lines
        assert random_side.report.pair.startswith("srflx-mapped"), lines
        assert upnp_side.report.pair.startswith("prflx"), lines
        site = "a" if a == "upnp" else "b"
        deadline = time.monotonic() + 5
        while forwarded_rules(lab, site) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert forwarded_rules(lab, site) == ""     # the mapping is deleted...
        d = exchange(ca.sock, cb.sock, 8 << 20)     # ...and the flow lives on
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        assert ccs.server.relay.bytes_total == 0
        ca.close(), cb.close()
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_without_a_mapping_the_plan_falls_through(lab_pair):
    # told upnp, but the gateway grants nothing (a plain nat): the mapping
    # request fails, no mapped candidate is announced, the race goes direct
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        cam[1].nat, viewer[1].nat = "upnp", "nat"
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, ca.strategy) == ("direct", "symmetric")
        assert [t.strategy for t in ca.report.attempts] == ["symmetric"]
        # it knows why it announced no mapped candidate
        assert any("no port mapping from the gateway" in what
                   for _, what in ca.report.history), ca.report.history
        assert "mapped" not in ca.report.pair and "mapped" not in cb.report.pair
        ca.close(), cb.close()
