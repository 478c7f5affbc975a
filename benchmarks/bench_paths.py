"""Issue 5's throughput comparison, one run, one lab path (camera behind a
nat, viewer behind a nat): plain kernel TCP (a kernel simultaneous open),
the handed-off direct connection, direct + secure channel, relay + secure
channel; and the channel's CPU cycles per byte on that path.

FASTPUNCH_PATHS_MIB (default 128) MiB per path. Needs root.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from benchmarks.bench_punch import connect, lab_devices, transfer
from tests.conftest import require_root

pytestmark = pytest.mark.lab

MIB = int(os.environ.get("FASTPUNCH_PATHS_MIB", "128"))
TARGET = 0.70          # secure channel vs plain kernel TCP


def cpu_mhz() -> float:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return 0.0


def secure_transfer(ca, cb, total: int) -> tuple:
    """``total`` bytes through the secure channel, ca -> cb; (seconds, bytes,
    CPU seconds of this process during it, cipher name)."""
    result = {}

    def handshake_b():
        result["b"] = cb.secure()

    t = threading.Thread(target=handshake_b)
    t.start()
    sa = ca.secure()
    t.join(30)
    sb = result["b"]
    block = memoryview(os.urandom(1 << 20))

    def send():
        left = total
        while left:
            n = min(len(block), left)
            sa.sendall(block[:n])
            left -= n
        sa.close_write()

    got = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    while data := sb.recv(1 << 20):
        got += len(data)
    sender.join(60)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    cipher = sa.cipher.name
    sa.close()
    sb.close()
    return seconds, got, cpu, cipher


def test_paths_throughput(benchmark):
    require_root("the lab paths benchmark")
    total = MIB << 20

    def run():
        out = {}
        with lab_devices() as (lab, ccs, cam, viewer):
            for path, strategy, secure in (("kernel-tcp", "simopen", False),
                                           ("direct", "symmetric", False),
                                           ("direct+secure", "symmetric", True),
                                           ("relay+secure", "relay", True)):
                ca, cb = connect(cam, viewer, strategy)
                try:
                    assert ca.path == ("relay" if strategy == "relay" else "direct")
                    if secure:
                        seconds, got, cpu, cipher = secure_transfer(ca, cb, total)
                        out[f"{path}_cycles_per_byte"] = round(cpu * cpu_mhz() * 1e6 / got, 2)
                        out["cipher"] = cipher
                    else:
                        seconds, got = transfer(ca.sock, cb.sock, total)
                    out[f"{path}_MB_per_s"] = round(got / seconds / 1e6, 1)
                    out[f"{path}_ok"] = got == total
                finally:
                    ca.close()
                    cb.close()
            out["relay_bytes"] = ccs.server.relay.bytes_total
        return out

    info = benchmark.pedantic(run, rounds=1, iterations=1)
    base = info["kernel-tcp_MB_per_s"]
    info["direct_ratio"] = round(info["direct_MB_per_s"] / base, 3)
    info["secure_ratio"] = round(info["direct+secure_MB_per_s"] / base, 3)
    info["relay_secure_ratio"] = round(info["relay+secure_MB_per_s"] / base, 3)
    info["secure_target"] = TARGET
    info["secure_target_met"] = info["secure_ratio"] >= TARGET
    info["MiB"] = MIB
    benchmark.extra_info.update(info)
    benchmark.extra_info["correct"] = (all(v for k, v in info.items() if k.endswith("_ok"))
                                       and info["relay_bytes"] >= total)
