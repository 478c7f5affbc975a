"""Streams on gateways that forget idle flows, and paths that die: what
fastpunch.liveness promises, in the lab, with the devices' own
connections (direct and relayed) and the CCS's advertised period.

* Gateways whose established-TCP timeout is 25 s on both sides and a
  stream idle for 60 s: with the keepalive every connection is handed out
  with, direct and relayed streams carry data both ways afterwards; the same
  direct stream with keepalive turned off does not (the issue's report,
  kept as the control: it rests on what the lab's gateways do, as most
  real ones do, with a segment from outside for a flow they forgot: no
  state, so it is dropped or reset, never passed in).
* A path cut mid-stream (a gateway that drops everything between the two
  sides): each side gets PathLost, or the relay's end of stream, within the
  stated bound instead of hanging."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from fastpunch import liveness
from fastpunch.liveness import Keepalive, PathLost
from fastpunch.proto.channel import ChannelViolation

from .test_topologies import connect, deployed

pytestmark = pytest.mark.lab

DEVICES = {"cam": ("a", ("viewer",)), "viewer": ("b", ())}
SLACK = 2.0


def secured(ca, cb):
    """The secure channel over both ends (handshakes at once)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", cb.secure()))
    t.start()
    sa = ca.secure()
    t.join(20)
    return sa, out["b"]


def carries(src, dst, size: int, timeout: float) -> bool:
    """size random bytes src -> dst, intact, within timeout."""
    payload = os.urandom(size)
    sender = threading.Thread(target=src.sendall, args=(payload,), daemon=True)
    sender.start()
    dst.sock.settimeout(timeout)
    got, h = 0, hashlib.sha256()
    try:
        while got < size:
            data = dst.recv(1 << 20)
            if not data:
                return False
            h.update(data)
            got += len(data)
    except (TimeoutError, OSError):
        return False
    finally:
        dst.sock.settimeout(None)
    return h.digest() == hashlib.sha256(payload).digest()


def evidence(lab) -> str:
    """What a failure needs to be understood: each gateway's TCP conntrack
    entries and each device's sockets and keepalive/abort counters."""
    out = []
    for where in ("gw-a", "gw-b"):
        out.append(f"{where} conntrack:\n" + lab.run(where, ["conntrack", "-L", "-p", "tcp"]).stdout)
    for where in ("a", "b"):
        out.append(f"{where} sockets:\n" + lab.run(where, ["ss", "-tinoe"]).stdout)
        out.append(f"{where} counters: " + lab.run(where, ["nstat", "-az", "TcpExtTCPKeepAlive",
                   "TcpExtTCPAbortOnTimeout", "TcpExtTCPACKSkippedSeq", "TcpExtPAWSEstab",
                   "TcpExtTCPAbortOnData", "TcpEstabResets"]).stdout)
    return "\n".join(out)


def test_idle_streams_outlive_gateways_that_forget_flows_after_25_s(tmp_path):
    with deployed(tmp_path, DEVICES, a="nat", b="nat",
                  conntrack_timeouts={"established": 25}) as (lab, ccs, devs):
        (_, cam), (_, viewer) = devs["cam"], devs["viewer"]
        assert cam.advertised_keepalive == viewer.advertised_keepalive == 10
        direct = connect(devs, "cam", "viewer")
        relayed = connect(devs, "cam", "viewer", strategies=["relay"])
        bare = connect(devs, "cam", "viewer")
        assert [c.path for c in direct + bare] == ["direct"] * 4
        assert [c.path for c in relayed] == ["relay"] * 2
        for conn in direct + relayed:
            assert conn.keepalive == Keepalive(10)            # the CCS's period
            assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        for conn in bare:
            liveness.apply(conn.sock, None)
        pairs = {name: secured(*conns) for name, conns in
                 (("direct", direct), ("relayed", relayed), ("bare", bare))}
        time.sleep(60)                  # past two gateway timeouts, nothing sent
        for name in ("direct", "relayed"):
            sa, sb = pairs[name]
            assert carries(sa, sb, 1 << 20, 15), \
                f"{name}: cam -> viewer after 60 s idle\n{evidence(lab)}"
            assert carries(sb, sa, 1 << 20, 15), \
                f"{name}: viewer -> cam after 60 s idle\n{evidence(lab)}"
        sa, sb = pairs["bare"]
        assert not carries(sa, sb, 4096, 5), "without keepalive the forgotten flow still works?"
        for conn in direct + relayed + bare:
            conn.close()


def _cut(lab, where: str, addr: str, relay: tuple) -> None:
    """In namespace ``where``, drop every forwarded packet to or from addr,
    and the relay's (not the CCS's control connections: same address)."""
    host, port = relay
    drops = (f"  ip saddr {addr} drop\n  ip daddr {addr} drop\n"
             f"  ip saddr {host} tcp sport {port} drop\n"
             f"  ip daddr {host} tcp dport {port} drop\n")
    rules = ("table inet cut {\n chain f { type filter hook forward priority -300;\n"
             f"{drops} }}\n}}\n")
    lab.run(where, ["nft", "-f", "-"], input=rules, text=True, check=True)


def _first_error(sock_of, timeout: float):
    """(exception or None, seconds) of a recv on a secure socket."""
    t0 = time.monotonic()
    sock_of.sock.settimeout(timeout)
    try:
        sock_of.recv(1024)
        return None, time.monotonic() - t0
    except Exception as exc:
        return exc, time.monotonic() - t0


def test_a_dead_path_is_reported_in_bound_direct_and_relayed(tmp_path):
    k = Keepalive(4)                   # probes at 4, 5, 6 s; dead at the check at 7 s
    with deployed(tmp_path, DEVICES, a="nat", b="nat") as (lab, ccs, devs):
        for _, dev in devs.values():
            dev.keepalive = k
        ccs.server.relay.keepalive = k
        direct = connect(devs, "cam", "viewer")
        relayed = connect(devs, "cam", "viewer", strategies=["relay"])
        assert [c.path for c in direct] == ["direct"] * 2
        assert [c.keepalive for c in direct + relayed] == [k] * 4
        (da, db), (ra, rb) = secured(*direct), secured(*relayed)
        # gateway b loses everything between its site and the camera's
        # public address, and between its site and the relay
        _cut(lab, "gw-b", lab.sites["a"].public_addr, (ccs.addr[0], ccs.server.relay_port))
        results = {}
        threads = [threading.Thread(target=lambda n=n, s=s: results.setdefault(
            n, _first_error(s, 30))) for n, s in
            (("direct-cam", da), ("direct-viewer", db), ("relay-viewer", rb),
             ("relay-cam", ra))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        bound = k.idle_detection() + SLACK
        for name in ("direct-cam", "direct-viewer", "relay-viewer"):
            exc, took = results[name]
            assert isinstance(exc, PathLost), (name, exc)
            assert took <= bound, (name, took)
        # the camera's relay leg is healthy: the relay found the viewer's leg
        # dead (its own keepalive) and ended the camera's, which says so
        exc, took = results["relay-cam"]
        assert isinstance(exc, ChannelViolation) and exc.code == "truncated", exc
        assert took <= bound + SLACK, took
        for conn in direct + relayed:
            conn.close()
