"""ResumableSocket.bridge: one thread carries a session both ways between
its transport and a pair of local descriptors (a child's pipes, as
`fastpunch exec --session` does). Neither direction may stall the other, the
stream must stay byte-exact across a resume, and a reader that goes away
must end the bridge, not hang it."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

from fastpunch.proto.session import SessionUsageError
from fastpunch.session import ResumableSocket, ResumeListener
from tests.live.test_session_resume import KEY, pattern

TOTAL = 24 << 20


class Feeder(threading.Thread):
    """Writes ``data`` into a pipe and closes it; its other end is bridge()'s src."""

    def __init__(self, data: bytes) -> None:
        super().__init__(daemon=True)
        self.data = data
        self.r, self.w = os.pipe()

    def run(self) -> None:
        with open(self.w, "wb", buffering=0) as w:
            view = memoryview(self.data)
            for off in range(0, len(view), 1 << 20):
                w.write(view[off:off + (1 << 20)])


class Hasher(threading.Thread):
    """Reads a pipe to its end (bridge()'s dst is the other end), hashing."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.r, self.w = os.pipe()
        self.sha, self.n = hashlib.sha256(), 0

    def run(self) -> None:
        with open(self.r, "rb", buffering=0) as r:
            while data := r.read(1 << 20):
                self.sha.update(data)
                self.n += len(data)


def pair(listener: socket.socket):
    addr = listener.getsockname()
    box: dict = {}

    def serve():
        conn, _ = listener.accept()
        box["r"] = ResumableSocket(conn, "responder", KEY, keepalive=None,
                                   reconnect=ResumeListener(listener), resume_timeout=5)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ini = ResumableSocket(socket.create_connection(addr, timeout=5), "initiator", KEY,
                          reconnect=lambda: socket.create_connection(addr, timeout=5),
                          keepalive=None, resume_timeout=10)
    t.join(5)
    return ini, box["r"]


def run_bridged(tmp_path, child: list, kill_after: int = 0):
    """The initiator bridges ``child``'s pipes; the responder bridges a
    feeder of TOTAL bytes and a hasher. Returns (feeder data, hasher,
    initiator, responder, child's exit code)."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        ini, resp = pair(listener)
        data = pattern(TOTAL)
        feeder, hasher = Feeder(data), Hasher()
        feeder.start()
        hasher.start()
        proc = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        errors: list = []

        def responder():
            try:
                src, dst = open(feeder.r, "rb", buffering=0), open(hasher.w, "wb", buffering=0)
                with src:
                    resp.bridge(src, dst)
                resp.close()
            except Exception as exc:            # reported by the test
                errors.append(exc)

        rt = threading.Thread(target=responder, daemon=True)
        rt.start()
        counted = {"sent": 0}

        def sent(n):
            counted["sent"] += n
            if kill_after and counted["sent"] >= kill_after and not counted.get("killed"):
                counted["killed"] = True
                ini.sock.shutdown(socket.SHUT_RDWR)      # both ends see the transport end

        t0 = time.monotonic()
        ini.bridge(proc.stdout, proc.stdin, sent=sent)
        proc.stdout.close()
        rc = proc.wait(30)
        ini.close()
        rt.join(60)
        hasher.join(30)
        assert time.monotonic() - t0 < 120
        assert not rt.is_alive() and not errors, errors
        return data, hasher, ini, resp, rc
    finally:
        listener.close()


def test_an_echo_through_a_child_is_byte_exact_in_one_thread(tmp_path):
    data, hasher, ini, _, rc = run_bridged(tmp_path, ["cat"])
    assert rc == 0
    assert hasher.n == TOTAL and hasher.sha.digest() == hashlib.sha256(data).digest()
    assert ini.resumes == 0


def test_the_echo_survives_a_torn_down_transport(tmp_path):
    data, hasher, ini, resp, rc = run_bridged(tmp_path, ["cat"], kill_after=8 << 20)
    assert rc == 0
    assert hasher.n == TOTAL and hasher.sha.digest() == hashlib.sha256(data).digest()
    assert ini.resumes >= 1 and resp.resumes >= 1
    assert "resumed" in [e.what for e in ini.history]


# A child that writes all it has before it reads a byte: a one-thread
# carrier that blocks on either side deadlocks with it (its stdout pipe full
# while we wait to write its stdin, or the other way round).
WRITE_THEN_READ = ("import sys,hashlib\n"
                   "out = sys.stdout.buffer\n"
                   f"for i in range({TOTAL >> 20}): out.write(bytes([i % 251]) * (1 << 20))\n"
                   "out.flush()\n"
                   "h = hashlib.sha256(sys.stdin.buffer.read())\n"
                   "sys.stderr.write(h.hexdigest())\n")


def test_a_child_that_writes_everything_before_reading_does_not_deadlock(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        ini, resp = pair(listener)
        data = pattern(TOTAL)
        feeder, hasher = Feeder(data), Hasher()
        feeder.start()
        hasher.start()
        proc = subprocess.Popen([sys.executable, "-c", WRITE_THEN_READ], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def responder():
            with open(feeder.r, "rb", buffering=0) as src:
                resp.bridge(src, open(hasher.w, "wb", buffering=0))
            resp.close()

        rt = threading.Thread(target=responder, daemon=True)
        rt.start()
        done = threading.Event()
        watchdog = threading.Timer(90, lambda: (done.is_set() or proc.kill()))
        watchdog.start()
        try:
            ini.bridge(proc.stdout, proc.stdin)
        finally:
            done.set()
            watchdog.cancel()
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 0
        ini.close()
        rt.join(30)
        hasher.join(30)
    finally:
        listener.close()
    expect = b"".join(bytes([i % 251]) * (1 << 20) for i in range(TOTAL >> 20))
    assert hasher.n == TOTAL and hasher.sha.digest() == hashlib.sha256(expect).digest()
    assert err == hashlib.sha256(data).hexdigest()


def test_a_child_that_reads_nothing_and_exits_ends_the_bridge(tmp_path):
    """The child's stdin breaks (EPIPE): the peer's bytes are dropped, as a
    pipe would, and the bridge ends once the child's stdout has."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        ini, resp = pair(listener)
        feeder, hasher = Feeder(pattern(TOTAL)), Hasher()
        feeder.start()
        hasher.start()
        proc = subprocess.Popen(["true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        rt = threading.Thread(target=lambda: (resp.bridge(open(feeder.r, "rb", buffering=0),
                                                          open(hasher.w, "wb", buffering=0)),
                                              resp.close(timeout=2)), daemon=True)
        rt.start()
        t0 = time.monotonic()
        ini.bridge(proc.stdout, proc.stdin)
        took = time.monotonic() - t0
        assert proc.wait(10) == 0
        assert proc.stdin.closed
        ini.close(timeout=2)
        rt.join(20)
    finally:
        listener.close()
    assert took < 30
    assert hasher.n == 0                       # `true` wrote nothing


def test_a_limit_both_ways_ends_in_data_or_an_error_never_a_hang(tmp_path):
    """A child that writes 64 MiB before it reads, while the peer sends 64
    MiB. Past max_unread (32 MiB) held for the child, the transport is left
    unread, but the peer's acknowledgements of our data are behind those
    bytes: with our window full too, nothing could ever move again. The
    bridge then says so (unread-limit) instead of waiting for ever; when the
    acknowledgements were read in meanwhile (a blocked write reads what
    comes), it finishes. Either way: within a bound, and never wrong data."""
    total = 64 << 20
    child = WRITE_THEN_READ.replace(f"range({TOTAL >> 20})", f"range({total >> 20})")
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ini, resp = pair(listener)
        data = pattern(total)
        feeder, hasher = Feeder(data), Hasher()
        feeder.start()
        hasher.start()
        rt = threading.Thread(target=lambda: _quietly(resp.bridge, open(feeder.r, "rb", 0),
                                                      open(hasher.w, "wb", 0)), daemon=True)
        rt.start()
        watchdog = threading.Timer(90, proc.kill)           # (a hang fails, bounded)
        watchdog.start()
        t0 = time.monotonic()
        try:
            ini.bridge(proc.stdout, proc.stdin)
            outcome = "done"
        except SessionUsageError as exc:
            outcome = exc.code
        finally:
            watchdog.cancel()
        took = time.monotonic() - t0
        if outcome == "done":
            assert proc.wait(30) == 0
            assert proc.stderr.read().decode() == hashlib.sha256(data).hexdigest()
        ini.close(timeout=1)
    finally:
        proc.kill()
        proc.wait(10)
        listener.close()
    assert outcome in ("done", "unread-limit") and took < 60, (outcome, took)


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:             # the other end's failure is the test's subject
        pass


def test_a_slow_reader_that_writes_nothing_is_paced_not_refused(tmp_path):
    """One way only: the peer sends 48 MiB (past max_unread) to a child that
    reads slowly and writes nothing. The transport is left unread while the
    child lags (the peer meets TCP's back-pressure) and every byte arrives."""
    total = 48 << 20
    slow = ("import hashlib, sys, time\n"
            "h, n = hashlib.sha256(), 0\n"
            "while data := sys.stdin.buffer.read1(1 << 20):\n"
            "    h.update(data); n += len(data); time.sleep(0.01)\n"
            "sys.stderr.write(f'{n} {h.hexdigest()}')\n")
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", slow], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ini, resp = pair(listener)
        data = pattern(total)
        feeder, hasher = Feeder(data), Hasher()
        feeder.start()
        hasher.start()

        def responder():
            with open(feeder.r, "rb", buffering=0) as src:
                resp.bridge(src, open(hasher.w, "wb", buffering=0))
            resp.close()

        rt = threading.Thread(target=responder, daemon=True)
        rt.start()
        ini.bridge(proc.stdout, proc.stdin)
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 0
        ini.close()
        rt.join(30)
    finally:
        listener.close()
    assert err == f"{total} {hashlib.sha256(data).hexdigest()}"


def test_a_child_gone_while_the_peer_stays_open_and_quiet_ends_the_bridge(tmp_path):
    """The child exits (its stdin's reader is gone: the pipe's POLLERR)
    while the peer keeps its stream open and sends nothing: the bridge ends
    with our stream, it does not wait for the peer's."""
    listener = socket.create_server(("127.0.0.1", 0))
    quiet_r, quiet_w = os.pipe()                 # the peer's source: open, silent
    try:
        ini, resp = pair(listener)
        hasher = Hasher()
        hasher.start()
        rt = threading.Thread(target=lambda: _quietly(resp.bridge, open(quiet_r, "rb", 0),
                                                      open(hasher.w, "wb", 0)), daemon=True)
        rt.start()
        proc = subprocess.Popen(["true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        proc.wait(10)
        t0 = time.monotonic()
        ini.bridge(proc.stdout, proc.stdin)
        assert time.monotonic() - t0 < 5
        assert proc.stdin.closed
    finally:
        os.close(quiet_w)                        # the peer's stream ends: its bridge too
        ini.close(timeout=2)
        rt.join(10)
        listener.close()


def test_one_socket_as_both_ends_is_shut_for_writing_not_closed(tmp_path):
    """bridge(sock, sock), as a forwarder would carry a local TCP client:
    the peer's end shuts our socket for writing (the client reads EOF) and
    does not close it under its own reading side."""
    listener = socket.create_server(("127.0.0.1", 0))
    local, client = socket.socketpair()
    payload = os.urandom(4 << 20)
    got = bytearray()
    try:
        ini, resp = pair(listener)
        echo = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        rt = threading.Thread(target=lambda: (resp.bridge(echo.stdout, echo.stdin),
                                              resp.close()), daemon=True)
        rt.start()

        def use():
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            while chunk := client.recv(1 << 20):
                got.extend(chunk)

        user = threading.Thread(target=use, daemon=True)
        user.start()
        ini.bridge(local, local)
        user.join(30)
        ini.close()
        rt.join(30)
        assert echo.wait(10) == 0
    finally:
        local.close()
        client.close()
        listener.close()
    assert bytes(got) == payload
