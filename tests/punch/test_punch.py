"""Direct connections in the lab: each strategy where it should work and where
it should not, the relay as the last resort, the kernel hand-off carrying data,
and nothing left behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fastpunch.punch.base import PunchFailed

from .conftest import connect_pair, tables_in

pytestmark = pytest.mark.lab


def exchange(s1, s2, size: int) -> tuple:
    """size bytes s1 -> s2 and size // 16 back; returns both (sent, received) digests."""
    s1.setblocking(True)
    s2.setblocking(True)
    out = {}

    def send(sock, n, key):
        block = os.urandom(1 << 20)
        h, sent = hashlib.sha256(), 0
        while sent < n:
            chunk = block[:min(len(block), n - sent)]
            sock.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
        sock.shutdown(1)
        out[key] = h.hexdigest()

    def recv(sock, key):
        h, buf = hashlib.sha256(), bytearray(1 << 20)
        while n := sock.recv_into(buf):
            h.update(memoryview(buf)[:n])
        out[key] = h.hexdigest()

    threads = [threading.Thread(target=send, args=(s1, size, "fwd-sent")),
               threading.Thread(target=recv, args=(s2, "fwd-got")),
               threading.Thread(target=send, args=(s2, size // 16, "back-sent")),
               threading.Thread(target=recv, args=(s1, "back-got"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


@pytest.mark.parametrize("a,b", [("nat", "nat"), ("nat-rst", "strict"), ("cgn", "firewall"),
                                 ("firewall", "firewall"), ("open", "nat")])
def test_symmetric_goes_direct_and_hands_off_to_the_kernel(lab_pair, a, b):
    with lab_pair(a, b) as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
            ("direct", "symmetric", "direct", "symmetric")
        # the same flow seen from both ends, each end a kernel socket
        la, lb = ca.sock.getsockname(), cb.sock.getsockname()
        assert ca.sock.getpeername() == (lab.sites["b"].public_addr, lb[1])   # port preserved
        nearest = "home-a" if a == "cgn" else "gw-a"
        # (the punch port's reflexive probe to the CCS has an entry of its own)
        flows = [e for e in lab.conntrack(nearest) if e["orig"][:2] == la and
                 e["orig"][2] != "203.0.113.1"]
        if lab.sites["a"].profile != "open":
            assert flows and flows[0]["state"] == "ESTABLISHED"
        digests = exchange(ca.sock, cb.sock, 32 << 20)
        assert digests["fwd-sent"] == digests["fwd-got"]
        assert digests["back-sent"] == digests["back-got"]
        assert ccs.server.relay.bytes_total == 0         # the CCS carried no byte
        ca.close(), cb.close()
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []
        assert ca.report.attempts[0].sent >= 1 and ca.report.attempts[0].seen >= 1


def test_kernel_simultaneous_open_baseline(lab_pair):
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer, strategies=["simopen"])
        assert (ca.path, ca.strategy) == ("direct", "simopen")
        d = exchange(ca.sock, cb.sock, 4 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()


def test_the_nat_method_passes_only_where_the_responder_is_unfiltered(lab_pair):
    with lab_pair("nat", "open") as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer, strategies=["nat"])
        assert (ca.path, ca.strategy, cb.strategy) == ("direct", "nat", "nat")
        d = exchange(ca.sock, cb.sock, 4 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()


def test_the_nat_method_fails_cleanly_behind_a_linux_nat(lab_pair):
    # netfilter-facts 2: the responder's opening SYN-ACK is INVALID to conntrack
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        with pytest.raises(PunchFailed) as err:
            connect_pair(cam, viewer, strategies=["nat"])
        assert err.value.reason == "no-path"
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_what_cannot_go_direct_falls_through_to_the_relay(lab_pair):
    # without natcheck's evidence (told "unknown") nobody sprays: the race of
    # the candidates fails against a random NAPT, and the relay carries
    with lab_pair("nat", "napt-random") as (lab, ccs, cam, viewer):
        cam[1].nat = viewer[1].nat = "unknown"
        ca, cb = connect_pair(cam, viewer)
        assert (ca.path, cb.path) == ("relay", "relay")
        tried = [(t.strategy, t.ok, t.reason) for t in ca.report.attempts]
        assert tried == [("symmetric", False, "timeout"), ("relay", True, "")]
        # the race did not storm meanwhile: every pair kept to its budget
        assert all(p.sent - p.replies <= 24 for p in ca.report.attempts[0].pairs)
        d = exchange(ca.sock, cb.sock, 4 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        assert ccs.server.relay.bytes_total >= 4 << 20
        ca.close(), cb.close()
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_one_gib_through_the_handed_off_connection_under_loss(lab_pair):
    with lab_pair("nat", "nat", loss=1.0) as (lab, ccs, cam, viewer):
        ca, cb = connect_pair(cam, viewer)
        assert ca.path == "direct"
        d = exchange(ca.sock, cb.sock, 1 << 30)
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        ca.close(), cb.close()


KILLED = r"""
import asyncio, sys
from fastpunch.punch.driver import Engine
flow = Engine((sys.argv[1], 45000), (sys.argv[2], 45001))
with flow.rst_suppression():
    print("table", flush=True)
    asyncio.run(flow.open(timeout=60))
"""


def test_a_process_killed_mid_handshake_leaves_nothing_after_the_next_start(lab_pair):
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        site_a, site_b = lab.sites["a"], lab.sites["b"]
        proc = lab.spawn("a", [sys.executable, "-c", KILLED, site_a.host_addr,
                               site_b.public_addr], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "table"
        assert len(tables_in(lab, "a")) == 1            # its RST suppression, mid-handshake
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert len(tables_in(lab, "a")) == 1            # a crash cannot clean up itself...
        ca, cb = connect_pair(cam, viewer)              # ...the next punch sweeps it first
        assert ca.path == "direct"
        ca.close(), cb.close()
        assert tables_in(lab, "a") == []


@pytest.mark.parametrize("a,b", [("firewall-liberal", "firewall-liberal"),
                                 ("open", "firewall-liberal"), ("open", "open")])
def test_spoof_goes_direct_where_window_tracking_is_liberal(lab_pair, a, b):
    with lab_pair(a, b) as (lab, ccs, cam, viewer):
        cam[1].nat, viewer[1].nat = a, b            # the CCS plans spoof for such a pair
        ca, cb = connect_pair(cam, viewer, strategies=["spoof"])
        assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
            ("direct", "spoof", "direct", "spoof")
        digests = exchange(ca.sock, cb.sock, 32 << 20)
        assert digests["fwd-sent"] == digests["fwd-got"]
        assert digests["back-sent"] == digests["back-got"]
        assert ccs.server.relay.bytes_total == 0
        # each side's host rewrites the flow for as long as it lives, no longer
        assert len(tables_in(lab, "a")) == 1 and len(tables_in(lab, "b")) == 1
        ca.close(), cb.close()
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_spoof_fails_cleanly_where_the_firewall_tracks_windows_strictly(lab_pair):
    # the handshake passes a default Linux firewall; data acking our own does
    # not (the entry saw nothing of ours after the first SYN): the four-message
    # check catches it on both sides alike, and the plan falls through
    with lab_pair("firewall", "firewall") as (lab, ccs, cam, viewer):
        cam[1].nat, viewer[1].nat = "firewall", "firewall"
        ca, cb = connect_pair(cam, viewer, strategies=["spoof", "simopen"])
        assert (ca.path, ca.strategy, cb.strategy) == ("direct", "simopen", "simopen")
        for conn in (ca, cb):
            spoof = conn.report.attempts[0]
            assert (spoof.strategy, spoof.ok, spoof.reason) == ("spoof", False, "data-dropped"), \
                spoof.detail + repr(spoof.events)
            assert any("[S] TTL 2" in what and "to 203.0.113.1" in what
                       for _, what in spoof.events), spoof.events
        d = exchange(ca.sock, cb.sock, 4 << 20)
        assert d["fwd-sent"] == d["fwd-got"]
        ca.close(), cb.close()
        assert tables_in(lab, "a") == [] and tables_in(lab, "b") == []


def test_a_skewed_start_toward_rst_gateways_recovers_without_the_relay(lab_pair, monkeypatch):
    """Two nat-rst gateways, no gap between opener and full SYN, and the
    accepting side 25 ms late: the connecting side's full SYN reaches the far
    gateway before that side's opener, and is answered with a RST that also
    closes our own mapping. Each side then reopens its mapping with a fresh
    opener at once, so the peer's next SYN finds it open (before that, the
    two sides' SYNs kept hitting each other's closed entries, and 3 trials
    in 10 of a zero-delay nat-rst pair with a small gap ended on the relay)."""
    from fastpunch.punch import strategy

    from .harness import start_responder_late

    monkeypatch.setattr(strategy, "FIRST_GAP", 0.0)
    start_responder_late(monkeypatch, 0.025)
    with lab_pair("nat-rst", "nat-rst") as (lab, ccs, cam, viewer):
        reopened = 0
        for _ in range(3):
            ca, cb = connect_pair(cam, viewer, strategies=["symmetric"])
            try:
                assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
                    ("direct", "symmetric", "direct", "symmetric"), ca.report.lines()
                from fastpunch.proto.punch import Backoff

                reopened += any(isinstance(e, Backoff) for c in (ca, cb)
                                for e in c.report.attempts[-1].trace)
            finally:
                ca.close(), cb.close()
        assert reopened, "the far gateway's RST never came: the test did not test anything"


def test_a_side_that_completed_on_the_peers_syn_brings_a_peer_that_missed_everything(lab_pair):
    """Each side is done as soon as the peer's SYN (with its announced ISN)
    came in and was answered, half a round trip before a SYN-ACK could.
    Here the far side learns nothing from that answer: gateway b drops the
    first SYN from a, gateway a drops every SYN-ACK a sends. a completes on
    b's SYN and hands off; b is still in SYN-SENT. a's flow then resends its
    SYN until b shows it has one (the machine's CONFIRMING), b completes on it, and
    both kernel sockets carry data. Without that resend b waits out its slot
    and fails while a holds a socket to nobody."""
    with lab_pair("nat", "nat") as (lab, ccs, cam, viewer):
        a_public = lab.sites["a"].public_addr
        drop_first_syn = (
            "table ip test_first_syn { set seen { type ipv4_addr; flags dynamic; }; "
            "chain pre { type filter hook prerouting priority -300; "
            f'iifname "wan" ip saddr {a_public} tcp flags & (syn | ack) == syn '
            "ip saddr @seen accept; "
            f'iifname "wan" ip saddr {a_public} tcp flags & (syn | ack) == syn '
            "update @seen { ip saddr } counter drop; }; }")
        drop_synacks = (
            "table ip test_no_synack { chain out_synack { type filter hook forward priority 0; "
            'oifname "wan" tcp flags & (syn | ack) == syn | ack counter drop; }; }')
        for where, ruleset in (("gw-b", drop_first_syn), ("gw-a", drop_synacks)):
            done = lab.run(where, ["nft", ruleset])
            assert done.returncode == 0, done.stderr
        ca, cb = connect_pair(cam, viewer, strategies=["symmetric"])
        try:
            assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
                ("direct", "symmetric", "direct", "symmetric"), \
                ca.report.lines() + cb.report.lines()
            counters = {w: lab.run(w, ["nft", "list", "table", "ip", t]).stdout
                        for w, t in (("gw-b", "test_first_syn"), ("gw-a", "test_no_synack"))}
            assert all("packets 0 " not in out and "packets" in out for out in counters.values()), \
                counters                          # both rules did drop something
            # a's confirmation runs after connect() returned, appending to
            # the machine's live event list (the attempt's trace): wait there
            from fastpunch.proto.punch import Completed, Confirmed, Sent

            live = ca.report.attempts[-1].trace
            for _ in range(60):
                if any(isinstance(e, Confirmed) for e in live):
                    break
                time.sleep(0.05)
            b_trace = cb.report.attempts[-1].trace
            assert [e.early for e in live if isinstance(e, Completed)] == [True], live
            assert [e.early for e in b_trace if isinstance(e, Completed)] == [True], b_trace
            done = next(i for i, e in enumerate(live) if isinstance(e, Completed))
            after = live[done:]
            assert any(isinstance(e, Sent) and e.what == "confirm" for e in after), after
            assert any(isinstance(e, Confirmed) for e in after), after
            d = exchange(ca.sock, cb.sock, 4 << 20)
            assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
            assert ccs.server.relay.bytes_total == 0
        finally:
            ca.close(), cb.close()
