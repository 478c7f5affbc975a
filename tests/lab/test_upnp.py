"""The upnp gateway: miniupnpd grants mappings over UPnP-IGD, NAT-PMP and PCP,
asked by real clients, and each mapping lets real inbound traffic through."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct

import pytest

from tests.lab.probes import TcpServer, connect

pytestmark = pytest.mark.lab


@pytest.fixture
def upnp_lab(lab_factory):
    for tool, package in (("natpmpc", "natpmp-utils"), ("upnpc", "miniupnpc")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt-get install {package})")
    return lab_factory(a="upnp")


def inbound(lab, port) -> str:
    with TcpServer(lab, "a", "0.0.0.0", port) as server:
        outcome = connect(lab, "inet", lab.sites["a"].public_addr, port)
    if outcome == "ok":
        assert server.peers and server.peers[0][0] == lab.ccs_addr   # DNATed, source kept
    return outcome


def test_nat_pmp_mapping_opens_the_gateway(upnp_lab):
    lab = upnp_lab
    assert inbound(lab, 40000) == "timeout"                 # a nat gateway before asking
    out = lab.run("a", ["natpmpc", "-g", lab.sites["a"].gateway_lan, "-a", "40000", "40000",
                        "tcp", "600"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Public IP address : {lab.sites['a'].public_addr}" in out.stdout
    assert "Mapped public port 40000 protocol TCP to local port 40000" in out.stdout
    assert inbound(lab, 40000) == "ok"


def test_upnp_igd_is_discovered_and_maps_a_port(upnp_lab):
    lab = upnp_lab
    found = lab.run("a", ["upnpc", "-s"])                    # SSDP multicast discovery
    m = re.search(r"IGD : (http://10\.1\.0\.1:5000/\S+)", found.stdout)
    assert m, found.stdout
    out = lab.run("a", ["upnpc", "-u", "http://10.1.0.1:5000/rootDesc.xml", "-e", "fastpunch",
                        "-a", lab.sites["a"].host_addr, "41000", "41000", "TCP"])
    assert (f"external {lab.sites['a'].public_addr}:41000 TCP is redirected to internal "
            "10.1.0.2:41000") in out.stdout, out.stdout
    assert inbound(lab, 41000) == "ok"


def test_secure_mode_refuses_a_mapping_for_another_host(upnp_lab):
    lab = upnp_lab
    out = lab.run("a", ["upnpc", "-u", "http://10.1.0.1:5000/rootDesc.xml", "-e", "x",
                        "-a", "10.1.0.99", "42000", "42000", "TCP"])
    assert "failed with code 606" in out.stdout or "failed with code 718" in out.stdout, out.stdout
    assert inbound(lab, 42000) == "timeout"


def pcp_map(lab, internal_port: int, lifetime: int = 600) -> tuple[int, int, str]:
    """RFC 6887 MAP request from host a; returns (result, port, address)."""
    host = lab.sites["a"].host_addr
    mapped = b"\0" * 10 + b"\xff\xff"
    nonce = os.urandom(12)
    request = struct.pack("!BBHI", 2, 1, 0, lifetime) + mapped + socket.inet_aton(host)
    request += nonce + struct.pack("!B3xHH", 6, internal_port, internal_port) + mapped + b"\0" * 4
    with lab.inside("a"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(3)
        s.sendto(request, (lab.sites["a"].gateway_lan, 5351))
        reply = s.recv(1100)
    version, op, _, result, _lifetime, _epoch = struct.unpack_from("!BBBBII", reply)
    assert (version, op) == (2, 0x81) and reply[24:36] == nonce
    proto, _internal, port = struct.unpack_from("!B3xHH", reply, 36)
    return result, port, socket.inet_ntoa(reply[56:60])


def test_pcp_map_request_is_granted_and_opens_the_gateway(upnp_lab):
    lab = upnp_lab
    result, port, address = pcp_map(lab, 43000)
    assert result == 0 and port == 43000 and address == lab.sites["a"].public_addr
    assert inbound(lab, 43000) == "ok"
