"""CCS load harness: N simulated devices against one `fastpunch ccs serve`
process, loopback only, bounded in count and time.

    python benchmarks/ccs_load.py --devices 20000 --rate 2000 --seconds 5

The CCS runs as its own process (the one being measured: its RSS gives the
memory per idle device); the devices are light sans-IO clients on one uvloop
loop in this process, spread over 127.0.0.2-127.0.0.17 as source addresses.
Each rendezvous is open loop: requests leave at the target rate whatever the
answers do, and its latency is from the request's send to the initiator's
RendezvousReady (the responder answers its offer at once). Prints one JSON
object; benchmarks/bench_ccs.py runs it under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

from fastpunch.ccs import pki
from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.server import new_event_loop
from fastpunch.credentials import client_context
from fastpunch.proto import wire
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, Role

SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]
INFO = wire.NextInfo(port=40000, isn=1, nat="nat")


def raise_nofile(n: int) -> int:
    """Open-file limit to at least n (the hard limit needs CAP_SYS_RESOURCE);
    returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return n
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, n), hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class SimDevice(asyncio.Protocol):
    """A device reduced to its protocol: logs in, answers offers at once,
    resolves its own requests."""

    def __init__(self, name: str, key: bytes, ready: asyncio.Future, waiters: dict) -> None:
        self.name, self.key, self.ready, self.waiters = name, key, ready, waiters
        self.m = Connection(Role.CLIENT)
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.m.hello(self.name, self.key, os.urandom))

    def data_received(self, data: bytes) -> None:
        self.m.receive_data(data)
        while True:
            msg = self.m.next_event()
            if msg is NEED_DATA or msg is CLOSED:
                return
            if isinstance(msg, wire.Challenge):
                self.transport.write(self.m.respond())
            elif isinstance(msg, wire.AuthOk):
                self.ready.set_result(True)
            elif isinstance(msg, wire.RendezvousOffer):
                self.transport.write(self.m.send(
                    wire.RendezvousAnswer(request=msg.request, **INFO.fields())))
            elif isinstance(msg, (wire.RendezvousReady, wire.RendezvousRefused)):
                fut = self.waiters.pop((self.name, msg.request), None)
                if fut is not None and msg.__class__ is wire.RendezvousReady \
                        and msg.role == "initiator":
                    fut.set_result(time.perf_counter())
                elif fut is not None:
                    fut.set_exception(RuntimeError(f"refused: {msg}"))
            elif isinstance(msg, wire.Error):
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(msg.reason))

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: lost {exc}"))

    def request(self, peer: str, rid: int) -> None:
        self.transport.write(self.m.send(wire.RendezvousRequest(request=rid, peer=peer,
                                                                **INFO.fields())))


def percentile(xs: list, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive(port: int, ca: str, names: list, keys: dict, rate: float, seconds: float,
                server_pid: int, connect_concurrency: int = 200, limit: float = 600) -> dict:
    loop = asyncio.get_running_loop()
    ctx = client_context(ca)
    waiters: dict = {}
    devices: dict = {}
    sem = asyncio.Semaphore(connect_concurrency)
    rss0 = rss_kib(server_pid)

    async def login(i: int, name: str) -> None:
        async with sem:
            ready = loop.create_future()
            _, proto = await loop.create_connection(
                lambda: SimDevice(name, keys[name], ready, waiters), "127.0.0.1", port, ssl=ctx,
                server_hostname="localhost", local_addr=(SOURCES[i % len(SOURCES)], 0))
            await asyncio.wait_for(ready, 60)
            devices[name] = proto

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(login(i, n) for i, n in enumerate(names))), limit)
    connect_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    rss1 = rss_kib(server_pid)

    # open-loop rendezvous between pairs (2i -> 2i+1)
    pairs = len(names) // 2
    total = int(rate * seconds)
    latencies: list = []
    failures = 0
    futs = []
    cpu0 = cpu_seconds(server_pid)
    start = time.perf_counter()
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        p = k % pairs
        a, b = names[2 * p], names[2 * p + 1]
        rid = k + 1
        fut = loop.create_future()
        waiters[(a, rid)] = fut
        sent = time.perf_counter()
        devices[a].request(b, rid)
        futs.append((sent, fut))
    await asyncio.wait([f for _, f in futs], timeout=30)
    server_cpu = cpu_seconds(server_pid) - cpu0
    for sent, fut in futs:
        if fut.done() and fut.exception() is None:
            latencies.append(fut.result() - sent)
        else:
            failures += 1
    span = max(f.result() for _, f in futs if f.done() and f.exception() is None) - start \
        if latencies else float("inf")
    for proto in devices.values():
        proto.transport.close()
    return {
        "devices": len(devices), "connect_seconds": round(connect_s, 2),
        "logins_per_second": round(len(devices) / connect_s),
        "server_rss_kib_before": rss0, "server_rss_kib_connected": rss1,
        "kib_per_idle_device": round((rss1 - rss0) / max(1, len(devices)), 2),
        "rendezvous": total, "rendezvous_failed": failures,
        "rendezvous_per_second": round(len(latencies) / span) if latencies else 0,
        "target_rate": rate,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        # the CCS's own CPU per rendezvous: what bounds its rate on a given core
        "server_cpu_ms_per_rendezvous": round(server_cpu * 1000 / max(1, len(latencies)), 3),
        "server_cpu_share": round(server_cpu / (time.perf_counter() - start), 2),
    }


def run(devices: int, rate: float, seconds: float, workdir: str,
        profile: Optional[str] = None) -> dict:
    if devices < 2 or devices % 2:
        raise ValueError("an even number of devices, at least 2")
    limit = raise_nofile(devices + 64)
    if limit < devices + 64:
        raise RuntimeError(
            f"{devices} devices need {devices + 64} open files per process; the limit here is "
            f"{limit} and raising it needs CAP_SYS_RESOURCE (ulimit -Hn)")
    d = os.path.join(workdir, "ccs")
    paths = pki.init(d)
    store = KeyStore(os.path.join(d, "keys.db"))
    names = [f"sim-{i:05d}" for i in range(devices)]
    keys = {}
    store.db.execute("BEGIN")
    for i in range(0, devices, 2):
        keys[names[i + 1]] = store.add_device(names[i + 1])
        keys[names[i]] = store.add_device(names[i], [names[i + 1]])
    store.db.execute("COMMIT")
    store.close()
    ready = os.path.join(workdir, "ready.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    server = subprocess.Popen(
        [sys.executable, *prof, "-m", "fastpunch", "ccs", "serve", "--dir", d, "--listen",
         f"127.0.0.1:{port}", "--relay-port", "-1", "--heartbeat", "300", "--ready-file", ready],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: raise_nofile(devices + 64))
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the CCS did not start")
            time.sleep(0.05)
        loop = new_event_loop()
        try:
            result = loop.run_until_complete(
                drive(port, paths["ca"], names, keys, rate, seconds, server.pid))
        finally:
            loop.close()
        result["loop"] = type(loop).__module__.split(".")[0]
        result["nofile_limit"] = limit
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=2000, help="rendezvous per second (open loop)")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--profile", metavar="FILE",
                    help="run the CCS under cProfile, its stats written here (pstats)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.devices, args.rate, args.seconds, tmp, args.profile)))


if __name__ == "__main__":
    main()
