"""Punching over IPv6 through stateful firewalls: two hosts with global
addresses (2001:db8::/32, RFC 3849) and no NAT, each behind the common home
router default for IPv6: inbound packets pass only when conntrack has seen
the flow leave (established/related), everything new from outside is
dropped, ICMPv6 passes (neighbour discovery). A crafted simultaneous open
(the engine, both sides SYN at once) and the kernel's own simultaneous open
must both get through; the crafted one is handed to kernel sockets with
TCP_REPAIR on IPv6 and carries data both ways; a plain connect() from one
side, the control, must not."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from fastpunch.handoff import repair_socket
from fastpunch.netfilter import Nftables
from fastpunch._netns import VethPair, inside
from fastpunch.punch.driver import Engine
from tests.conftest import require_root

pytestmark = pytest.mark.live

A, B = "2001:db8:7::1", "2001:db8:7::2"

STATEFUL_FIREWALL = """
table ip6 homefw {
  chain in {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    meta l4proto ipv6-icmp accept
    counter
  }
}
"""


@pytest.fixture
def firewalled():
    """Two namespaces joined by a veth pair, each with the firewall above;
    the namespaces (and their tables) are removed whatever the outcome."""
    require_root("an IPv6 punching test")
    with VethPair(addr_a=A, addr_b=B, prefixlen=64) as pair:
        for ns in (pair.ns_a, pair.ns_b):
            with inside(ns):
                Nftables().run(STATEFUL_FIREWALL)
        yield pair


def dropped(ns: str) -> int:
    """Packets the firewall's final counter saw (dropped by the policy)."""
    with inside(ns):
        out = Nftables().run("list chain ip6 homefw in")
    return int(out.split("counter packets ")[1].split()[0])


def both(fn_a, fn_b, timeout: float = 20.0):
    """fn_a and fn_b at once (each in its own thread, after a barrier);
    their results, or the first exception."""
    results: dict = {}
    gate = threading.Barrier(2)

    def run(key, fn):
        try:
            gate.wait(5)
            results[key] = fn()
        except BaseException as exc:          # reported below
            results[key] = exc

    threads = [threading.Thread(target=run, args=(k, f), daemon=True)
               for k, f in (("a", fn_a), ("b", fn_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a side is still running"
    for key in ("a", "b"):
        if isinstance(results[key], BaseException):
            raise results[key]
    return results["a"], results["b"]


def test_a_plain_connect_is_dropped_by_the_peers_firewall(firewalled):
    """The control: without a punch, the firewall is doing its job."""
    with inside(firewalled.ns_b):
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.bind((B, 9000))
    srv.listen(1)
    with inside(firewalled.ns_a):
        c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    c.settimeout(1.5)
    try:
        with pytest.raises((socket.timeout, TimeoutError)):
            c.connect((B, 9000))
    finally:
        c.close()
        srv.close()
    assert dropped(firewalled.ns_b) >= 1


def test_a_crafted_simultaneous_open_gets_through_and_hands_off_to_the_kernel(firewalled):
    payload = os.urandom(1 << 20)

    def side(ns, me, peer, port, peer_port, first):
        with inside(ns):
            flow = Engine((me, port), (peer, peer_port), keep=False)
            with flow, flow.rst_suppression():
                asyncio.run(flow.open(timeout=8))
                sock = repair_socket(flow.handoff_state(), late=flow.late_data)
        with sock:
            sock.settimeout(10)
            if first:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                echoed = b""
                while chunk := sock.recv(65536):
                    echoed += chunk
                return hashlib.sha256(echoed).hexdigest(), sock.family
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            sock.sendall(hashlib.sha256(got).hexdigest().encode())
            return len(got), sock.family

    (digest, fam_a), (n, fam_b) = both(
        lambda: side(firewalled.ns_a, A, B, 41000, 42000, True),
        lambda: side(firewalled.ns_b, B, A, 42000, 41000, False))
    assert n == len(payload) and fam_a == fam_b == socket.AF_INET6
    # a's side read back b's SHA-256 of what b received: the megabyte, intact
    assert digest == hashlib.sha256(hashlib.sha256(payload).hexdigest().encode()).hexdigest()


def test_the_kernels_simultaneous_open_gets_through_too(firewalled):
    def side(ns, me, peer, port, peer_port):
        with inside(ns):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((me, port))
        s.settimeout(8)
        for _ in range(8):                   # bounded: each try is one SYN exchange
            try:
                s.connect((peer, peer_port))
                break
            except (ConnectionRefusedError, ConnectionResetError):
                s.close()
                with inside(ns):
                    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((me, port))
                s.settimeout(8)
        with s:
            s.sendall(f"hello from {me}".encode())
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(1024):
                got += chunk
            return got.decode()

    a, b = both(lambda: side(firewalled.ns_a, A, B, 43000, 44000),
                lambda: side(firewalled.ns_b, B, A, 44000, 43000))
    assert (a, b) == (f"hello from {B}", f"hello from {A}")
