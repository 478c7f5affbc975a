"""Resumable sessions between lab devices: a gateway "reboots" (its
conntrack table is flushed) under a 256 MiB direct stream.

* A gateway that comes back without picking up mid-stream flows
  (nf_conntrack_tcp_loose=0: the packets of a flow it has no entry for are
  invalid to it, as to a NAT whose fresh mapping no longer matches): the
  transport dies, and the session goes on over a new one that a fresh
  rendezvous through the CCS brings (a new punch, or the relay).
* A Linux gateway as configured by default (loose=1) re-creates the mapping
  from the next outbound segment, on the same port: the transport lives,
  and the session needs no resume. Either way every byte arrives once and
  in order."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from .test_topologies import connect, deployed

pytestmark = pytest.mark.lab

DEVICES = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
TOTAL = 256 << 20
CHUNK = 1 << 20


def pattern(total: int) -> bytes:
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(32768))
    return (block * (total // len(block) + 1))[:total]


def resumable_pair(ca, cb):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("b", cb.resumable()))
    t.start()
    ra = ca.resumable()
    t.join(30)
    return ra, out["b"]


def receive_all(rs, out: dict) -> None:
    try:
        h, n = hashlib.sha256(), 0
        while True:
            data = rs.recv(CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
        out.update(digest=h.digest(), n=n)
        rs.close()
    except Exception as exc:          # reported by the test
        out["error"] = exc


def loose(lab, gw: str, value: int) -> None:
    lab.run(gw, ["sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_tcp_loose={value}"],
            check=True)


@pytest.mark.parametrize("gateways,pickup", [(("gw-a",), 0), (("gw-a", "gw-b"), 0),
                                             (("gw-a", "gw-b"), 1)],
                         ids=["one-strict", "both-strict", "both-loose"])
def test_a_gateway_reboot_mid_stream_and_256_mib_arrive_intact(tmp_path, gateways, pickup):
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        for gw in gateways:
            loose(lab, gw, pickup)
        ca, cb = connect(devs, "cam", "viewer")
        assert (ca.path, cb.path) == ("direct", "direct")
        cam, viewer = resumable_pair(ca, cb)
        got: dict = {}
        reader = threading.Thread(target=receive_all, args=(viewer, got), daemon=True)
        reader.start()
        data = pattern(TOTAL)
        view = memoryview(data)
        t0 = time.monotonic()
        for off in range(0, TOTAL, CHUNK):
            if time.monotonic() - t0 > 240:                     # bounded
                break
            cam.sendall(view[off:off + CHUNK])
            if off == 64 << 20:
                for gw in gateways:
                    lab.conntrack_flush(gw)
        cam.close_write()
        while cam.recv(CHUNK):                                  # until the viewer's end
            pass
        cam.close()
        reader.join(120)
        assert "error" not in got, got.get("error")
        assert got["n"] == TOTAL and got["digest"] == hashlib.sha256(data).digest()
        history = [(e.what, e.detail) for e in cam.history]
        if pickup:                      # the gateway picked the flow up again
            assert cam.resumes == viewer.resumes == 0, history
            return
        assert cam.resumes >= 1 and viewer.resumes >= 1, history
        assert history[0] == ("established", f"direct ({ca.strategy})")
        lost = [d for w, d in history if w == "lost"]
        resumed = [e for e in cam.history if e.what == "resumed"]
        assert lost and resumed, history
        # the path after: whatever the fresh rendezvous found (direct or relay)
        assert any(w == "resume" and d.split()[0] in ("direct", "relay") for w, d in history)
