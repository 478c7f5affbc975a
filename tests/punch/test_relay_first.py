"""Relay first, then direct (issue 15): ``connect(relay_first=True)``
returns once both sides are on the CCS relay; the punch goes on behind it,
and the resumable session moves to the direct path when it is made,
without losing, duplicating or reordering a byte; then the relay is let go
(its counters stop) and every later byte goes direct."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from .test_session_resume import pattern, receive_all, resumable_pair
from .test_topologies import deployed

pytestmark = pytest.mark.lab

DEVICES = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}


def relay_first_pair(devs, a: str, b: str, relay_first=True, **kw):
    (la, da), (lb, db) = devs[a], devs[b]
    accepting = lb.submit(db.accept(peer=a))
    ca = la.run(da.connect(b, relay_first=relay_first, **kw), 60)
    return ca, accepting.result(60)


def moved(rs) -> bool:
    return any(e.what == "resumed" for e in rs.history)


def wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_relay_first_moves_a_live_stream_to_direct_and_lets_the_relay_go(tmp_path):
    total = 64 << 20
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        relay = ccs.server.relay
        t0 = time.monotonic()
        ca, cb = relay_first_pair(devs, "cam", "viewer")
        # both on the relay at once, both with the punch behind them
        assert (ca.path, cb.path) == ("relay", "relay"), ca.report.lines() + cb.report.lines()
        assert ca.upgrade is not None and cb.upgrade is not None
        cam, viewer = resumable_pair(ca, cb)
        got: dict = {}
        reader = threading.Thread(target=receive_all, args=(viewer, got), daemon=True)
        reader.start()
        data = pattern(total)
        view = memoryview(data)
        first = 1 << 20
        cam.sendall(view[:first])          # the first MiB: on the relay, most likely
        off = first
        while off < total:                 # the rest while the session moves
            cam.sendall(view[off:off + (1 << 20)])
            off += 1 << 20
        assert wait_until(lambda: moved(cam) and moved(viewer), 30), \
            (cam.history, viewer.history)
        assert wait_until(lambda: not relay.pairs, 10), "the relay pair was not released"
        relayed = relay.bytes_total
        assert relayed > 0                 # it did carry the start
        more = pattern(8 << 20)
        cam.sendall(more)                  # only direct from here on
        cam.close(30)
        reader.join(120)
        assert "error" not in got, got.get("error")
        want = hashlib.sha256(data + more).digest()
        assert got["n"] == total + len(more) and got["digest"] == want
        assert relay.bytes_total == relayed, "bytes went through the relay after the move"
        for rs in (cam, viewer):
            whats = [(e.what, e.detail) for e in rs.history]
            assert whats[0] == ("established", "relay (relay)"), whats
            # "moved", or (the peer moved first and let the relay go) the
            # relay's end: either way the next transport is the direct one
            assert whats[1][0] == "lost" and whats[2][0] == "resume", whats
            assert whats[2][1].startswith("direct"), whats
        assert ("lost", "moved") in [(e.what, e.detail) for e in cam.history + viewer.history]
        assert time.monotonic() - t0 < 90


def test_a_relay_first_connection_used_without_a_session_stays_on_the_relay(tmp_path):
    # secure() (or the bare socket) cannot move: the punch behind is dropped
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        ca, cb = relay_first_pair(devs, "cam", "viewer")
        assert (ca.path, cb.path) == ("relay", "relay")
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("b", cb.secure()))
        t.start()
        sa = ca.secure()
        t.join(30)
        sb = out["b"]
        assert ca.upgrade is None and cb.upgrade is None
        sa.sendall(b"x" * 100000)
        sa.close_write()
        n = 0
        while True:
            part = sb.recv(65536)
            if not part:
                break
            n += len(part)
        assert n == 100000
        assert ccs.server.relay.bytes_total >= 100000
        sa.close(), sb.close()
        ca.close(), cb.close()


def test_relay_first_with_the_relay_only_allowed_stays_on_the_relay(tmp_path):
    # nothing direct in the plan: no upgrade comes, the session stays, and
    # its history says why it did not move
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        (la, da), (lb, db) = devs["cam"], devs["viewer"]
        accepting = lb.submit(db.accept(peer="cam", strategies=["relay"]))
        ca = la.run(da.connect("viewer", relay_first=True, strategies=["relay"]), 60)
        cb = accepting.result(60)
        assert (ca.path, cb.path) == ("relay", "relay")
        cam, viewer = resumable_pair(ca, cb)
        got: dict = {}
        reader = threading.Thread(target=receive_all, args=(viewer, got), daemon=True)
        reader.start()
        data = pattern(4 << 20)
        cam.sendall(data)
        cam.close(30)
        reader.join(60)
        assert got.get("digest") == hashlib.sha256(data).digest(), got
        assert not moved(cam)
        assert any(e.what == "upgrade-failed" for e in cam.history), cam.history


def test_relay_first_auto_punches_first_where_the_punch_is_fast(tmp_path):
    # two nats: nothing to guess, so "auto" is a plain punch, no relay join
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        ca, cb = relay_first_pair(devs, "cam", "viewer", relay_first="auto")
        assert (ca.path, cb.path) == ("direct", "direct")
        assert ca.upgrade is None and ccs.server.relay.relays_total == 0
        ca.close(), cb.close()
