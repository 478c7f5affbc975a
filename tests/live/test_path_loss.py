"""A dead path is found, and reported as PathLost, within the bounds
fastpunch.liveness states: the kernel's keepalive and user timeout on a real
TCP connection between two fresh namespaces, whose path a netfilter rule
then cuts (every packet dropped both ways, as a gateway that forgot the
flow or lost power does). Without keepalive the same cut hangs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import pytest

from fastpunch import liveness
from fastpunch._netns import inside
from fastpunch.channel import SecureSocket, secure_streams
from fastpunch.liveness import Keepalive, PathLost

pytestmark = pytest.mark.live

KEY = bytes(range(32))
SLACK = 1.5            # scheduling, the RTO granularity, the probes' own timers


def connected(veth, port: int):
    with inside(veth.ns_b):
        srv = socket.create_server((veth.addr_b, port))
    with inside(veth.ns_a):
        a = socket.create_connection((veth.addr_b, port), timeout=5)
    b, _ = srv.accept()
    srv.close()
    a.settimeout(None)
    return a, b


def secure_pair(a, b):
    """Both ends of the channel, handshake done (b's in a thread)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", SecureSocket(b, "responder", KEY)))
    t.start()
    sa = SecureSocket(a, "initiator", KEY)
    t.join(10)
    return sa, out["b"]


def cut(veth) -> None:
    """Drop every packet in and out of namespace b (its table dies with it)."""
    rules = ("table inet cut {\n"
             " chain i { type filter hook input priority -300; policy drop; }\n"
             " chain o { type filter hook output priority -300; policy drop; }\n}\n")
    subprocess.run(["ip", "netns", "exec", veth.ns_b, "nft", "-f", "-"], input=rules,
                   text=True, check=True)


def test_an_idle_stream_whose_path_dies_raises_path_lost_on_both_ends_in_bound(veth):
    k = Keepalive(2, timeout=3)
    a, b = connected(veth, 9001)
    sa, sb = secure_pair(a, b)
    for s in (sa, sb):
        liveness.apply(s.sock, k)
        s.keepalive = k
    t0 = time.monotonic()           # the bound counts from the last segment heard
    result = {}

    def wait(side, s):
        try:
            s.recv(1024)
            result[side] = ("returned", time.monotonic() - t0)
        except Exception as exc:
            result[side] = (exc, time.monotonic() - t0)

    threads = [threading.Thread(target=wait, args=(n, s)) for n, s in (("a", sa), ("b", sb))]
    time.sleep(0.5)                 # every handshake segment acknowledged: truly idle
    cut(veth)
    for t in threads:
        t.start()
    for t in threads:
        t.join(k.idle_detection() + 10)
    for side in "ab":
        exc, took = result[side]
        assert isinstance(exc, PathLost), (side, exc)
        assert "keepalive every 2 s" in str(exc)
        assert took <= k.idle_detection() + SLACK, (side, took)
    sa.sock.close(), sb.sock.close()


def test_a_sending_stream_whose_path_dies_raises_path_lost_in_the_user_timeout(veth):
    k = Keepalive(10, timeout=3)          # the probes would come later: the user timeout rules
    a, b = connected(veth, 9002)
    sa, sb = secure_pair(a, b)
    liveness.apply(sa.sock, k)
    sa.keepalive = k
    chunk = bytes(64 << 10)
    sa.sendall(chunk)
    assert len(sb.recv(1 << 20)) > 0
    cut(veth)
    t0 = time.monotonic()
    with pytest.raises(PathLost):
        while time.monotonic() - t0 < 30:        # bounded: the send buffer fills, then blocks
            sa.sendall(chunk)
    took = time.monotonic() - t0
    assert took <= k.busy_detection() + SLACK, took
    sa.sock.close(), sb.sock.close()


def test_the_asyncio_face_raises_path_lost_too(veth):
    k = Keepalive(2, timeout=3)
    a, b = connected(veth, 9003)

    async def main():
        a.setblocking(False)
        b.setblocking(False)
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        (sra, swa), (srb, swb) = await asyncio.gather(
            secure_streams(ra, wa, "initiator", KEY, keepalive=k),
            secure_streams(rb, wb, "responder", KEY, keepalive=k))
        liveness.apply(a, k)
        cut(veth)
        t0 = time.monotonic()
        with pytest.raises(PathLost):
            await asyncio.wait_for(sra.read(10), k.idle_detection() + 10)
        took = time.monotonic() - t0
        wa.transport.abort(), wb.transport.abort()
        return took

    took = asyncio.run(main())
    assert took <= k.idle_detection() + SLACK


def test_without_keepalive_the_same_cut_hangs(veth):
    # the report, kept as the control: no keepalive, no user
    # timeout, and the idle end waits on (here until a recv timeout ends it)
    k = Keepalive(2, timeout=3)
    a, b = connected(veth, 9004)
    sa, sb = secure_pair(a, b)
    liveness.apply(sa.sock, None)
    cut(veth)
    sa.sock.settimeout(k.idle_detection() + 3)
    with pytest.raises(TimeoutError) as err:
        sa.recv(1024)
    assert not isinstance(err.value, PathLost) and err.value.errno is None
    sa.sock.close(), sb.sock.close()


def uncut(veth) -> None:
    subprocess.run(["ip", "netns", "exec", veth.ns_b, "nft", "delete", "table", "inet", "cut"],
                   check=True)


@pytest.mark.parametrize("keepalive,survives", [
    (Keepalive(2), True),               # the default timeout: 5 s, probes at 2, 3, 4 s
    (Keepalive(2, timeout=3), False),   # a timeout under period + interval: the first loss ends it
])
def test_an_idle_stream_outlives_two_lost_probes_with_the_default_timeout(veth, keepalive,
                                                                          survives):
    # a lossy Wi-Fi or mobile path drops a probe now and then: the default
    # timeout must not end an idle stream on the first one. Here both
    # sides' probes at 2 and 3 s are lost (every packet dropped from 1.3 to
    # 3.6 s after the last segment heard); the probe at 4 s gets through.
    k = keepalive
    a, b = connected(veth, 9005 if survives else 9006)
    sa, sb = secure_pair(a, b)
    for s in (sa, sb):
        liveness.apply(s.sock, k)
        s.keepalive = k
    t0 = time.monotonic()
    time.sleep(1.3)
    cut(veth)
    time.sleep(3.6 - (time.monotonic() - t0))
    uncut(veth)
    time.sleep(6.0 - (time.monotonic() - t0))    # past the bound a lost first probe gives
    alive = []
    for src, dst in ((sa, sb), (sb, sa)):
        try:
            src.sendall(b"after the loss")
            dst.sock.settimeout(3)
            alive.append(dst.recv(64) == b"after the loss")
        except (PathLost, OSError):
            alive.append(False)
    assert alive == [survives] * 2, (k.describe(), alive)
    sa.sock.close(), sb.sock.close()
