"""fastpunch.portmap against a real miniupnpd: the lab's "upnp"
gateway grants a mapping over each protocol, real inbound TCP from the
internet passes through it, and stops passing once it is deleted; a plain
NAT answers nothing and map_port gives up within its bound.

The client runs in site a's host: ``asyncio.run`` inside ``lab.inside("a")``,
so the event loop's sockets (UDP to 5351, SSDP multicast, HTTP) live there."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastpunch import portmap as pm
from fastpunch.portmap import upnp
from tests.lab.probes import TcpServer, connect

pytestmark = pytest.mark.lab


def in_site(lab, coro, where: str = "a", loop_factory=asyncio.new_event_loop):
    """Run ``coro`` to completion on a fresh event loop inside ``where``."""
    with lab.inside(where):
        loop = loop_factory()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()


def inbound(lab, port: int, external_port: int) -> str:
    """A listener on a's ``port``; one connect from the internet to a's
    public address and ``external_port``: 'ok', 'refused' or 'timeout'."""
    with TcpServer(lab, "a", "0.0.0.0", port) as server:
        outcome = connect(lab, "inet", lab.sites["a"].public_addr, external_port)
    if outcome == "ok":
        assert server.peers and server.peers[0][0] == lab.ccs_addr   # DNATed, source kept
    return outcome


@pytest.fixture
def upnp_lab(lab_factory):
    return lab_factory(a="upnp")


@pytest.mark.parametrize("protocol", ["pcp", "natpmp", "upnp"])
def test_each_protocol_maps_opens_and_unmaps(upnp_lab, protocol):
    lab, site = upnp_lab, upnp_lab.sites["a"]
    port, external = 44000, 45000        # another external port: the DNAT is real
    assert inbound(lab, port, external) == "timeout"          # a nat gateway before asking
    mapping = in_site(lab, pm.map_port(site.host_addr, port, external_port=external,
                                       lifetime=120, protocols=(protocol,)))
    try:
        assert mapping.protocol == protocol
        assert mapping.external_addr == site.public_addr
        assert (mapping.internal_addr, mapping.internal_port) == (site.host_addr, port)
        assert mapping.external_port == external              # miniupnpd grants what is asked
        assert mapping.gateway == site.gateway_lan
        assert 0 < mapping.lifetime <= 120
        if protocol == "pcp":
            assert len(mapping.nonce) == 12
        if protocol == "upnp":
            assert mapping.control_url.startswith(f"http://{site.gateway_lan}:5000/")
            assert mapping.service_type.startswith("urn:schemas-upnp-org:service:WANIPConn")
        assert inbound(lab, port, external) == "ok"
    finally:
        in_site(lab, pm.unmap(mapping))
    assert inbound(lab, port, external) == "timeout"           # deleted, not just expired


def test_default_order_picks_pcp_and_mapped_deletes_on_exit(upnp_lab):
    """The production loop (uvloop when installed), protocols in default order."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    lab, site = upnp_lab, upnp_lab.sites["a"]

    async def use() -> tuple:
        async with pm.mapped("0.0.0.0", 46000) as m:         # "this host's address"
            return m, await asyncio.get_running_loop().run_in_executor(
                None, inbound, lab, 46000, m.external_port)

    mapping, during = in_site(lab, use(), loop_factory=factory)
    assert mapping.protocol == "pcp"
    assert (mapping.internal_addr, mapping.external_port) == (site.host_addr, 46000)
    assert mapping.external_addr == site.public_addr
    assert during == "ok"
    assert inbound(lab, 46000, 46000) == "timeout"


def test_mappings_for_another_host_are_refused(upnp_lab):
    """Secure mode: PCP and NAT-PMP are not even asked, UPnP is refused."""
    lab = upnp_lab
    with pytest.raises(pm.PortMapError) as info:
        in_site(lab, pm.map_port("10.1.0.99", 47000))
    err = info.value
    assert err.code == "no-mapping"
    codes = {p: e.code for p, e in err.failures.items()}
    assert codes["pcp"] == codes["natpmp"] == "third-party"
    assert codes["upnp"] in ("upnp-fault-606", "upnp-fault-718"), err
    assert inbound(lab, 47000, 47000) == "timeout"


def test_a_gateway_without_a_daemon_fails_in_bounded_time(lab_factory):
    lab = lab_factory(a="nat")
    started = time.monotonic()
    with pytest.raises(pm.PortMapError) as info:
        in_site(lab, pm.map_port(lab.sites["a"].host_addr, 48000))
    elapsed = time.monotonic() - started
    err = info.value
    assert err.code == "no-mapping" and list(err.failures) == ["pcp", "natpmp", "upnp"]
    # the gateway's LAN side answers port unreachable: PCP and NAT-PMP end at once
    assert err.failures["pcp"].code in ("unreachable", "timeout")
    assert err.failures["natpmp"].code in ("unreachable", "timeout")
    assert err.failures["upnp"].code == "timeout"              # no SSDP answer
    assert elapsed < 3 * pm.DEFAULT_TIMEOUT + 1.0, elapsed


def counting_discovery(monkeypatch) -> list:
    """Count SSDP discoveries (the real one still runs)."""
    calls = []
    real = upnp._ssdp_discover

    async def discover(gateway, deadline):
        calls.append(gateway)
        return await real(gateway, deadline)

    monkeypatch.setattr(upnp, "_ssdp_discover", discover)
    return calls


def test_upnp_discovers_the_gateway_once_then_reuses_it(upnp_lab, monkeypatch):
    lab, site = upnp_lab, upnp_lab.sites["a"]
    upnp._igd_cache.clear()
    calls = counting_discovery(monkeypatch)
    took = []
    for port in (47000, 47001):
        t0 = time.perf_counter()
        mapping = in_site(lab, pm.map_port(site.host_addr, port, protocols=("upnp",)))
        took.append(time.perf_counter() - t0)
        in_site(lab, pm.unmap(mapping))
    assert calls == [site.gateway_lan]                  # the second mapping skipped SSDP
    print(f"UPnP mapping: discovered {took[0] * 1000:.0f} ms, cached {took[1] * 1000:.0f} ms")


def test_a_stale_cached_control_url_is_discovered_again(upnp_lab, monkeypatch):
    # as after a gateway reboot onto another port: the cached URL refuses,
    # the mapping is still granted, through a fresh discovery
    lab, site = upnp_lab, upnp_lab.sites["a"]
    upnp._igd_cache.clear()
    calls = counting_discovery(monkeypatch)
    with lab.inside("a"):
        key = upnp._igd_key(site.gateway_lan)
    upnp._igd_cache[key] = (upnp.IgdService(f"http://{site.gateway_lan}:5009/ctl/IPConn",
                                            upnp.WANIP_SERVICES[0]), time.monotonic() + 60)
    mapping = in_site(lab, pm.map_port(site.host_addr, 47002, protocols=("upnp",)))
    try:
        assert mapping.control_url.startswith(f"http://{site.gateway_lan}:5000/")
        assert calls == [site.gateway_lan]
        assert upnp._igd_cache[key][0].control_url == mapping.control_url
    finally:
        in_site(lab, pm.unmap(mapping))
