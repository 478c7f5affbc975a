"""natcheck against every mapping kind the lab has, and port prediction
through a sequential NAPT, both directions."""

from __future__ import annotations

import pytest

from .conftest import connect_pair, tables_in

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("profile,expected,filtering", [
    ("nat", "nat", "drop"), ("nat-rst", "nat-rst", "rst"), ("cgn", "nat", "drop"),
    ("firewall", "firewall", "drop"), ("firewall-liberal", "firewall", "drop"),
    ("open", "open", "open"), ("napt-sequential", "napt-sequential", "drop"),
    ("napt-random", "napt-random", "drop")])
def test_natcheck_classifies_the_gateway(lab_pair, profile, expected, filtering):
    with lab_pair(profile, "nat") as (lab, ccs, cam, viewer):
        loop, dev = cam
        result = loop.run(dev.natcheck(probes=4))
        assert (result["nat"], result["filtering"]) == (expected, filtering), result
        assert result["public_addr"] == lab.sites["a"].public_addr


@pytest.mark.parametrize("a,b", [("nat", "napt-sequential"), ("napt-sequential", "strict")])
def test_port_prediction_goes_direct_through_a_sequential_napt(lab_pair, a, b):
    with lab_pair(a, b) as (lab, ccs, cam, viewer):
        for _ in range(3):
            ca, cb = connect_pair(cam, viewer)
            lines = ca.report.lines() + cb.report.lines()
            assert (ca.path, cb.path) == ("direct", "direct"), lines
            # the side facing the sequential NAPT won on a predicted port: its
            # predicted candidate (symmetric) or the window around it (predict)
            facing = ca if b == "napt-sequential" else cb
            assert "predicted" in facing.report.pair, lines
            ca.sock.sendall(b"x" * 100000)
            got = b""
            cb.sock.settimeout(10)
            while len(got) < 100000:
                got += cb.sock.recv(65536)
            ca.close(), cb.close()
        assert ccs.server.relay.bytes_total == 0


def test_natcheck_command(tmp_path):
    import json
    import sys

    from fastpunch import labdemo
    from fastpunch.lab import Lab

    with Lab(a="nat", b="napt-sequential") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        out = lab.run("b", [sys.executable, "-m", "fastpunch", "natcheck", "--name", "viewer",
                            "--key-file", str(tmp_path / "viewer.json"), *story.common])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["nat"], result["delta"]) == ("napt-sequential", 1)
    assert len(result["probes"]) == 8          # 4 local ports, each to both CCS probe ports
    assert {p["server_port"] for p in result["probes"]} == {7444, 7445}


@pytest.mark.parametrize("a,b", [("nat", "napt-random"), ("napt-random", "strict")])
def test_spray_goes_direct_through_a_random_napt(lab_pair, a, b):
    with lab_pair(a, b) as (lab, ccs, cam, viewer):
        paths = []
        for _ in range(3):
            ca, cb = connect_pair(cam, viewer)
            paths.append(ca.path)
            assert ca.path == cb.path and ca.strategy in ("spray", "relay")
            if ca.path == "direct":
                assert ca.report.attempts[-1].sent >= 512        # a batch of SYNs, not one
                ca.sock.sendall(b"spray")
                cb.sock.settimeout(10)
                assert cb.sock.recv(16) == b"spray"
            ca.close(), cb.close()
        assert paths.count("direct") >= 2, paths               # ~98% per trial expected
        assert not [t for t in tables_in(lab, "a") + tables_in(lab, "b")]


def test_two_random_napts_go_straight_to_the_relay(lab_pair):
    # nothing direct can work: the relay is joined at once, not after a delay
    with lab_pair("napt-random", "napt-random") as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, [a.strategy for a in ca.report.attempts]) == ("relay", ["relay"])
        assert ca.report.attempts[0].sent == 0 and cb.report.attempts[0].sent == 0
        ca.close(), cb.close()
