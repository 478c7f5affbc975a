"""fastpunch.portmap.gateway: the default gateway from /proc/net/route."""

from __future__ import annotations

import socket

import pytest

from fastpunch.portmap import gateway as pm


# /proc/net/route of the lab's host a (x86: addresses little-endian), plus more
ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_default_gateway_from_proc_net_route():
    assert pm.parse_proc_net_route(ROUTE, "little") == "10.1.0.1"


def test_default_gateway_big_endian_host():
    text = ROUTE.replace("0100010A", "0A010001").replace("0000010A", "0A010000")
    assert pm.parse_proc_net_route(text, "big") == "10.1.0.1"


def test_default_gateway_lowest_metric_and_only_real_defaults():
    others = (
        "tun0\t00000000\t0102A8C0\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"     # no RTF_GATEWAY
        "eth1\t00000000\t0103A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"     # not up
        "eth2\t00000000\t0104A8C0\t0003\t0\t0\t0\t00000080\t0\t0\t0\n")    # 0/1: no default
    worse = "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
    assert pm.parse_proc_net_route(ROUTE + worse + others, "little") == "10.1.0.1"
    better = worse.replace("\t600\t", "\t0\t")
    eth0_worse = ROUTE.replace("\t0003\t0\t0\t0\t", "\t0003\t0\t0\t100\t")
    assert pm.parse_proc_net_route(eth0_worse + better + others, "little") == "192.168.1.1"


@pytest.mark.parametrize("text", [
    "",
    "Iface\tDestination\tGateway\n",
    ROUTE.splitlines()[0] + "\n" + ROUTE.splitlines()[1] + "\n",          # no default route
    ROUTE.replace("0100010A", "zzzzzzzz"),
    ROUTE.replace("\t0003\t0\t0\t0\t00000000", "\t0003"),                 # short line
    ROUTE.replace("0100010A", "00000000"),                                # gateway 0.0.0.0
    ROUTE.replace("0100010A", "1FFFFFFFF"),
])
def test_default_gateway_absent_or_garbled(text):
    assert pm.parse_proc_net_route(text, "little") is None


def test_default_gateway_of_this_namespace_is_an_address_or_none():
    got = pm.default_gateway()
    assert got is None or socket.inet_aton(got)


def test_default_gateway_without_proc(monkeypatch):
    def missing(*a, **kw):
        raise FileNotFoundError("no /proc")
    monkeypatch.setattr(pm, "open", missing, raising=False)
    assert pm.default_gateway() is None
