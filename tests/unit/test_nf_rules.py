"""nftables rules as data: rendering and round trips, no root needed."""

import pytest

from fastpunch import netfilter
from fastpunch.netfilter import Chain, RstSuppression, Table


def test_rst_rule_is_scoped_to_the_flow_and_spares_the_engine():
    rule = RstSuppression(40000, "198.51.100.2", 443).rule()
    assert rule == ("ip daddr 198.51.100.2 tcp sport 40000 tcp dport 443 "
                    "tcp flags & rst == rst meta mark != 0x46500001 counter drop")


def test_rst_rule_wildcards_and_no_exemption():
    assert RstSuppression(7, exempt_mark=None).rule() == (
        "tcp sport 7 tcp flags & rst == rst counter drop")


@pytest.mark.parametrize("kwargs", [dict(local_port=0), dict(local_port=70000),
                                    dict(local_port=1, peer_port=0),
                                    dict(local_port=1, peer="not-an-address")])
def test_rst_rule_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        RstSuppression(**kwargs).rule()


def test_table_renders_one_line_ruleset_with_required_semicolons():
    t = Table("fastpunch_1_x0", (Chain("out", "output", ("tcp dport 1 drop", "accept")),))
    # nft syntax: in a one-line ruleset every closing brace needs a ';' before the next one
    assert t.render() == ("table ip fastpunch_1_x0 { chain out { type filter hook output "
                          "priority 0; policy accept; tcp dport 1 drop; accept; }; }")
    assert t.apply_commands().splitlines()[:2] == [
        "add table ip fastpunch_1_x0", "delete table ip fastpunch_1_x0"]


def test_netdev_chain_names_its_device_and_refuses_odd_names():
    c = Chain("drop_all", "ingress", (), policy="drop", device="veth0")
    assert c.render() == ('chain drop_all { type filter hook ingress device "veth0" priority 0; '
                          'policy drop; }')
    with pytest.raises(ValueError):
        Chain("c", "ingress", device='x"; flush ruleset').render()


def test_table_round_trips_through_dict():
    t = Table("fastpunch_1_x1", (Chain("pre", "prerouting", ("drop",), type="filter",
                                       priority=-150, policy="drop"),), family="inet")
    assert Table.from_dict(t.as_dict()) == t


@pytest.mark.parametrize("name", ["", "1abc", "a b", "x;flush ruleset", "a" * 65])
def test_names_that_could_inject_are_refused(name):
    with pytest.raises(ValueError):
        Table(name).render()


def test_owned_names_carry_the_pid():
    import os

    name = netfilter.owned_table_name("rst")
    ns = os.stat("/proc/self/ns/pid").st_ino
    assert name.startswith(f"fastpunch_{os.getpid()}_ns{ns}_rst")


def test_missing_libnftables_names_the_package(monkeypatch):
    monkeypatch.setattr(netfilter, "_lib", None)
    monkeypatch.setattr(netfilter, "_LIB_NAMES", ("libnftables-does-not-exist.so.9",))
    with pytest.raises(netfilter.KernelFeatureMissing, match="apt-get install libnftables1"):
        netfilter.Nftables().run("list tables")


def test_a_zombie_counts_as_dead():
    import os
    import subprocess
    import sys
    import time

    from fastpunch._proc import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen(["sh", "-c", "exit 0"])     # (any child: a native one under qemu-user too)
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:   # exits, not yet reaped
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    assert os.path.exists(f"/proc/{child.pid}")                   # still a zombie
    child.wait()
    assert not pid_alive(child.pid)
