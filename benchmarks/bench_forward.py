"""`fastpunch forward` through the agent (issue 16), beside direct kernel TCP on
the same lab path: camera behind a nat, viewer behind a nat, 20 ms one-way on
each access link (bench_punch.DELAY_MS).

* throughput: one local client downloading FASTPUNCH_FORWARD_MIB (default
  128) MiB from a local service behind the agent (client -> forward ->
  secure session + mux -> agent -> service), against the same bytes over a
  handed-off direct connection with nothing on it (plain kernel TCP);
* time from a client's connect() on the forwarded port to the service's
  first byte: the first stream (which makes the punch and the session) and
  later streams (one mux OPEN over the live session), beside a kernel TCP
  connect and first byte over the punched path (one round trip plus the
  request);
* the same download with the mux window fixed at its initial 256 KiB (what
  window tuning gains on a 40+ ms path).

Needs root.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time

import pytest

from benchmarks.bench_punch import DELAY_MS, connect, lab_devices, transfer
from tests.conftest import require_root

pytestmark = pytest.mark.lab

MIB = int(os.environ.get("FASTPUNCH_FORWARD_MIB", "128"))
LATER = 10                      # later streams timed
STRATEGY = "symmetric"


async def start_service():
    """A local service: reads "N\\n", sends N bytes."""
    block = os.urandom(1 << 20)

    async def handle(reader, writer):
        try:
            n = int(await reader.readline())
            while n:
                k = min(n, len(block))
                writer.write(block[:k])
                await writer.drain()
                n -= k
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def fetch(lab, port: int, n: int) -> tuple:
    """From site a: connect to the forward, ask for n bytes; (seconds to the
    first byte, seconds to the last, bytes)."""
    with lab.inside("a"):
        s = socket.socket()
    with s:
        s.settimeout(60)
        t0 = time.perf_counter()
        s.connect(("127.0.0.1", port))
        s.sendall(b"%d\n" % n)
        buf = bytearray(1 << 20)
        got = s.recv_into(buf)
        first = time.perf_counter() - t0
        while got < n:
            k = s.recv_into(buf)
            if not k:
                break
            got += k
        return first, time.perf_counter() - t0, got


def kernel_first_byte(ca, cb) -> float:
    """Over a punched connection: a request one way, a byte back (what a
    local client's first byte costs at the least)."""
    for s in (ca.sock, cb.sock):
        s.setblocking(True)
        s.settimeout(10)
    t0 = time.perf_counter()
    ca.sock.sendall(b"1\n")
    cb.sock.recv(16)
    cb.sock.sendall(b"x")
    ca.sock.recv(16)
    return time.perf_counter() - t0


def test_forward_throughput_and_time_to_first_byte(benchmark):
    require_root("the forward benchmark")
    from fastpunch.agent import Agent, Forwarder
    from fastpunch.agent import config as agent_config
    from fastpunch.proto.mux import INITIAL_WINDOW

    total = MIB << 20
    out: dict = {}

    def run():
        with lab_devices(delay_ms=DELAY_MS) as (lab, ccs, cam, viewer):
            (la, a), (lb, b) = cam, viewer
            # the baseline: a handed-off direct connection, plain kernel TCP
            ca, cb = connect(cam, viewer, STRATEGY)
            try:
                assert ca.path == "direct"
                out["kernel_first_byte_s"] = kernel_first_byte(ca, cb)
                seconds, got = transfer(cb.sock, ca.sock, total)
                out["kernel_MB_per_s"] = round(got / seconds / 1e6, 1)
                out["kernel_ok"] = got == total
            finally:
                ca.close()
                cb.close()
            server, port = lb.run(start_service())
            cfg = agent_config.load({"ccs": "192.0.2.1:7443", "name": "viewer",
                                     "key_file": "(given)", "ca": "(given)",
                                     "services": f"bulk=127.0.0.1:{port}",
                                     "strategies": STRATEGY, "status_socket": ""}, {})
            agent = Agent(cfg, device=b, emit=lambda *a, **k: None)
            lb.run(agent.start())
            try:
                for label, window in (("tuned", None), ("fixed", INITIAL_WINDOW)):
                    kw = {} if window is None else {"max_window": window}
                    fw = Forwarder(a, "viewer", "bulk", strategies=[STRATEGY],
                                   emit=lambda *a, **k: None, **kw)
                    _, local = la.run(fw.serve("127.0.0.1", 0))
                    try:
                        if window is not None:          # the agent's side grants fixed too
                            agent.config.values["stream_window"] = window
                        first, _, got = fetch(lab, local, 1)
                        out[f"{label}_first_stream_first_byte_s"] = round(first, 4)
                        later = [fetch(lab, local, 1)[0] for _ in range(LATER)]
                        out[f"{label}_later_stream_first_byte_s"] = round(
                            statistics.median(later), 4)
                        _, seconds, got = fetch(lab, local, total)
                        out[f"{label}_MB_per_s"] = round(got / seconds / 1e6, 1)
                        out[f"{label}_ok"] = got == total and fw.sessions == 1
                        out[f"{label}_rtt_ms"] = round((fw._session.rtt or 0) * 1e3, 1)
                    finally:
                        la.run(fw.close())
                    # the agent sees the session end before the next one
                    deadline = time.monotonic() + 10
                    while agent.peers and time.monotonic() < deadline:
                        time.sleep(0.05)
            finally:
                lb.run(agent.stop())
                server.close()

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = dict(out)
    info["ratio"] = round(info["tuned_MB_per_s"] / info["kernel_MB_per_s"], 3)
    info["fixed_window_ratio"] = round(info["fixed_MB_per_s"] / info["kernel_MB_per_s"], 3)
    info["MiB"] = MIB
    info["delay_ms_each_way"] = DELAY_MS
    benchmark.extra_info.update(info)
    benchmark.extra_info["correct"] = all(v for k, v in info.items() if k.endswith("_ok"))
    assert benchmark.extra_info["correct"], info
