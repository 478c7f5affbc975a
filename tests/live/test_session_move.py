"""A resumable session moving to a better transport (relay-first's upgrade)
over real loopback sockets: the better path comes while a stream runs, the
initiator leads, the responder follows its MOVED, and every byte arrives
once, in order, none sent twice; a better path that never comes, or that
the peer never takes, leaves the session where it is, noted in its history;
an old path that dies while the better one is being made goes on over it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import threading
import time

import pytest

from fastpunch import session as fs
from fastpunch.session import ResumableSocket, Upgrade

from .test_session_resume import pattern

KEY = bytes(range(32))
CHUNK = 1 << 20


def tcp_pair() -> tuple:
    """Two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


def later(value, after: float) -> concurrent.futures.Future:
    """A future that gives ``value`` (an exception: raises it) ``after`` s from now."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def finish():
        time.sleep(after)
        if not fut.set_running_or_notify_cancel():     # given up: as a cancelled punch,
            if isinstance(value, socket.socket):       # nothing is left behind
                value.close()
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)
    threading.Thread(target=finish, daemon=True).start()
    return fut


def open_pair(up_a=None, up_b=None):
    """Sessions on a first ("relay") transport, each with its upgrade."""
    a1, b1 = tcp_pair()
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "b", ResumableSocket(b1, "responder", KEY, keepalive=None, upgrade=up_b,
                             path="relay (relay)")))
    t.start()
    ra = ResumableSocket(a1, "initiator", KEY, keepalive=None, upgrade=up_a, path="relay (relay)")
    t.join(10)
    return ra, out["b"]


def read_all(rs, out: dict) -> None:
    try:
        h, n = hashlib.sha256(), 0
        while True:
            data = rs.recv(CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
        out.update(digest=h.digest(), n=n)
        rs.close(10)
    except Exception as exc:              # reported by the test
        out["error"] = exc


def whats(rs) -> list:
    return [(e.what, e.detail) for e in rs.history]


def test_a_stream_moves_to_the_better_path_mid_transfer_nothing_sent_twice():
    a2, b2 = tcp_pair()
    ra, rb = open_pair(Upgrade(later(a2, 0.3)), Upgrade(later(b2, 0.3)))
    got: dict = {}
    reader = threading.Thread(target=read_all, args=(rb, got), daemon=True)
    reader.start()
    total = 64 << 20
    data = pattern(total)
    view = memoryview(data)
    t0 = time.monotonic()
    for off in range(0, total, CHUNK):
        ra.sendall(view[off:off + CHUNK])
        time.sleep(0.005)                 # a stream, not one burst: the move comes mid-way
    ra.close(30)
    reader.join(60)
    assert "error" not in got, got.get("error")
    assert got["n"] == total and got["digest"] == hashlib.sha256(data).digest()
    assert ("lost", "moved") in whats(ra), whats(ra)
    assert ("lost", "peer-moved") in whats(rb), whats(rb)
    assert ("resumed", "0 bytes resent") in whats(ra), whats(ra)   # MOVED ended the old
    assert ra.sock is a2                                           # on the better one now
    assert time.monotonic() - t0 < 60


def test_a_receiving_initiator_moves_after_the_first_bytes_not_before():
    # the viewer (initiator) opens a camera (responder) that sends: the
    # first bytes come on the old path, the move only after them
    a2, b2 = tcp_pair()
    ra, rb = open_pair(Upgrade(later(a2, 0.0)), Upgrade(later(b2, 0.0)))
    time.sleep(0.2)                       # both better paths are in before any data
    rb.sendall(b"first frame")
    first = ra.recv(64)
    assert first == b"first frame"
    assert not any(w == "lost" for w, _ in whats(ra))       # it was not held behind a move
    got: dict = {}
    reader = threading.Thread(target=read_all, args=(ra, got), daemon=True)
    reader.start()
    more = pattern(8 << 20)
    rb.sendall(more)
    rb.close(30)
    reader.join(60)
    assert got.get("digest") == hashlib.sha256(more).digest(), got
    assert ("lost", "moved") in whats(ra), whats(ra)


def test_a_better_path_that_fails_is_noted_and_the_session_stays():
    ra, rb = open_pair(Upgrade(later(ConnectionError("no direct strategy worked"), 0.1)),
                       Upgrade(later(ConnectionError("no direct strategy worked"), 0.1)))
    time.sleep(0.3)
    ra.sendall(b"x" * 100000)
    got: dict = {}
    reader = threading.Thread(target=read_all, args=(rb, got), daemon=True)
    reader.start()
    ra.close(10)
    reader.join(30)
    assert got.get("n") == 100000, got
    notes = [d for w, d in whats(ra) if w == "upgrade-failed"]
    assert notes and "no direct strategy worked" in notes[0], whats(ra)
    assert not any(w == "lost" for w, _ in whats(ra))


def test_a_responder_drops_a_better_path_its_peer_never_takes(monkeypatch):
    monkeypatch.setattr(fs, "PEER_MOVE_TIMEOUT", 0.5)
    a2, b2 = tcp_pair()
    ra, rb = open_pair(None, Upgrade(later(b2, 0.0)))     # the initiator has none
    got: dict = {}
    reader = threading.Thread(target=read_all, args=(rb, got), daemon=True)
    reader.start()
    for _ in range(10):
        ra.sendall(b"y" * 1000)
        time.sleep(0.1)
    ra.close(10)
    reader.join(30)
    assert got.get("n") == 10000, got
    assert any(w == "upgrade-failed" and "did not move" in d for w, d in whats(rb)), whats(rb)
    assert b2.fileno() == -1                              # closed, not leaked
    a2.close()


def test_an_old_path_that_dies_while_the_better_one_is_made_goes_on_over_it():
    a2, b2 = tcp_pair()
    ra, rb = open_pair(Upgrade(later(a2, 1.0)), Upgrade(later(b2, 1.0)))
    got: dict = {}
    reader = threading.Thread(target=read_all, args=(rb, got), daemon=True)
    reader.start()
    ra.sendall(b"before")
    time.sleep(0.2)
    ra.sock.shutdown(socket.SHUT_RDWR)    # the relay's node died under both
    ra.sendall(b" after")                 # waits for the better path (UPGRADE_GRACE)
    ra.close(10)
    reader.join(30)
    assert got.get("digest") == hashlib.sha256(b"before after").digest(), got
    assert any(w == "resume" for w, _ in whats(ra)), whats(ra)
    assert ra.sock is a2


@pytest.mark.parametrize("running", [False, True], ids=["cancelled", "arrives-anyway"])
def test_closing_a_session_closes_a_better_path_that_comes_later(running):
    # a punch still pending is cancelled; one past cancelling (its
    # future running) is closed when its socket comes
    a2, b2 = tcp_pair()
    fut: concurrent.futures.Future = concurrent.futures.Future()
    if running:
        fut.set_running_or_notify_cancel()
    ra, rb = open_pair(Upgrade(fut), None)
    closer = threading.Thread(target=rb.close, args=(5,))
    closer.start()
    ra.close(5)
    closer.join(10)
    assert fut.cancelled() is not running
    if running:
        fut.set_result(a2)                # the done-callback closes it
    else:
        a2.close()                        # what a cancelled punch does with its socket
    assert a2.fileno() == -1
    b2.close()


@pytest.fixture(autouse=True)
def _bounded():
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < 90
