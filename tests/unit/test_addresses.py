"""IPv6 beside IPv4 in the pure parts: one spelling per address, budgets
per /64, the "who am I" answer in both families, this host's IPv6 host
candidates from /proc/net/if_inet6, and a plan that an IPv6 path keeps off
the relay-only branch."""

from __future__ import annotations

import pytest

from fastpunch._addr import family, source_key, unmap
from fastpunch.netcheck.interfaces import parse_if_inet6
from fastpunch.netcheck.route import HEADERS, HEADERS6, MIN_MSS, mss_toward, path_mtu
from fastpunch.proto import candidates as cands
from fastpunch.proto.candidates import Candidate
from fastpunch.proto.kinds import CandidateKind as K
from fastpunch.proto.plan import plan, relay_first_helps
from fastpunch.proto.probe import parse_reply, reply_of
from fastpunch.proto.wire import NextInfo


def test_a_dual_stack_socket_spelling_is_the_plain_ipv4_address():
    assert unmap("::ffff:192.0.2.7") == "192.0.2.7"
    assert unmap("2001:DB8:0:0::1") == "2001:db8::1"
    assert unmap("fe80::1%eth0") == "fe80::1%eth0"
    assert unmap("not an address") == "not an address"
    assert family("::ffff:192.0.2.7") == 4 and family("2001:db8::1") == 6
    with pytest.raises(ValueError):
        family("nope")


def test_ipv6_sources_share_a_budget_per_64():
    assert source_key("2001:db8:a:b:1::1") == source_key("2001:db8:a:b:ffff::2") == \
        "2001:db8:a:b::/64"
    assert source_key("2001:db8:a:c::1") != source_key("2001:db8:a:b::1")
    assert source_key("::ffff:198.51.100.3") == "198.51.100.3"


@pytest.mark.parametrize("ip, port", [("198.51.100.3", 40000), ("2001:db8::5", 1)])
def test_the_who_am_i_answer_round_trips_in_either_family(ip, port):
    data = reply_of(ip, port)
    assert len(data) == (6 if "." in ip else 18)
    assert parse_reply(data) == (ip, port)


@pytest.mark.parametrize("size", [0, 5, 7, 17, 19])
def test_a_who_am_i_answer_of_another_length_is_refused(size):
    with pytest.raises(ValueError):
        parse_reply(bytes(size))


IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000a00010000000000000010 02 40 00 80     eth0
20010db8000a0001aaaa000000000077 02 40 00 01     eth0
fe800000000000000000000000000001 02 40 20 80     eth0
20010db8000a00010000000000000099 02 40 00 c0     eth0
20010db8000a00010000000000000098 02 40 00 20     eth0
20010db8000a00010000000000000097 02 40 00 08     eth0
fd000000000000000000000000000005 03 40 00 80    wlan0
short line
zz010db8000a00010000000000000010 02 40 00 80     eth0
"""


def test_host_candidates6_take_usable_global_addresses_stable_ones_first():
    found = parse_if_inet6(IF_INET6)
    # loopback, link-local, tentative (c0), deprecated (20), DAD-failed (08)
    # and malformed lines are left out; the temporary one (01) comes last
    assert [(i.name, i.addr, i.prefix) for i in found] == [
        ("eth0", "2001:db8:a:1::10", 64), ("wlan0", "fd00::5", 64),
        ("eth0", "2001:db8:a:1:aaaa::77", 64)]


def test_the_mss_toward_an_ipv6_address_leaves_room_for_its_longer_header():
    assert HEADERS6 == HEADERS + 20
    for addr, headers in (("::1", HEADERS6), ("127.0.0.1", HEADERS)):
        try:                       # loopback's 65536 MTU here, capped
            want = min(path_mtu(addr) - headers, 65535 - headers)
        except OSError:            # (qemu-user translates no IP_MTU getsockopt: the fallback)
            want = 1500 - headers
        assert mss_toward(addr) == max(MIN_MSS, want), addr


RANDOM = dict(nat="napt-random", mapping="random")
V6 = Candidate(K.HOST, "2001:db8:1::2", 40000, cands.priority(K.HOST, 65527))


def test_an_ipv6_path_keeps_two_random_napts_off_the_relay_only_plan():
    a = NextInfo(port=1, isn=1, **RANDOM, candidates=(V6,))
    b = NextInfo(port=2, isn=2, **RANDOM, candidates=(
        Candidate(K.HOST, "2001:db8:2::2", 40001, cands.priority(K.HOST, 65527)),))
    assert plan(a, b) == ("relay",)
    assert cands.v6_path(a.candidates, b.candidates)
    assert plan(a, b, v6=True) == ("symmetric", "relay")
    assert relay_first_helps(a, b) and not relay_first_helps(a, b, v6=True)
    # a ULA on one side is no IPv6 path between sites
    ula = (Candidate(K.HOST, "fd00::2", 40001, 1, 64),)
    assert not cands.v6_path(a.candidates, ula)
    assert not cands.v6_path(a.candidates, None)


def test_dual_stack_matrix_cells_parse_and_say_what_they_expect():
    from fastpunch.lab import matrix

    units = matrix.parse_dual("napt-random/firewall:napt-random/open,nat/firewall:nat/firewall,"
                              "none/firewall:nat,napt-random/firewall:napt-random")
    assert [u.expect() for u in units] == ["v6", "direct", "relay", "relay"]
    assert units[2].name == "none/firewall:nat" and units[2].argv() == ["--dual",
                                                                         "none/firewall:nat"]
    assert units[2].login_family("cam") == 6 and units[2].login_family("viewer") == 4
    assert units[2].lab_kwargs()["v4"] == {"a": False, "b": True}
    assert units[0].lab_kwargs()["v6"] == {"a": "firewall", "b": "open"}
    for bad in ("nat", "none:nat", "nat/nat44:nat", "cgn/firewall:nat", "bogus/firewall:nat"):
        with pytest.raises(ValueError):
            matrix.parse_dual(bad)
    # the full matrix has them, and --profiles narrows them
    assert len(matrix.dual_units(matrix.all_profiles())) == 14
    assert [u.name for u in matrix.dual_units(["nat"])] == ["nat/firewall:nat/firewall",
                                                             "none/firewall:none/firewall",
                                                             "none/firewall:nat"]


def test_the_ccs_public_ipv6_setting_takes_a_global_address_only():
    from fastpunch.ccs import config

    check = config.BY_KEY["public_addr6"].check
    assert check(" [2001:DB8::1] ") == "2001:db8::1"
    for bad in ("203.0.113.1", "::ffff:203.0.113.1", "fe80::1", "nonsense", 7):
        with pytest.raises(ValueError):
            check(bad)
