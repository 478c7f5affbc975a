"""The lab's gateway and core rules as data: what gateway_tables() and
core_tables() render for napt-ei, hairpin, MSS clamping and fragmentation-
needed, and the Lab's refusals of bad topology settings. No root needed;
tests/lab/test_topologies.py proves the behaviour with real traffic."""

import re

import pytest

from fastpunch.lab import Lab, LabError
from fastpunch.lab.profiles import (EI_OFFSET, PROFILES, Map, MapTable, core_tables, ei_port,
                                    gateway_tables)
from fastpunch.netfilter import Chain

WAN = "203.0.113.10"


def rendered(profile, **kwargs) -> dict:
    return {t.name: t.render() for t in gateway_tables(PROFILES[profile], "wan", "lan", WAN,
                                                       **kwargs)}


def test_ei_port_adds_the_offset_and_wraps_inside_1024_65535():
    assert ei_port(40001) == 40001 + EI_OFFSET
    assert ei_port(65535) == 1024 + EI_OFFSET - 1
    assert ei_port(64535) == 65535 and ei_port(64536) == 1024
    assert sorted(ei_port(p) for p in range(1024, 65536)) == list(range(1024, 65536))   # bijection


def test_napt_ei_snats_through_a_named_map_over_every_port():
    nat = rendered("napt-ei")["lab_nat"]
    assert 'oifname "wan" meta l4proto { tcp, udp } snat ip to 203.0.113.10 : th sport map ' \
           "@ei_ports;" in nat
    assert nat.index("map @ei_ports") < nat.index('oifname "wan" masquerade')   # fallback last
    elements = re.search(r"elements = \{ (.*?) \};", nat).group(1).split(", ")
    assert len(elements) == 65535 - 1024 + 1
    assert elements[0] == "1024 : 2024" and "65535 : 2023" in elements


def test_napt_ei_filters_like_nat():
    assert rendered("napt-ei")["lab_filter"] == rendered("nat")["lab_filter"]


def test_hairpin_off_adds_nothing():
    assert rendered("nat", lan_net="10.1.0.0/24") == rendered("nat")
    assert "hairpin" not in rendered("nat")["lab_nat"]


def test_hairpin_wan_learns_mappings_and_snats_to_the_senders_own():
    nat = rendered("napt-ei", lan_net="10.1.0.0/24", hairpin="wan")["lab_nat"]
    assert ("map hairpin_by_external { type inet_proto . inet_service : ipv4_addr . "
            "inet_service; flags dynamic,timeout; timeout 300s; }") in nat
    assert "map hairpin_by_internal { type ipv4_addr . inet_proto . inet_service : " \
           "inet_service;" in nat
    learn = re.search(r"chain hairpin_learn \{ (.*?) \}; chain", nat).group(1)
    assert "hook postrouting priority 110;" in learn          # after srcnat (100)
    assert 'oifname "wan" ct direction original ct original ip saddr 10.1.0.0/24' in learn
    assert ("update @hairpin_by_external { meta l4proto . ct reply proto-dst : "
            "ct original ip saddr . ct original proto-src }") in learn
    assert ('iifname "lan" ip daddr 203.0.113.10 meta l4proto { tcp, udp } dnat ip to '
            "meta l4proto . th dport map @hairpin_by_external") in nat
    post = re.search(r"chain postrouting \{ (.*?) \}; chain", nat).group(1)
    rules = [r.strip() for r in post.split(";")[2:] if r.strip()]
    hairpinned = 'oifname "lan" ct status dnat ip saddr 10.1.0.0/24'
    assert rules[0] == (f"{hairpinned} meta l4proto {{ tcp, udp }} snat ip to {WAN} : "
                        "ip saddr . meta l4proto . th sport map @hairpin_by_internal")
    # no mapping yet: the profile's own choice of port, with the WAN address
    assert rules[1:3] == [f"{hairpinned} meta l4proto {{ tcp, udp }} snat ip to {WAN} : "
                          "th sport map @ei_ports", f"{hairpinned} snat ip to {WAN}"]
    assert rules[3:] == ['oifname "wan" meta l4proto { tcp, udp } snat ip to 203.0.113.10 : '
                         "th sport map @ei_ports", 'oifname "wan" masquerade']


def test_hairpin_lan_masquerades_to_the_lan_address_and_needs_no_sender_map():
    nat = rendered("nat", lan_net="10.1.0.0/24", hairpin="lan")["lab_nat"]
    assert 'oifname "lan" ct status dnat ip saddr 10.1.0.0/24 masquerade;' in nat
    assert "hairpin_by_internal" not in nat and "hairpin_by_external" in nat


def test_hairpin_fallback_keeps_the_profiles_port_choice():
    random = rendered("napt-random", lan_net="10.1.0.0/24", hairpin="wan")["lab_nat"]
    assert (f'oifname "lan" ct status dnat ip saddr 10.1.0.0/24 snat ip to {WAN} '
            "random,fully-random;") in random
    sequential = rendered("napt-sequential", lan_net="10.1.0.0/24", hairpin="wan")["lab_nat"]
    assert sequential.count("numgen inc mod 4096") == 4         # tcp, udp; out and hairpin


@pytest.mark.parametrize("kwargs", [dict(hairpin="wan"),
                                    dict(hairpin="loop", lan_net="10.1.0.0/24"),
                                    dict(frag_needed="maybe")])
def test_bad_rule_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        gateway_tables(PROFILES["nat"], "wan", "lan", WAN, **kwargs)
    with pytest.raises(ValueError):
        gateway_tables(PROFILES["open"], "wan", "lan", WAN, lan_net="10.1.0.0/24", hairpin="wan")


def test_mss_clamping_and_frag_needed_tables():
    tables = rendered("nat", clamp_mss=True, frag_needed="drop")
    assert tables["lab_mss"] == (
        "table inet lab_mss { chain forward { type filter hook forward priority -150; "
        "policy accept; tcp flags syn tcp option maxseg size set rt mtu; }; }")
    drop = "icmp type destination-unreachable icmp code frag-needed counter drop;"
    assert tables["lab_pmtu"].count(drop) == 2
    assert "hook forward" in tables["lab_pmtu"] and "hook output" in tables["lab_pmtu"]
    assert "lab_mss" not in rendered("nat") and "lab_pmtu" not in rendered("nat")


def test_core_drops_frag_needed_on_the_sites_link_and_about_its_addresses():
    assert core_tables("a", "sa", "198.51.100.16/28", "pass") == []
    (table,) = core_tables("a", "sa", "198.51.100.16/28", "drop")
    text = table.render()
    assert table.name == "lab_pmtu_a" and table.family == "inet"
    frag = "icmp type destination-unreachable icmp code frag-needed"
    assert f'iifname "sa" {frag} counter drop;' in text
    assert f'oifname "sa" {frag} counter drop;' in text
    # the quoted IP header's destination: 198.51.100.16/28
    assert f"{frag} @th,192,32 & 0xfffffff0 == 0xc6336410 counter drop;" in text
    with pytest.raises(ValueError):
        core_tables("a", 'sa"; flush ruleset', "203.0.113.10/32", "drop")


def test_map_table_renders_maps_before_chains_and_refuses_injection():
    t = MapTable("lab_x", (Chain("c", "prerouting", ("accept",)),),
                 maps=(Map("m", "inet_service", "inet_service", "1 : 2"),))
    assert t.render() == ("table ip lab_x { map m { type inet_service : inet_service; "
                          "elements = { 1 : 2 }; }; chain c { type filter hook prerouting "
                          "priority 0; policy accept; accept; }; }")
    assert MapTable("lab_y", maps=(Map("m", "inet_service", "inet_service"),)).render() == (
        "table ip lab_y { map m { type inet_service : inet_service; }; }")
    for bad in (Map("m;", "inet_service", "inet_service"), Map("m", "x; flush", "y"),
                Map("m", "inet_service", "inet_service", "1 : 2 }; flush ruleset")):
        with pytest.raises(ValueError):
            bad.render()


@pytest.mark.parametrize("kwargs, message", [
    (dict(a="nat", hosts={"z": 2}), "not a site of this lab"),
    (dict(a="nat", hosts=0), "hosts for 'a' must be 1..8"),
    (dict(a="nat", hosts={"a": 9}), "hosts for 'a' must be 1..8"),
    (dict(a="nat", hosts={"a": True}), "hosts for 'a' must be 1..8"),
    (dict(a="nat", hairpin={"a": "mirror"}), "unknown hairpin mode 'mirror'"),
    (dict(a="firewall", hosts=2, hairpin="wan"), "needs a single NAT gateway"),
    (dict(a="cgn", hairpin="lan"), "needs a single NAT gateway"),
    (dict(a="nat", mtu={"a": 575}), r"mtu for 'a' must be 576..9000"),
    (dict(a="nat", wan_mtu=9001), r"mtu for 'a' must be 576..9000"),
    (dict(a="nat", frag_needed={"a": "blackhole"}), "frag_needed for 'a' must be one of"),
    (dict(a="nat", port_range={"a": (1023, 2000)}), "must lie in 1024..65535"),
    (dict(a="nat", port_range={"a": "40000"}), r"is \(low, high\)"),
    (dict(a="nat", hosts={"a": 3}, a3="open"), "host a3 has the name of site a3"),
    (dict(a="nat", v6={"a": "nat44"}), "unknown IPv6 profile 'nat44'"),
    (dict(a="cgn", v6="firewall"), "cgn site's IPv6 is not modelled"),
    (dict(a="nat", v4=False), "without IPv4 needs an IPv6 profile"),
    (dict(a="nat", v6="open", v4={"a": "no"}), "v4 for 'a' is True or False"),
])
def test_lab_refuses_bad_topology_settings(kwargs, message):
    with pytest.raises(LabError, match=message):
        Lab(**kwargs)


def test_lab_names_hosts_and_accepts_one_value_for_every_site():
    lab = Lab(a="nat", b="open", hosts={"a": 3}, mtu=1400, port_range=[40000, 40063],
              hairpin={"a": "wan"})
    assert lab.host_names == {"a": ["a", "a2", "a3"], "b": ["b"]}
    assert lab.mtu == {"a": 1400, "b": 1400} and lab.wan_mtu == {"a": None, "b": None}
    assert lab.port_range == {"a": (40000, 40063), "b": (40000, 40063)}
    assert lab.hairpin == {"a": "wan", "b": "off"} and lab.frag_needed["b"] == "pass"


def test_ipv6_profiles_filter_in_their_own_table_beside_ipv4s():
    from fastpunch.lab.profiles import PROFILES, gateway_tables, v6_tables

    assert v6_tables("open", "wan", "lan") == []
    fw = v6_tables("firewall", "wan", "lan")[0].render()
    assert fw.startswith("table ip6 lab_filter6") and "ct state established,related accept" in fw
    assert 'iifname "lan" accept' in fw and "counter drop" in fw and "reset" not in fw
    rst = v6_tables("firewall-rst", "wan", "lan")[0].render()
    assert "tcp flags & (syn | ack) == syn counter reject with tcp reset" in rst
    # the IPv4 profile's filter no longer touches IPv6 (it was an inet table)
    v4 = [t for t in gateway_tables(PROFILES["nat"], "wan", "lan", "203.0.113.10")
          if t.name == "lab_filter"][0]
    assert v4.render().startswith("table ip lab_filter")
    with pytest.raises(ValueError):
        v6_tables("nat44", "wan", "lan")
