"""Real-traffic probes the lab tests use: kernel TCP servers and clients
created inside a lab namespace."""

from __future__ import annotations

import contextlib
import errno
import random
import select
import socket
import threading
import time


class TcpServer:
    """A kernel TCP listener inside a namespace recording who connected."""

    def __init__(self, lab, where: str, addr: str, port: int) -> None:
        with lab.inside(where):
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((addr, port))
            self.sock.listen(64)
        self.peers: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                with contextlib.suppress(OSError):
                    conn, peer = self.sock.accept()
                    self.peers.append(peer)
                    conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(lab, where: str, dst: str, dport: int, sport: int = 0,
            timeout: float = 1.5) -> str:
    """'ok', 'refused' (RST) or 'timeout' for one kernel connect()."""
    with lab.inside(where):
        s = socket.socket()
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sport:
            s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        try:
            s.connect((dst, dport))
            return "ok"
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"


def simultaneous_open(lab, a: str, b: str, port: int = 45000, limit: float = 8.0) -> bool:
    """Both hosts bind ``port`` and connect to the other's public address in
    a retry loop (plain kernel simultaneous open). True when both connect."""
    results: dict = {}

    def side(me: str, peer: str) -> None:
        deadline = time.monotonic() + limit
        target = (lab.sites[peer].public_addr, port)
        while time.monotonic() < deadline:
            with lab.inside(me):
                s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.setblocking(False)
            err = s.connect_ex(target)
            if err in (0, errno.EINPROGRESS):
                _, w, _ = select.select([], [s], [], 0.3)
                if w and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    results[me] = True
                    time.sleep(0.5)       # let the peer's handshake finish too
                    s.close()
                    return
            s.close()
            # jittered: two sides retrying in lockstep through a RST-answering
            # gateway can keep resetting each other (seen once under CI load)
            time.sleep(random.uniform(0.02, 0.12))
        results[me] = False

    threads = [threading.Thread(target=side, args=(a, b)), threading.Thread(target=side, args=(b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit + 5)
    return results.get(a, False) and results.get(b, False)
