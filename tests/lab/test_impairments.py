"""Delay, loss and rate settings verified by measurement."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

pytestmark = pytest.mark.lab


def _accepting_server(lab, port, handler):
    with lab.inside("inet"):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lab.ccs_addr, port))
    srv.listen(64)

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


@pytest.mark.parametrize("delay_ms", [0, 20, 50])
def test_measured_rtt_matches_the_delay_within_10_percent(lab_factory, delay_ms):
    """TCP connect() takes one round trip; the site's access link adds the
    one-way delay each way, so the RTT to the core is 2 x delay."""
    lab = lab_factory(a="nat", delay_ms=delay_ms)
    srv = _accepting_server(lab, 7000, lambda c: c.close())
    rtts = []
    with srv:
        for _ in range(15):
            with lab.inside("a"):
                s = socket.socket()
            with s:
                t0 = time.perf_counter()
                s.connect((lab.ccs_addr, 7000))
                rtts.append(time.perf_counter() - t0)
    median_ms = statistics.median(rtts) * 1000
    if delay_ms == 0:
        assert median_ms < 5
    else:
        assert abs(median_ms - 2 * delay_ms) <= 0.10 * 2 * delay_ms, rtts


def test_delays_add_up_between_two_delayed_sites(lab_factory):
    lab = lab_factory(a="open", b="open", delay_ms={"a": 10, "b": 30})
    with lab.inside("b"):
        srv = socket.socket()
    srv.bind((lab.sites["b"].host_addr, 7001))
    srv.listen(8)
    with srv:
        rtts = []
        for _ in range(10):
            with lab.inside("a"):
                s = socket.socket()
            with s:
                t0 = time.perf_counter()
                s.connect((lab.sites["b"].host_addr, 7001))
                rtts.append(time.perf_counter() - t0)
                srv.accept()[0].close()
    assert abs(statistics.median(rtts) * 1000 - 80) <= 8        # 2 x (10 + 30)


@pytest.mark.parametrize("loss", [0.0, 20.0])
def test_loss_matches_the_setting(lab_factory, loss):
    """Per-direction loss on the site's WAN link: a UDP echo crosses it twice,
    so the delivered fraction is (1 - p)^2."""
    lab = lab_factory(a="open", loss={"a": loss})
    with lab.inside("inet"):
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((lab.ccs_addr, 7007))
    echo.setblocking(False)
    with lab.inside("a"):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    n, got = 2000, set()

    def pump():
        while True:
            try:
                data, peer = echo.recvfrom(64)
            except BlockingIOError:
                break
            echo.sendto(data, peer)
        while True:
            try:
                got.add(int.from_bytes(client.recv(64), "big"))
            except BlockingIOError:
                break

    with echo, client:
        for i in range(n):
            client.sendto(i.to_bytes(4, "big"), (lab.ccs_addr, 7007))
            pump()
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            pump()
            time.sleep(0.001)
    expected = (1 - loss / 100) ** 2
    assert abs(len(got) / n - expected) < 0.05, (len(got), expected)


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_rate_limit_matches_the_setting(lab_factory, direction):
    mbit = 20
    lab = lab_factory(a="nat", rate_mbit=mbit)
    seconds, chunk = 2.0, b"\0" * 65536
    received = []

    def sink(conn):
        total, t0 = 0, None
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                t0 = t0 or time.perf_counter()
                total += len(data)
        received.append((total, time.perf_counter() - t0))

    def source(conn):
        end = time.perf_counter() + seconds
        with conn:
            while time.perf_counter() < end:
                conn.sendall(chunk)

    srv = _accepting_server(lab, 7002, sink if direction == "upload" else source)
    with srv:
        with lab.inside("a"):
            s = socket.socket()
        s.connect((lab.ccs_addr, 7002))
        if direction == "upload":
            source(s)
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
            total, elapsed = received[0]
        else:
            sink(s)
            total, elapsed = received[0]
    measured = total * 8 / elapsed / 1e6
    assert abs(measured - mbit) <= 0.15 * mbit, measured
