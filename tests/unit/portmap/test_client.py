"""fastpunch.portmap.client: map_port's checks that need no network."""

from __future__ import annotations

import asyncio

import pytest

from fastpunch.portmap import client as pm

from .helpers import raises


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("kw", [dict(internal_port=0), dict(internal_addr="eth0"),
                                dict(lifetime=0), dict(external_port=65536),
                                dict(protocols=("stun",)), dict(protocols=()),
                                dict(gateway="router"), dict(timeout=0)])
def test_map_port_argument_errors(kw):
    args = dict(internal_addr="10.1.0.2", internal_port=40000)
    args.update(kw)
    with pytest.raises(ValueError):
        run(pm.map_port(**args))


def test_map_port_without_a_gateway(monkeypatch):
    monkeypatch.setattr(pm, "default_gateway", lambda: None)
    err = raises("no-mapping", run, pm.map_port("10.1.0.2", 40000, protocols=("pcp", "natpmp")))
    assert {p: e.code for p, e in err.failures.items()} == \
        {"pcp": "no-gateway", "natpmp": "no-gateway"}


def test_map_port_never_asks_pcp_or_natpmp_for_a_low_port():
    # not sent at all: miniupnpd would stall for a minute before refusing
    err = raises("no-mapping", run, pm.map_port("10.1.0.2", 80, gateway="192.0.2.1",
                                                protocols=("pcp", "natpmp")))
    assert {p: e.code for p, e in err.failures.items()} == \
        {"pcp": "low-port", "natpmp": "low-port"}
    assert "pcp: " in str(err) and "natpmp: " in str(err)
