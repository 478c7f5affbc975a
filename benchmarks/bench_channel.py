"""The secure channel's cost: 64 MiB over a loopback TCP connection through
SecureSocket beside the same transfer in plain kernel TCP, and the cipher's
CPU cycles per byte in memory (seal + open through the machines).

The sender runs in a forked child and the receiver in the test process,
each pinned to its own CPU when there are two, as two devices would each run
one end; CPU time is the sum of both. Every benchmark checks the bytes that
arrived (extra_info["correct"]) and records MB/s; the channel one records
its ratio to plain TCP. Cycles per byte = CPU seconds (time.process_time)
x CPU MHz (from /proc/cpuinfo) / bytes: an estimate, since the clock varies.

Run: PYTHONPATH=src python -m pytest benchmarks/bench_channel.py -q -p no:cacheprovider
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
import struct
import time

import pytest

from fastpunch.channel import SecureSocket
from fastpunch.proto.channel import NEED_DATA, Channel, Cipher, default_cipher

TOTAL = 64 * 1024 * 1024
CHUNK = 1024 * 1024
ROUNDS = 3
KEY = os.urandom(32)
_PLAIN_MBPS: dict[str, float] = {}


def cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(TOTAL)


def make_sink() -> mmap.mmap:
    """The receiver's 64 MiB buffer, touched once and kept out of the forked
    sender (MADV_DONTFORK): otherwise each receive into it would pay a
    copy-on-write fault per page, a cost of the harness, not of TCP."""
    sink = mmap.mmap(-1, TOTAL)
    if hasattr(mmap, "MADV_DONTFORK"):
        sink.madvise(mmap.MADV_DONTFORK)
    sink.write(bytes(TOTAL))
    sink.seek(0)
    return sink


def forked_round(setup, send, receive) -> tuple[float, float]:
    """One transfer over loopback TCP between this process (receiver) and a
    forked child (sender), as two devices would run it. The clock starts
    when both ends are connected (and, for the channel, confirmed) and the
    child is told to go; returns (wall seconds, CPU seconds of both ends)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with socket.create_server(("127.0.0.1", 0)) as srv:
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                  # the sender
            code = 1
            try:
                os.close(go_w)
                os.close(res_r)
                if len(cpus) >= 2:                    # one CPU per device, as on two machines
                    os.sched_setaffinity(0, {cpus[0]})
                end = setup(socket.create_connection(srv.getsockname()), "initiator")
                os.read(go_r, 1)
                c0 = time.process_time()
                send(end)
                os.write(res_w, struct.pack("d", time.process_time() - c0))
                getattr(end, "sock", end).recv(1)     # linger until the receiver is done
                code = 0
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(res_w)
        try:
            if len(cpus) >= 2:
                os.sched_setaffinity(0, {cpus[1]})
            conn, _ = srv.accept()
            end = setup(conn, "responder")
            t0, c0 = time.perf_counter(), time.process_time()
            os.write(go_w, b"g")
            receive(end)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            child = os.read(res_r, 8)
            end.close()                               # lets the child exit
        finally:
            os.close(go_w)
            os.close(res_r)
            _, status = os.waitpid(pid, 0)
            if cpus:
                os.sched_setaffinity(0, cpus)
    assert status == 0 and len(child) == 8, f"sender failed (status {status})"
    return wall, cpu + struct.unpack("d", child)[0]


def plain_round(payload: bytes, sink: mmap.mmap) -> tuple[float, float]:
    """Kernel TCP: sendall of 1 MiB slices, recv_into a preallocated buffer."""
    def send(sock):
        view = memoryview(payload)
        for off in range(0, TOTAL, CHUNK):
            sock.sendall(view[off:off + CHUNK])
        sock.shutdown(socket.SHUT_WR)

    def receive(sock):
        n = 0
        with memoryview(sink) as dst:
            while n < TOTAL:
                got = sock.recv_into(dst[n:], min(CHUNK, TOTAL - n))
                if not got:
                    break
                n += got
        assert n == TOTAL and sock.recv(1) == b"", n

    return forked_round(lambda sock, role: sock, send, receive)


def channel_round(payload: bytes, sink: mmap.mmap, cipher: Cipher,
                  into: bool = False) -> tuple[float, float]:
    """The same through SecureSocket: encrypt, send, receive, decrypt.
    ``into``: the receiver reads as the plain round does, recv_into its
    buffer (records opened straight into it); else recv() and a copy."""
    def setup(sock, role):
        return SecureSocket(sock, role, KEY, cipher=cipher)

    def send(end):
        end.sendall(payload)
        end.close_write()

    def receive_into(end):
        n = 0
        with memoryview(sink) as dst:
            while n < TOTAL:
                got = end.recv_into(dst[n:], min(CHUNK, TOTAL - n))
                if not got:
                    break
                n += got
        assert n == TOTAL and end.recv(1) == b"", n

    return forked_round(setup, send, receive_into if into else
                        (lambda end: drain_into(sink, end.recv)))


def drain_into(sink, recv) -> None:
    """recv(CHUNK) until b"" into sink; all TOTAL bytes must come."""
    n = 0
    while chunk := recv(CHUNK):
        sink[n:n + len(chunk)] = chunk
        n += len(chunk)
    assert n == TOTAL, n


def run_rounds(benchmark, fn, *args):
    """ROUNDS runs (bounded: 64 MiB each); the best wall time and its CPU time.
    The figures come from our own clock around the transfer only (setup and
    handshake excluded), so they exist under --benchmark-disable too."""
    times = []
    benchmark.pedantic(lambda: times.append(fn(*args)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=0)
    return min(times)


def test_plain_tcp_loopback_64mib(benchmark, payload):
    benchmark.group = "channel-loopback-64MiB"
    sink = make_sink()
    wall, cpu = run_rounds(benchmark, plain_round, payload, sink)
    mbps = TOTAL / wall / 1e6
    _PLAIN_MBPS["plain"] = mbps
    mhz = cpu_mhz()
    benchmark.extra_info.update(
        correct=hashlib.sha256(sink).digest() == hashlib.sha256(payload).digest(),
        bytes=TOTAL, mb_per_s=round(mbps, 1),
        cpu_cycles_per_byte=round(cpu * mhz * 1e6 / TOTAL, 3) if mhz else None)


@pytest.mark.parametrize("reader", ["recv_into", "recv"])
def test_channel_loopback_64mib(benchmark, payload, reader):
    """recv_into: the receiver reads as the plain round's does (into its own
    buffer); recv: it takes the bytes objects recv() returns and copies."""
    benchmark.group = "channel-loopback-64MiB"
    cipher = default_cipher()
    sink = make_sink()
    wall, cpu = run_rounds(benchmark, channel_round, payload, sink, cipher,
                           reader == "recv_into")
    mbps = TOTAL / wall / 1e6
    correct = hashlib.sha256(sink).digest() == hashlib.sha256(payload).digest()
    plain = _PLAIN_MBPS.get("plain")
    if plain is None:               # run alone (-k): measure the baseline here
        plain = TOTAL / min(plain_round(payload, make_sink()) for _ in range(ROUNDS))[0] / 1e6
    mhz = cpu_mhz()
    benchmark.extra_info.update(
        correct=correct, reader=reader,
        bytes=TOTAL, cipher=cipher.name, mb_per_s=round(mbps, 1),
        plain_tcp_mb_per_s=round(plain, 1), ratio_to_plain=round(mbps / plain, 3),
        cpu_cycles_per_byte=round(cpu * mhz * 1e6 / TOTAL, 3) if mhz else None)


@pytest.mark.parametrize("backend", ["cryptography", "libcrypto"])
@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305],
                         ids=["aes-256-gcm", "chacha20-poly1305"])
def test_cipher_cycles_per_byte(benchmark, payload, cipher, backend, monkeypatch):
    """Seal then open 64 MiB through two machines in memory (no sockets):
    the cipher plus the record layer's Python overhead; on cryptography's
    AEADs and on libcrypto through ctypes (a device install's,
    fastpunch._aead), side by side."""
    from fastpunch import _aead
    from fastpunch.proto import channel as channel_module

    benchmark.group = "channel-cipher-64MiB"
    name, aes, chacha, invalid = _aead.select(backend)
    monkeypatch.setattr(channel_module, "_BACKEND", (name, {Cipher.AES_256_GCM: aes,
                                                            Cipher.CHACHA20_POLY1305: chacha},
                                                     invalid))
    a = Channel("initiator", KEY, cipher=cipher)
    b = Channel("responder", KEY, cipher=cipher)
    b.receive_data(a.start())
    a.receive_data(b.start())
    a.next_event(), b.next_event()
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    a.next_event(), b.next_event()
    view = memoryview(payload)
    samples, digests = [], []

    def seal_and_open():
        seal = open_ = 0.0
        for off in range(0, TOTAL, CHUNK):
            c0 = time.process_time()
            wire = a.send_data(view[off:off + CHUNK])
            c1 = time.process_time()
            b.receive_data(wire)
            while b.next_event() is not NEED_DATA:
                pass
            c2 = time.process_time()
            seal += c1 - c0
            open_ += c2 - c1
        samples.append((seal, open_))

    def check_round():
        # One extra pass, outside the timing, that keeps every byte.
        got = bytearray()
        for off in range(0, TOTAL, CHUNK):
            b.receive_data(a.send_data(view[off:off + CHUNK]))
            while (ev := b.next_event()) is not NEED_DATA:
                got += ev.data
        digests.append(hashlib.sha256(got).digest() == hashlib.sha256(payload).digest())

    benchmark.pedantic(seal_and_open, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    check_round()
    seal, open_ = min(samples, key=sum)
    mhz = cpu_mhz()
    benchmark.extra_info.update(
        correct=all(digests) and a.cipher is b.cipher is cipher, cipher=cipher.name,
        backend=backend,
        chosen_for_this_cpu=cipher is default_cipher(), bytes=TOTAL,
        seal_mb_per_cpu_s=round(TOTAL / seal / 1e6, 1),
        open_mb_per_cpu_s=round(TOTAL / open_ / 1e6, 1),
        seal_cycles_per_byte=round(seal * mhz * 1e6 / TOTAL, 3) if mhz else None,
        open_cycles_per_byte=round(open_ * mhz * 1e6 / TOTAL, 3) if mhz else None,
        cpu_mhz=mhz)
