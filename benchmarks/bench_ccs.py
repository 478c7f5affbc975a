"""CCS benchmarks: the load harness (devices held, rendezvous rate and
latency, memory per idle device) and relay throughput beside plain kernel
TCP between the same endpoints.

Scale with FASTPUNCH_CCS_DEVICES / _RATE / _SECONDS / FASTPUNCH_RELAY_MIB;
the defaults keep a CI run short. The figures in docs/benchmarks.md come
from the commands written there.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
import time
from typing import Optional

import pytest

from benchmarks import ccs_load
from fastpunch.ccs import pki
from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.server import CCSServer, new_event_loop
from fastpunch.client import Device, NextInfo

DEVICES = int(os.environ.get("FASTPUNCH_CCS_DEVICES", "2000"))
RATE = float(os.environ.get("FASTPUNCH_CCS_RATE", "1000"))
SECONDS = float(os.environ.get("FASTPUNCH_CCS_SECONDS", "2"))
RELAY_BYTES = int(os.environ.get("FASTPUNCH_RELAY_MIB", "256")) << 20


def test_ccs_load(benchmark, tmp_path):
    result = benchmark.pedantic(ccs_load.run, args=(DEVICES, RATE, SECONDS, str(tmp_path)),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["correct"] = (result["devices"] == DEVICES
                                       and result["rendezvous_failed"] == 0)


def pump(src: socket.socket, total: int, out: dict) -> None:
    block = memoryview(os.urandom(1 << 20))
    cpu = time.thread_time()
    sent = 0
    while sent < total:
        sent += src.send(block[:min(len(block), total - sent)])
    src.shutdown(socket.SHUT_WR)
    out["sent"], out["cpu"] = sent, time.thread_time() - cpu


def sink(dst: socket.socket, out: dict) -> None:
    buf = bytearray(1 << 20)
    cpu = time.thread_time()
    got = 0
    while n := dst.recv_into(buf):
        got += n
    out["got"], out["cpu"] = got, time.thread_time() - cpu


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def transfer(a: socket.socket, b: socket.socket, total: int, cpu: Optional[dict] = None) -> tuple:
    """(seconds, bytes sent, bytes received); with ``cpu``, fills it with the
    CPU seconds of the sending and receiving threads and of this whole
    process (the in-process relay's threads are the difference)."""
    a.setblocking(True)
    b.setblocking(True)
    sent, got = {}, {}
    threads = [threading.Thread(target=pump, args=(a, total, sent)),
               threading.Thread(target=sink, args=(b, got))]
    t0, p0 = time.perf_counter(), process_cpu()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seconds = time.perf_counter() - t0
    if cpu is not None:
        cpu.update(sender=sent.get("cpu"), receiver=got.get("cpu"),
                   process=process_cpu() - p0)
    return seconds, sent.get("sent"), got.get("got")


def kernel_pair() -> tuple:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


def relay_pair(tmp_path):
    """Two devices, a rendezvous, and both sides joined on the CCS relay; the
    CCS keeps running on its own thread (its loop) while data flows."""
    d = str(tmp_path / "ccs")
    paths = pki.init(d)
    store = KeyStore(os.path.join(d, "keys.db"))
    ka, kb = store.add_device("cam", ["viewer"]), store.add_device("viewer")
    loop = new_event_loop()
    server = CCSServer(store, pki.server_context(d))
    started = threading.Event()
    box = {}

    async def setup():
        addr = await server.start("127.0.0.1", 0)
        a = Device(addr, "cam", ka, ca_file=paths["ca"], server_hostname="localhost")
        b = Device(addr, "viewer", kb, ca_file=paths["ca"], server_hostname="localhost")
        await a.login()
        await b.login()

        async def answer():
            async for offer in b.incoming():
                return await offer.answer(NextInfo(port=2, isn=2))

        answering = asyncio.create_task(answer())
        ra = await a.rendezvous("viewer", NextInfo(port=1, isn=1))
        rb = await answering
        box["socks"] = await asyncio.gather(a.relay(ra), b.relay(rb))
        box["devices"] = (a, b)

    def run():
        loop.run_until_complete(setup())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)

    def stop():
        async def down():
            for dev in box["devices"]:
                await dev.close()
            await server.close()

        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        store.close()

    return box["socks"], server, stop


def copy_relay_pair():
    """The relay done the plain way, for comparison: a userspace recv/send
    loop in a thread between two kernel TCP connections."""
    a, mid_a = kernel_pair()
    mid_b, b = kernel_pair()

    def copy():
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := mid_a.recv_into(buf):
            mid_b.sendall(view[:n])
        mid_b.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()

    def stop():
        thread.join(10)
        mid_a.close()
        mid_b.close()

    return a, b, stop


@pytest.mark.parametrize("path", ["kernel-tcp", "copy-relay", "ccs-relay"])
def test_relay_throughput(benchmark, tmp_path, path):
    server = None
    if path == "kernel-tcp":
        a, b = kernel_pair()
        stop = lambda: None        # noqa: E731
    elif path == "copy-relay":
        a, b, stop = copy_relay_pair()
    else:
        (a, b), server, stop = relay_pair(tmp_path)
    cpu: dict = {}
    try:
        seconds, sent, got = benchmark.pedantic(transfer, args=(a, b, RELAY_BYTES, cpu),
                                                rounds=1, iterations=1)
    finally:
        a.close()
        b.close()
        stop()
    benchmark.extra_info["MB_per_s"] = round(RELAY_BYTES / seconds / 1e6)
    benchmark.extra_info["bytes"] = RELAY_BYTES
    # where the CPU goes: the relay's share is what the process spent beyond
    # the two endpoint threads (loopback softirq work lands on whichever
    # thread sent the segment)
    benchmark.extra_info["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    benchmark.extra_info["cpu_s"]["relay"] = round(cpu["process"] - cpu["sender"]
                                                   - cpu["receiver"], 3)
    benchmark.extra_info["cores_busy"] = round(cpu["process"] / seconds, 2)
    correct = sent == got == RELAY_BYTES
    if server is not None:
        correct = correct and server.relay.bytes_total == RELAY_BYTES
    benchmark.extra_info["correct"] = correct
