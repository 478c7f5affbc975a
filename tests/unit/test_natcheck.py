"""natcheck's classification from (local port, external port) probe pairs."""

from fastpunch.punch.natcheck import classify
from fastpunch.punch.predict import candidates
from fastpunch.punch.base import PunchContext


def test_classify():
    local = {"10.1.0.2"}
    assert classify([(1000, 1000), (2000, 2000)], local, "203.0.113.10")["nat"] == "nat"
    assert classify([(1000, 1000), (2000, 2000)], {"198.51.100.18"}, "198.51.100.18")["nat"] == "open"
    seq = classify([(1000, 20001), (5000, 20002), (7000, 20003)], local, "203.0.113.10")
    assert (seq["nat"], seq["delta"]) == ("napt-sequential", 1)
    assert classify([(1000, 20001), (5000, 20003), (7000, 20004)], local, "x")["nat"] == "napt-random"
    assert classify([(1000, 41234), (5000, 1022), (7000, 60001)], local, "x")["nat"] == "napt-random"
    assert classify([(1000, 20001), (5000, 20101)], local, "x")["nat"] == "napt-random"   # delta > 16


def test_filtering_names_the_gateway():
    local, pub = {"10.1.0.2"}, "203.0.113.10"
    kept = [(1000, 1000), (2000, 2000)]
    assert classify(kept, local, pub, "rst")["nat"] == "nat-rst"
    assert classify(kept, local, pub, "drop")["nat"] == "nat"
    assert classify(kept, {pub}, pub, "drop")["nat"] == "firewall"
    assert classify(kept, {pub}, pub, "rst")["nat"] == "firewall"
    assert classify(kept, {pub}, pub, "open")["nat"] == "open"
    assert classify(kept, {pub}, pub)["nat"] == "open"         # not probed: as before
    assert classify([(1000, 20001), (5000, 20003)], local, pub, "rst")["filtering"] == "rst"


def test_prediction_candidates_follow_the_announced_port():
    ctx = PunchContext("initiator", "10.1.0.2", 4000, 1, "203.0.113.20", 65534, 2,
                       peer_nat="napt-sequential")
    assert candidates(ctx) == [65534, 65535, 0, 1, 2, 3]
    assert candidates(PunchContext("initiator", "a", 1, 1, "b", 7, 2, peer_nat="nat")) == [7]

