"""Resumable sessions over real sockets: the transport under a stream dies
(torn down on loopback; silently cut by a netfilter rule between two fresh
namespaces, as a gateway that forgot the flow) and the stream goes on over a
new TCP connection, every byte once and in order."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time

import pytest

from fastpunch._netns import inside
from fastpunch.liveness import Keepalive
from fastpunch.session import ResumableSocket, ResumeListener, SessionLost

KEY = bytes(range(32))
CHUNK = 1 << 20


def pattern(total: int) -> bytes:
    """Deterministic, non-repeating at every offset that matters."""
    seed = hashlib.sha256(b"fastpunch").digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(32768))
    return (block * (total // len(block) + 1))[:total]


class Responder(threading.Thread):
    """Accepts the first transport, then resumes on what the listener gets;
    reads to the end, answers with the SHA-256 of what it got."""

    def __init__(self, listener: socket.socket, keepalive=None) -> None:
        super().__init__(daemon=True)
        self.listener, self.keepalive = listener, keepalive
        self.result: dict = {}

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            rs = ResumableSocket(conn, "responder", KEY, reconnect=ResumeListener(self.listener),
                                 keepalive=self.keepalive)
            self.result["rs"] = rs
            h, n = hashlib.sha256(), 0
            while True:
                data = rs.recv(CHUNK)
                if not data:
                    break
                h.update(data)
                n += len(data)
            rs.sendall(h.digest() + n.to_bytes(8, "big"))
            rs.close()
            self.result.update(digest=h.digest(), n=n, resumes=rs.resumes,
                               history=rs.history)
        except Exception as exc:          # reported by the test
            self.result["error"] = exc


def run_transfer(connect, listener, total: int, kill, keepalive=None, kill_at: int = 0):
    """Send ``total`` bytes initiator -> responder; call kill(initiator,
    responder) once kill_at bytes went. Returns (initiator, responder's result)."""
    responder = Responder(listener, keepalive)
    responder.start()
    ini = ResumableSocket(connect(), "initiator", KEY, reconnect=connect, keepalive=keepalive)
    data = pattern(total)
    view, sent, killed = memoryview(data), 0, False
    t0 = time.monotonic()
    while sent < total and time.monotonic() - t0 < 120:         # bounded
        ini.sendall(view[sent:sent + CHUNK])
        sent += CHUNK
        if not killed and sent >= kill_at:
            kill(ini, responder)
            killed = True
    ini.close_write()
    answer = b""
    while len(answer) < 40:
        part = ini.recv(40)
        if not part:
            break
        answer += part
    ini.close()
    responder.join(60)
    assert "error" not in responder.result, responder.result.get("error")
    assert answer == hashlib.sha256(data).digest() + total.to_bytes(8, "big")
    return ini, responder.result


def test_a_torn_down_transport_is_replaced_and_the_stream_is_byte_exact():
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()

    def kill(ini, responder):
        ini.sock.shutdown(socket.SHUT_RDWR)     # both ends see the transport end

    try:
        ini, res = run_transfer(lambda: socket.create_connection(addr, timeout=5),
                                listener, 64 << 20, kill, kill_at=20 << 20)
    finally:
        listener.close()
    assert ini.resumes == 1 and res["resumes"] == 1
    assert res["n"] == 64 << 20
    assert [e.what for e in ini.history][:4] == ["established", "lost", "resume", "resumed"]


def test_bytes_received_as_the_transport_fails_under_our_ack_are_kept():
    """The responder's write side dies while it reads: the ACK it owes for
    the bytes in hand fails. Those bytes are the application's already (the
    resume tells the sender so): they must reach it, not vanish."""
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()

    def kill(ini, responder):
        for _ in range(100):                    # bounded: the responder has its socket soon
            if "rs" in responder.result:
                break
            time.sleep(0.01)
        responder.result["rs"].sock.shutdown(socket.SHUT_WR)

    try:
        for _ in range(5):                      # the failure lands at a different byte each time
            ini, res = run_transfer(lambda: socket.create_connection(addr, timeout=5),
                                    listener, 8 << 20, kill, kill_at=1 << 20)
            assert res["n"] == 8 << 20 and res["resumes"] >= 1
    finally:
        listener.close()


def test_without_a_reconnect_route_the_loss_is_an_error_not_a_hang():
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()
    out = {}

    def serve():
        conn, _ = listener.accept()
        out["rs"] = ResumableSocket(conn, "responder", KEY)
        try:
            out["rs"].recv(10)
        except SessionLost as exc:
            out["lost"] = exc

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        ini = ResumableSocket(socket.create_connection(addr, timeout=5), "initiator", KEY)
        time.sleep(0.2)
        ini.sock.shutdown(socket.SHUT_RDWR)
        t.join(10)
        assert isinstance(out.get("lost"), SessionLost)
        assert "cannot resume" in str(out["lost"]) and out["lost"].code == "session-lost"
        with pytest.raises(SessionLost):
            ini.recv(10)
    finally:
        listener.close()


def test_a_stranger_on_the_resume_listener_is_refused_and_the_session_goes_on():
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()

    def kill(ini, responder):
        stranger = socket.create_connection(addr)
        stranger.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        stranger.close()
        ini.sock.shutdown(socket.SHUT_RDWR)

    try:
        ini, res = run_transfer(lambda: socket.create_connection(addr, timeout=5),
                                listener, 8 << 20, kill, kill_at=2 << 20)
    finally:
        listener.close()
    assert res["n"] == 8 << 20 and ini.resumes == 1


@pytest.mark.live
def test_a_silently_dead_path_is_found_and_256_mib_arrive_intact(veth):
    """The first connection's packets are all dropped mid-stream (the far
    gateway forgot the flow): the sender's user timeout finds it, it dials
    again, the receiver switches to the new stream as it arrives."""
    k = Keepalive(2, timeout=3)
    with inside(veth.ns_b):
        listener = socket.create_server((veth.addr_b, 9101))
    first: dict = {}

    def connect():
        with inside(veth.ns_a):
            sock = socket.create_connection((veth.addr_b, 9101), timeout=5)
        sock.settimeout(None)
        first.setdefault("port", sock.getsockname()[1])
        return sock

    def kill(ini, responder):
        port = first["port"]
        rules = (f"table inet cutflow {{\n chain i {{ type filter hook input priority -300; "
                 f"tcp dport {port} drop; tcp sport {port} drop; }}\n"
                 f" chain o {{ type filter hook output priority -300; "
                 f"tcp dport {port} drop; tcp sport {port} drop; }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", veth.ns_b, "nft", "-f", "-"], input=rules,
                       text=True, check=True)
        first["cut_at"] = time.monotonic()

    try:
        ini, res = run_transfer(connect, listener, 256 << 20, kill, keepalive=k,
                                kill_at=64 << 20)
    finally:
        listener.close()
    assert res["n"] == 256 << 20
    assert ini.resumes == 1 and res["resumes"] == 1
    lost = [e for e in ini.history if e.what == "lost"]
    resumed = [e for e in ini.history if e.what == "resumed"]
    assert [e.detail for e in lost] == ["path-lost"]           # ETIMEDOUT, not a hang
    assert resumed[0].at - first["cut_at"] <= k.busy_detection() + 3.0


# -- what the glue must not do: hang, stall, be hijacked, hoard --------------------------
def small_pair(**responder_kw):
    """An initiator and a responder (ResumeListener) on loopback, handshake done."""
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()
    box: dict = {}

    def serve():
        conn, _ = listener.accept()
        box["r"] = ResumableSocket(conn, "responder", KEY, keepalive=None,
                                   reconnect=ResumeListener(listener, **responder_kw))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ini = ResumableSocket(socket.create_connection(addr, timeout=5), "initiator", KEY,
                          reconnect=lambda: socket.create_connection(addr, timeout=5),
                          keepalive=None, resume_timeout=2)
    t.join(5)
    return ini, box["r"], listener, addr


def within(seconds: float, fn):
    """fn's result (or exception) and how long it took; fails if it hangs."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    return out


def test_close_keeps_to_its_timeout_while_the_peer_keeps_its_stream_open():
    ini, resp, listener, _ = small_pair()
    try:
        ini.sendall(b"x" * 10)
        out = within(6, lambda: ini.close(timeout=1))
        assert "error" not in out and out["took"] < 2.5, out
    finally:
        listener.close()


def test_resume_timeout_holds_when_the_new_transport_never_answers():
    silent = socket.create_server(("127.0.0.1", 0))
    ini, resp, listener, _ = small_pair()
    try:
        ini.reconnect = lambda: socket.create_connection(silent.getsockname(), timeout=5)
        ini.resume_timeout = 1
        ini.sock.shutdown(socket.SHUT_RDWR)
        out = within(6, lambda: ini.recv(10))
        assert isinstance(out.get("error"), SessionLost), out
        assert out["took"] < 2.5, out
    finally:
        listener.close(), silent.close()


def test_a_silent_stranger_on_the_listener_does_not_stall_the_stream():
    ini, resp, listener, addr = small_pair(preamble_timeout=5)
    stranger = socket.create_connection(addr)           # connects, says nothing
    try:
        time.sleep(0.05)
        ini.sendall(b"hello")
        out = within(6, lambda: resp.recv(10))
        assert out.get("result") == b"hello" and out["took"] < 1.0, out
    finally:
        stranger.close(), listener.close()


@pytest.mark.parametrize("what", ["bare-id", "forged-tag", "replayed"])
def test_a_preamble_from_someone_else_does_not_take_the_session_over(what):
    ini, resp, listener, addr = small_pair()
    try:
        ini.sendall(b"a")
        assert resp.recv(10) == b"a"
        sid = resp.session_id
        if what == "bare-id":
            head = b"FPS1" + sid
        elif what == "forged-tag":
            head = b"FPS1" + sid + (7).to_bytes(8, "big") + bytes(16)
        else:                               # a genuine preamble, already used
            box: dict = {}
            reader = threading.Thread(target=lambda: box.setdefault("got", resp.recv(10)))
            reader.start()                          # the responder takes part in the resume
            ini.sock.shutdown(socket.SHUT_RDWR)
            ini.sendall(b"b")                       # resumes: attempt 1 is accepted
            reader.join(5)
            assert box.get("got") == b"b"
            head = ini.session._make_preamble(1)    # noqa: SLF001 - what a recorder holds
        intruder = socket.create_connection(addr)
        intruder.sendall(head)
        time.sleep(0.1)
        before = resp.resumes
        ini.sendall(b"c")
        out = within(5, lambda: resp.recv(10))
        assert out.get("result") == b"c", out
        assert resp.resumes == before                # still on the initiator's transport
        assert "superseded" not in [e.detail for e in resp.history]
        intruder.close()
    finally:
        listener.close()


def test_a_peer_that_only_sends_cannot_fill_our_memory():
    ini, resp, listener, _ = small_pair()
    ini.max_unread = 2 * ini.session.window
    try:
        flood = threading.Thread(target=lambda: within(30, lambda: resp.sendall(b"r" * (32 << 20))),
                                 daemon=True)
        flood.start()
        out = within(20, lambda: ini.sendall(b"i" * (32 << 20)))  # and never recv()
        err = out.get("error")
        assert getattr(err, "code", None) == "unread-limit", out
        assert ini._plain.size <= ini.max_unread + ini.session.window   # noqa: SLF001
        got = 0                                      # nothing was lost: it is all there
        while got < 32 << 20:
            got += len(ini.recv(1 << 20))
        assert got == 32 << 20
    finally:
        listener.close()
