"""The ``upnp`` strategy: a device whose gateway grants port mappings (the
lab's miniupnpd) finds out in natcheck, maps each next port, and the peer
connects in with a plain connect(), whatever its own NAT, napt-random
included. The mapping is gone afterwards."""

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
        cam[1].nat = viewer[1].nat = "auto"          # each finds out what it is behind
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
            ("direct", "upnp", "direct", "upnp"), ca.report.lines() + cb.report.lines()
        upnp_side = ca if a == "upnp" else cb
        assert upnp_side.report.attempts[0].detail.startswith("external port ")
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
    # announced upnp, but the gateway grants nothing (a plain nat): the
    # mapping request fails, upnp fails cleanly on both sides, symmetric follows
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        cam[1].nat, viewer[1].nat = "upnp", "nat"
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, ca.strategy) == ("direct", "symmetric")
        first = [(t.strategy, t.ok, t.reason) for t in ca.report.attempts][0]
        assert first == ("upnp", False, "no-mapping")        # knows it got none
        assert [(t.strategy, t.ok, t.reason) for t in cb.report.attempts][0] == \
            ("upnp", False, "timeout")                       # connects in vain, in its slot
        ca.close(), cb.close()
