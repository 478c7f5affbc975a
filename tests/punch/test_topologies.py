"""Candidates on the networks no two-site lab models: devices on one LAN
(with and without hairpinning), endpoint-independent port-changing NATs on
both sides, several cameras and viewers behind one NAT at once with
colliding ports, a 1280-byte link whose ICMP "fragmentation needed" is
dropped, and a peer that dies mid-attempt. Each: direct (or a clean end),
intact data, the winning candidate pair and the packet counts from the
report."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from fastpunch.lab import Lab
from tests.conftest import require_root

from .conftest import connect_pair, tables_in
from .harness import LabCCS
from .test_punch import exchange

pytestmark = pytest.mark.lab


@contextlib.contextmanager
def deployed(tmp_path, devices: dict, over: dict = None, **lab_kw):
    """A lab (``lab_kw``), a CCS, and ``devices`` {name: (host, may_reach)}
    logged in (over IPv4, or the family ``over`` names for a device) and
    done gathering (natcheck's evidence in hand)."""
    require_root("a punching lab test")
    over = over or {}
    with Lab(**lab_kw) as lab:
        ccs = LabCCS(lab, str(tmp_path))
        try:
            for name, (_, reach) in devices.items():
                ccs.enroll(name, *reach)
            out = {name: ccs.device(host, name, over=over.get(name, 4))
                   for name, (host, _) in devices.items()}
            for loop, dev in out.values():
                loop.run(dev.ready(15))
            try:
                yield lab, ccs, out
            finally:
                for loop, dev in out.values():
                    loop.run(dev.close())
        finally:
            ccs.close()


def connect(devs: dict, a: str, b: str, strategies=None):
    (la, da), (lb, db) = devs[a], devs[b]
    accepting = lb.submit(db.accept(strategies=strategies, peer=a))
    ca = la.run(da.connect(b, strategies=strategies), 60)
    return ca, accepting.result(60)


@pytest.mark.parametrize("hairpin", ["off", "wan", "lan"])
def test_devices_on_one_lan_go_direct_over_the_lan_in_a_few_packets(tmp_path, hairpin):
    # the commonest case for a home camera: camera and phone behind one
    # gateway. Before candidates, the SYNs went to the gateway's public
    # address, its kernel reset each, and the storm of resends (52,000 to
    # 101,000 SYNs a side) ended on the relay after 8.5 s.
    devices = {"cam": ("a", ("phone",)), "phone": ("a2", ())}
    with deployed(tmp_path, devices, a="nat", hosts={"a": 2}, hairpin={"a": hairpin}) as \
            (lab, ccs, devs):
        for _ in range(3):
            ca, cb = connect(devs, "cam", "phone")
            lines = ca.report.lines() + cb.report.lines()
            assert (ca.path, cb.path) == ("direct", "direct"), lines
            assert ca.report.pair.startswith("host-host"), lines
            assert cb.report.pair.startswith("host-host"), lines
            # the pair went on the LAN: both ends of the socket are LAN addresses
            assert ca.sock.getpeername()[0] == lab.host("a2").addr
            assert cb.sock.getpeername()[0] == lab.host("a").addr
            assert ca.report.sent < 20 and cb.report.sent < 20, lines
            d = exchange(ca.sock, cb.sock, 8 << 20)
            assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
            ca.close(), cb.close()
        assert ccs.server.relay.bytes_total == 0
        assert tables_in(lab, "a") == [] and tables_in(lab, "a2") == []


def test_endpoint_independent_port_changing_napts_on_both_sides_go_direct_without_spray(tmp_path):
    # natcheck sees one other external port per local port, for every
    # destination; the reflexive probe of the very punch port gives the port
    # its NAT will use toward the peer: a plain crafted open, nothing sprayed
    devices = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
    with deployed(tmp_path, devices, a="napt-ei", b="napt-ei") as (lab, ccs, devs):
        for name in ("cam", "viewer"):
            report = devs[name][1].natcheck_result
            assert (report["mapping"], report["nat"]) == ("independent", "napt-ei"), report
        for _ in range(3):
            ca, cb = connect(devs, "cam", "viewer")
            lines = ca.report.lines() + cb.report.lines()
            assert (ca.path, ca.strategy, cb.path, cb.strategy) == \
                ("direct", "symmetric", "direct", "symmetric"), lines
            assert [a.strategy for a in ca.report.attempts] == ["symmetric"], lines
            assert ca.report.pair.startswith("srflx-srflx"), lines
            # the ports were translated: the peer is not at our local port
            assert ca.sock.getpeername()[1] != cb.sock.getsockname()[1]
            d = exchange(ca.sock, cb.sock, 4 << 20)
            assert d["fwd-sent"] == d["fwd-got"]
            ca.close(), cb.close()
        assert ccs.server.relay.bytes_total == 0


def test_several_cameras_and_viewers_behind_one_nat_each_at_once_with_colliding_ports(tmp_path):
    # three hosts a side sharing a NAT and one narrow ephemeral range: their
    # probes and punches collide on ports, and the NAT translates some
    pairs = [(f"cam{i}", f"view{i}") for i in (1, 2, 3)]
    devices = {}
    for i, (cam, view) in enumerate(pairs):
        devices[cam] = ("a" if i == 0 else f"a{i + 1}", (view,))
        devices[view] = ("b" if i == 0 else f"b{i + 1}", ())
    narrow = (40000, 40063)
    with deployed(tmp_path, devices, a="nat", b="nat", hosts={"a": 3, "b": 3},
                  port_range={"a": narrow, "b": narrow}) as (lab, ccs, devs):
        collided = 0
        for _ in range(3):
            futures = []
            for cam, view in pairs:
                (lb, db), (la, da) = devs[view], devs[cam]
                futures.append((lb.submit(db.accept(peer=cam)),
                                la.submit(da.connect(view))))
            conns = [(fa.result(60), fb.result(60)) for fb, fa in futures]
            for ca, cb in conns:
                lines = ca.report.lines() + cb.report.lines()
                assert (ca.path, cb.path) == ("direct", "direct"), lines
                d = exchange(ca.sock, cb.sock, 1 << 20)
                assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
                collided += sum("collided" in what or "came out as" in what
                                for c in (ca, cb) for _, what in c.report.history)
            for ca, cb in conns:
                ca.close(), cb.close()
        assert ccs.server.relay.bytes_total == 0
        assert collided, "no port collided: the test did not test what it is for"


def test_a_1280_byte_link_with_frag_needed_dropped_carries_64_mib(tmp_path):
    # PPPoE, tunnels, mobile: a small link next to the device, and the ICMP
    # that would say so dropped. The crafted SYN announces the route's MSS
    # (1240), as the kernel's own would; with 1460 the stream stalled empty.
    devices = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
    with deployed(tmp_path, devices, a="nat", b="nat", mtu={"a": 1280},
                  frag_needed={"a": "drop", "b": "drop"}) as (lab, ccs, devs):
        ca, cb = connect(devs, "cam", "viewer")
        assert (ca.path, cb.path) == ("direct", "direct"), ca.report.lines()
        # what each side's kernel socket uses: b sends at most 1240 bytes a
        # segment toward a (a's SYN said so), a's own MSS is the route's
        assert cb.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1240 - 12
        assert ca.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1240
        d = exchange(cb.sock, ca.sock, 64 << 20)          # toward the small link
        assert d["fwd-sent"] == d["fwd-got"] and d["back-sent"] == d["back-got"]
        ca.close(), cb.close()


def test_a_peer_that_dies_mid_attempt_stops_the_other_side_within_a_second(tmp_path):
    # the viewer takes the rendezvous and dies (its CCS connection is gone,
    # as when its process is killed) without sending a segment: the CCS
    # tells the camera, which stops at once instead of running its plan out
    # and waiting at the relay (31 s before)
    devices = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
    with deployed(tmp_path, devices, a="nat", b="napt-random") as (lab, ccs, devs):
        (la, cam), (lb, viewer) = devs["cam"], devs["viewer"]
        died = []

        async def take_and_die():
            async for offer in viewer.incoming():
                info, gathered = await viewer.next_info()
                await offer.answer(info)
                died.append(time.monotonic())
                viewer._writer.transport.abort()         # the process is gone
                return

        dying = lb.submit(take_and_die())
        began = time.monotonic()
        with pytest.raises(Exception) as err:
            la.run(cam.connect("viewer"), 60)
        ended = time.monotonic()
        dying.result(10)
        assert getattr(err.value, "reason", "") == "peer-gone", err.value
        assert ended - died[0] < 1.0, (ended - died[0], err.value.report.lines())
        relay = [a for a in err.value.report.attempts if a.strategy == "relay"]
        assert not relay or not relay[0].ok
        assert ended - began < 5


def test_a_side_that_gives_up_tells_the_peer_through_the_ccs(tmp_path):
    # Abandon: the camera cancels its connect() mid-attempt; the viewer hears
    # of it (PeerLeft) and stops too
    devices = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
    with deployed(tmp_path, devices, a="nat", b="napt-random") as (lab, ccs, devs):
        (la, cam), (lb, viewer) = devs["cam"], devs["viewer"]
        cam.nat = viewer.nat = "unknown"          # no evidence: a race that cannot win
        accepting = lb.submit(viewer.accept())
        connecting = la.submit(cam.connect("viewer"))
        time.sleep(0.5)                            # both are punching now
        connecting.cancel()
        cancelled = time.monotonic()
        with pytest.raises(Exception) as err:
            accepting.result(10)
        assert getattr(err.value, "reason", "") == "peer-gone", err.value
        assert time.monotonic() - cancelled < 1.0
