"""The resumable session's cost and its resume time.

* 64 MiB over loopback through ResumableSocket, beside plain kernel TCP and
  the bare secure channel (SecureSocket) in the same run: what keeping every
  unacknowledged byte and framing it costs on top of the channel.
* Resume time: a stream whose transport is torn down (both ends see it end)
  resumes on a new loopback TCP connection; the figure runs from the
  teardown to the first byte written after it arriving at the receiver, and
  is the session's own cost (dial, channel handshake, RESUME both ways), no
  detection delay in it. A silently dead path adds the keepalive's bounds
  (docs/liveness.md) before that.

Run: PYTHONPATH=src python -m pytest benchmarks/bench_session.py -q -p no:cacheprovider
"""

from __future__ import annotations

import hashlib
import socket
import statistics
import threading
import time

from benchmarks.bench_channel import (
    KEY, ROUNDS, TOTAL, channel_round, drain_into, forked_round, make_sink, payload,  # noqa: F401
    plain_round, run_rounds,
)
from fastpunch.proto.channel import default_cipher
from fastpunch.session import ResumableSocket, ResumeListener

RESUMES = 20


class _End:
    """ResumableSocket as forked_round expects an end: the sender lingers on
    ``end.sock.recv(1)`` until the receiver is done, which for a session
    means reading (and acknowledging) until the receiver's own end of stream,
    not returning at the first ACK's byte as a raw socket read would."""

    def __init__(self, rs: ResumableSocket) -> None:
        self.rs = rs
        self.sock = self

    def recv(self, n: int) -> bytes:
        while self.rs.recv(1 << 16):
            pass
        return b""

    def close(self) -> None:
        self.rs.close()


def session_round(payload: bytes, sink) -> tuple[float, float]:
    """The same transfer through ResumableSocket (no transport dies)."""
    def setup(sock, role):
        return _End(ResumableSocket(sock, role, KEY, keepalive=None))

    def send(end):
        end.rs.sendall(payload)
        end.rs.close_write()

    return forked_round(setup, send, lambda end: drain_into(sink, end.rs.recv))


def test_session_loopback_64mib(benchmark, payload):
    benchmark.group = "session-loopback-64MiB"
    plain = TOTAL / min(plain_round(payload, make_sink()) for _ in range(ROUNDS))[0] / 1e6
    chan = TOTAL / min(channel_round(payload, make_sink(), default_cipher())
                       for _ in range(ROUNDS))[0] / 1e6
    sink = make_sink()
    wall, _ = run_rounds(benchmark, session_round, payload, sink)
    mbps = TOTAL / wall / 1e6
    benchmark.extra_info.update(
        correct=hashlib.sha256(sink).digest() == hashlib.sha256(payload).digest(),
        bytes=TOTAL, mb_per_s=round(mbps, 1), plain_tcp_mb_per_s=round(plain, 1),
        channel_mb_per_s=round(chan, 1), ratio_to_plain=round(mbps / plain, 3),
        ratio_to_channel=round(mbps / chan, 3))


def test_resume_after_teardown(benchmark):
    """RESUMES teardowns of one session's transport on loopback; each time,
    the seconds from the teardown to the next byte's arrival."""
    benchmark.group = "session-resume"
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()
    got: list = []
    arrived = threading.Event()
    seen = {}

    def responder():
        conn, _ = listener.accept()
        rs = ResumableSocket(conn, "responder", KEY, reconnect=ResumeListener(listener),
                             keepalive=None)
        seen["rs"] = rs
        while True:
            data = rs.recv(1 << 16)
            if not data:
                break
            got.append((time.perf_counter(), bytes(data)))
            arrived.set()
        rs.close()

    t = threading.Thread(target=responder, daemon=True)
    t.start()
    ini = ResumableSocket(socket.create_connection(addr), "initiator", KEY,
                          reconnect=lambda: socket.create_connection(addr, timeout=5),
                          keepalive=None)
    samples = []

    def one(i: int) -> None:
        arrived.clear()
        ini.sendall(b"before %d;" % i)
        arrived.wait(5)
        t0 = time.perf_counter()
        ini.sock.shutdown(socket.SHUT_RDWR)
        arrived.clear()
        ini.sendall(b"after %d;" % i)             # resumes inside: dial, handshake, RESUME
        arrived.wait(5)
        samples.append(got[-1][0] - t0)

    try:
        benchmark.pedantic(lambda: one(len(samples)), rounds=RESUMES, iterations=1,
                           warmup_rounds=0)
        ini.close_write()
        while ini.recv(100):                      # bounded: the responder closes at our end
            pass
        ini.close()
        t.join(10)
    finally:
        listener.close()
    stream = b"".join(d for _, d in got)
    rounds = len(samples)                  # RESUMES, or 1 under --benchmark-disable
    expect = b"".join(b"before %d;after %d;" % (i, i) for i in range(rounds))
    benchmark.extra_info.update(
        correct=rounds >= 1 and stream == expect and ini.resumes == rounds,
        resumes=ini.resumes, median_ms=round(statistics.median(samples) * 1e3, 2),
        max_ms=round(max(samples) * 1e3, 2))
