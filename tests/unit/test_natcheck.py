"""natcheck's classification: each local port's probes judged on their own,
the majority deciding, the evidence said; and what gathering predicts."""

from fastpunch.netcheck.natcheck import Probe, classify
from fastpunch.proto.kinds import Filtering, Mapping, NatClass

LOCAL = {"10.1.0.2"}
PUB = "203.0.113.10"


def probes(*rows, ports=(7444, 7445)):
    """rows of (local port, external port toward each CCS port)"""
    return [Probe(local, port, ext, PUB) for local, *exts in rows for port, ext in zip(ports, exts)]


def test_kept_ports_are_preserve_and_a_public_address_is_no_nat():
    r = classify(probes((1000, 1000, 1000), (2000, 2000, 2000)), LOCAL)
    assert (r.mapping, r.nat) == (Mapping.PRESERVE, NatClass.NAT)
    r = classify([Probe(1000, 7444, 1000, "198.51.100.18")], {"198.51.100.18"})
    assert (r.mapping, r.nat) == (Mapping.NONE, NatClass.OPEN)


def test_one_other_port_for_every_destination_is_endpoint_independent():
    r = classify(probes((1000, 2000, 2000), (5000, 6000, 6000), (7000, 8000, 8000)), LOCAL)
    assert (r.mapping, r.nat, r.offset) == (Mapping.INDEPENDENT, NatClass.NAPT_EI, 1000)


def test_a_new_port_per_destination_is_sequential_or_random():
    seq = classify(probes((1000, 20001, 20002), (5000, 20003, 20004), (7000, 20005, 20006)),
                   LOCAL)
    assert (seq.mapping, seq.delta, seq.nat) == (Mapping.SEQUENTIAL, 1, NatClass.NAPT_SEQUENTIAL)
    rnd = classify(probes((1000, 41234, 1022), (5000, 60001, 33333), (7000, 2500, 40404)), LOCAL)
    assert (rnd.mapping, rnd.nat) == (Mapping.RANDOM, NatClass.NAPT_RANDOM)
    far = classify(probes((1000, 20001, 20101), (5000, 20201, 20301)), LOCAL)
    assert far.mapping is Mapping.RANDOM                   # a step over 16 is no prediction


def test_collided_probes_no_longer_flip_the_verdict():
    # another host behind the NAT held the port toward the CCS at that
    # moment: that probe came out translated, its twin kept the number
    r = classify(probes((1000, 1000, 1000), (2000, 2000, 45123), (3000, 3000, 3000)), LOCAL)
    assert r.mapping is Mapping.PRESERVE
    assert "2 of 3 local ports kept their number" in r.evidence[0]
    assert "1 of 3 local ports kept their number toward one CCS port" in r.evidence[0]
    # even when most ports collided (three hosts probing one narrow range at once)
    r = classify(probes((1000, 1000, 6000), (2000, 7000, 2000), (3000, 3000, 3000)), LOCAL)
    assert r.mapping is Mapping.PRESERVE
    # and one fully translated port among kept ones is outvoted
    r = classify(probes((1000, 1000, 1000), (2000, 9000, 9001), (3000, 3000, 3000)), LOCAL)
    assert r.mapping is Mapping.PRESERVE


def test_with_one_ccs_probe_port_a_changed_port_is_not_called_independent():
    r = classify(probes((1000, 2000), (5000, 6000), ports=(7444,)), LOCAL)
    assert r.mapping is Mapping.RANDOM
    assert any("one CCS probe port" in e for e in r.evidence)


def test_filtering_names_the_gateway():
    kept = probes((1000, 1000, 1000), (2000, 2000, 2000))
    assert classify(kept, LOCAL, Filtering.RST).nat is NatClass.NAT_RST
    assert classify(kept, LOCAL, Filtering.DROP).nat is NatClass.NAT
    own = [Probe(1000, 7444, 1000, PUB)]
    assert classify(own, {PUB}, Filtering.DROP).nat is NatClass.FIREWALL
    assert classify(own, {PUB}, Filtering.RST).nat is NatClass.FIREWALL
    assert classify(own, {PUB}, Filtering.OPEN).nat is NatClass.OPEN
    assert classify(own, {PUB}).nat is NatClass.OPEN               # not probed: as before


def test_no_answer_is_unknown_not_a_guess():
    r = classify([], LOCAL)
    assert (r.mapping, r.nat, r.public_addr) == (Mapping.UNKNOWN, NatClass.UNKNOWN, None)


def test_the_report_reads_as_json():
    d = classify(probes((1000, 20001, 20002), (5000, 20003, 20004)), LOCAL).as_dict()
    assert (d["nat"], d["mapping"], d["delta"]) == ("napt-sequential", "sequential", 1)
    assert len(d["probes"]) == 4 and d["evidence"]


def test_a_sequential_nat_shared_with_busy_neighbours_is_still_sequential():
    # other hosts' mappings land between ours: steps of 1, 2, 1, 3, 1
    r = classify(probes((1000, 20001, 20003), (5000, 20004, 20007), (7000, 20008, 20009)), LOCAL)
    assert (r.mapping, r.delta) == (Mapping.SEQUENTIAL, 1), r.evidence


def test_busy_neighbours_do_not_stretch_the_predicted_step():
    # two neighbours probing at the same moment: most steps are 2 or 3, but
    # the allocator itself steps by 1, and the punch right after a probe
    # gets probe + 1 when nobody comes in between
    r = classify(probes((1000, 20001, 20003), (5000, 20005, 20008), (7000, 20009, 20011),
                        (9000, 20013, 20015)), LOCAL)
    assert (r.mapping, r.delta) == (Mapping.SEQUENTIAL, 1), r.evidence
    assert "by 1 at least, most often 2" in " ".join(r.evidence)
    # an allocator with a stride of 2 is still read as 2
    r = classify(probes((1000, 20002, 20004), (5000, 20008, 20010), (7000, 20012, 20016)), LOCAL)
    assert (r.mapping, r.delta) == (Mapping.SEQUENTIAL, 2), r.evidence


def test_no_guess_wraps_past_port_65535():
    from types import SimpleNamespace

    from fastpunch.netcheck.gather import _next_mapping
    from fastpunch.punch.base import Side
    from fastpunch.punch.predict import CANDIDATES, ports

    seq = SimpleNamespace(delta=1)
    assert _next_mapping(("203.0.113.10", 20000), Mapping.SEQUENTIAL, seq) == 20001
    assert _next_mapping(("203.0.113.10", 65535), Mapping.SEQUENTIAL, seq) is None
    assert _next_mapping(("203.0.113.10", 20000), Mapping.RANDOM, seq) is None
    peer = Side("203.0.113.20", 65532, 1, mapping=Mapping.SEQUENTIAL)
    assert ports(SimpleNamespace(peer=peer)) == [65532, 65533, 65534, 65535]
    peer = Side("203.0.113.20", 20000, 1, mapping=Mapping.SEQUENTIAL)
    assert ports(SimpleNamespace(peer=peer)) == list(range(20000, 20000 + CANDIDATES))
