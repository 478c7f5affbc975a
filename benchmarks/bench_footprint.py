"""What a device install costs a camera: flash (the installed files of
``pip install fastpunch`` and what it requires, no extras) and memory (the
agent idle, and the peak of each side of a connect and a 100 MB secure
transfer), each beside its baseline: the bare interpreter's RSS.

The device processes run as a device install would: the extras' packages
(pyroute2, uvloop, redis, cryptography) cannot be imported in them, so the
channel runs on libcrypto through ctypes (fastpunch._aead). Figures go to
``extra_info`` (docs/benchmarks.md, "Footprint", has the command and the
results); the goals of issue 18 are a device install under 20 MB beyond the
interpreter, idle RSS under 20 MB and peak under 35 MB.

    python -m pytest benchmarks/bench_footprint.py --benchmark-json=fp.json
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.ccs.conftest import free_port

EXTRAS_ONLY = ("pyroute2", "uvloop", "redis", "cryptography")
STREAM_BYTES = int(os.environ.get("FASTPUNCH_FOOTPRINT_BYTES", 100 * 1000 * 1000))
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _closure(name: str) -> list:
    """The distributions a plain ``pip install name`` brings (markers for
    this interpreter, no extras)."""
    seen, todo = [], [name]
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.append(key)
        for req in dist.requires or ():
            spec, _, marker = req.partition(";")
            if "extra" in marker:
                continue
            if marker.strip():
                from packaging.markers import Marker

                if not Marker(marker.strip()).evaluate():
                    continue
            todo.append(_REQ_NAME.match(spec).group(1))
    return seen


def _installed_bytes(name: str) -> int:
    dist = md.distribution(name)
    total = 0
    for f in dist.files or ():
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    if not total and name == "fastpunch":      # (a source checkout: not installed as a dist)
        import fastpunch

        root = os.path.dirname(fastpunch.__file__)
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
                    if not f.endswith((".pyx", ".pxd", ".c")))
    return total


def test_device_install_size(benchmark):
    def measure():
        return {name: _installed_bytes(name) for name in _closure("fastpunch")}

    sizes = benchmark.pedantic(measure, rounds=1, iterations=1)
    total = sum(sizes.values())
    benchmark.extra_info.update(
        machine=os.uname().machine, MB={k: round(v / 1e6, 2) for k, v in sizes.items()},
        total_MB=round(total / 1e6, 2), goal_MB=20,
        correct="fastpunch" in sizes and sizes["fastpunch"] > 0 and
        not set(sizes) & {"cryptography", "cffi", "pyroute2", "uvloop", "redis", "pytest"})


def _device_cmd(*args: str) -> list:
    code = (f"import sys\nfor n in {EXTRAS_ONLY!r}: sys.modules[n] = None\n"
            "from fastpunch.cli import main\nsys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *args]


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _wait_peaks(procs: list, timeout: float) -> list:
    """Wait for every process of ``procs`` (bounded); the peak RSS of each
    in kB: the VmHWM of its own memory, read every 20 ms until it exits (the
    last reading stands). Not wait4's ru_maxrss: a child's maxrss keeps the
    high-water mark of the memory it exec'ed from, which for a child of
    pytest is pytest's own RSS (the peaks this bench reported before
    2026-12-06, 42.8-44.3 MB, were that, not the device's)."""
    deadline = time.monotonic() + timeout
    peaks = [0] * len(procs)
    running = set(range(len(procs)))
    while running and time.monotonic() < deadline:
        for i in list(running):
            try:
                peaks[i] = max(peaks[i], _rss_kb(procs[i].pid, "VmHWM"))
            except (OSError, AssertionError):   # exiting: its status has no memory left
                pass
            pid, status, _usage = os.wait4(procs[i].pid, os.WNOHANG)
            if pid:
                procs[i].returncode = os.waitstatus_to_exitcode(status)
                running.discard(i)
        time.sleep(0.02)
    for i in running:
        procs[i].kill()
    assert not running, f"{[procs[i].args[3:5] for i in running]} still running after {timeout} s"
    return peaks


@pytest.fixture
def station(tmp_path):
    """A CCS on loopback with three enrolled devices; yields the device
    arguments for a name."""
    d = tmp_path / "ccs"

    def fp(*args):
        r = subprocess.run([sys.executable, "-m", "fastpunch", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r

    fp("ccs", "init", "--dir", str(d))
    for name, reach in (("idle", []), ("cam", ["--may-reach", "viewer"]), ("viewer", [])):
        fp("ccs", "add-device", name, *reach, "--dir", str(d),
           "--key-file", str(tmp_path / f"{name}.key"))
    port, ready = free_port(), tmp_path / "ready.json"
    server = subprocess.Popen([sys.executable, "-m", "fastpunch", "ccs", "serve", "--dir", str(d),
                               "--listen", f"127.0.0.1:{port}", "--relay-port", "0",
                               "--probe-port", "0", "--ready-file", str(ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

        def args(name: str) -> list:
            return ["--name", name, "--key-file", str(tmp_path / f"{name}.key"),
                    "--ccs", f"127.0.0.1:{port}", "--ca", str(d / "ca.pem"),
                    "--server-name", "localhost"]

        yield args
    finally:
        server.terminate()
        server.wait(10)


def test_agent_memory_idle_and_streaming(benchmark, station, tmp_path):
    baseline = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(30)"])
    # --nat unknown: the figures are of the agent itself, without a natcheck
    agent = subprocess.Popen(_device_cmd("device", "run", "--nat", "unknown", *station("idle")),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs = [baseline, agent]
    try:
        import select

        ready, _, _ = select.select([agent.stdout], [], [], 30)     # (bounded)
        assert ready, "the agent did not log in within 30 s"
        assert json.loads(agent.stdout.readline())["event"] == "connected"
        time.sleep(2.0)                                  # settled: heartbeats, nothing else
        idle_kb, bare_kb = _rss_kb(agent.pid), _rss_kb(baseline.pid)
        if os.environ.get("FASTPUNCH_FOOTPRINT_MAPS"):   # where the idle agent's memory is
            subprocess.run(["pmap", "-x", str(agent.pid)])

        payload = tmp_path / "payload.bin"
        with open(payload, "wb") as f:                   # incompressible, written once
            left = STREAM_BYTES
            while left:
                f.write(os.urandom(min(left, 1 << 20)))
                left -= min(left, 1 << 20)
        out = tmp_path / "received.bin"

        def stream():
            recv = subprocess.Popen(_device_cmd("recv", "--from", "cam", "--json", str(out),
                                                *station("viewer")),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(recv)
            time.sleep(1.0)                              # (it announces itself first)
            send = subprocess.Popen(_device_cmd("send", "--to", "viewer", "--json", str(payload),
                                                *station("cam")),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    text=True)
            procs.append(send)
            send_kb, recv_kb = _wait_peaks([send, recv], 180)
            return send_kb, recv_kb, json.loads(recv.stdout.read().splitlines()[-1])

        send_kb, recv_kb, summary = benchmark.pedantic(stream, rounds=1, iterations=1)
        got = out.stat().st_size if out.exists() else -1
        same = got == STREAM_BYTES and _same(payload, out)
        benchmark.extra_info.update(
            interpreter_MB=round(bare_kb / 1024, 1), idle_MB=round(idle_kb / 1024, 1),
            idle_beyond_interpreter_MB=round((idle_kb - bare_kb) / 1024, 1),
            peak_send_MB=round(send_kb / 1024, 1), peak_recv_MB=round(recv_kb / 1024, 1),
            stream_MB=STREAM_BYTES / 1e6, path=summary.get("path"),
            strategy=summary.get("strategy"), MB_per_s=summary.get("MB_per_s"),
            goals_MB={"idle": 20, "peak": 35},
            correct=same and summary.get("bytes") == STREAM_BYTES)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _same(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
