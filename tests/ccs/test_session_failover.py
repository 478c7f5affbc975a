"""A relayed session whose CCS node dies: two CCS processes sharing a real
redis-server, both devices logged in to node-1 and streaming through its
relay; node-1 is killed (SIGKILL, no goodbye) mid-stream. The devices fail
over to node-2 and the session resumes through node-2's relay, every byte
once and in order."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import threading
import time

from fastpunch.ccs.server import new_event_loop

from .test_registry import serve

TOTAL = 64 << 20
CHUNK = 1 << 20


class Loop:
    """An event loop on its own thread, where the devices live."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_relayed_session_resumes_through_another_node_when_its_node_dies(
        deployment, redis_url, tmp_path):
    deployment.enroll_pair()
    p1, addr1 = serve(deployment, redis_url, "node-1", tmp_path)
    p2, addr2 = serve(deployment, redis_url, "node-2", tmp_path)
    loop = Loop()
    cam = deployment.device([addr1, addr2], "cam", nat="nat")
    viewer = deployment.device([addr1, addr2], "viewer", nat="nat")
    try:
        loop.run(cam.login())
        loop.run(viewer.login())
        assert (cam.node, viewer.node) == ("node-1", "node-1")
        accepting = asyncio.run_coroutine_threadsafe(
            viewer.accept(strategies=["relay"], peer="cam"), loop.loop)
        ca = loop.run(cam.connect("viewer", strategies=["relay"]))
        cb = accepting.result(60)
        assert (ca.path, cb.path) == ("relay", "relay")
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("rs", cb.resumable(
            strategies=["relay"])))
        t.start()
        sender = ca.resumable(strategies=["relay"])
        t.join(30)
        receiver = out["rs"]
        got: dict = {}

        def receive():
            try:
                h, n = hashlib.sha256(), 0
                while data := receiver.recv(CHUNK):
                    h.update(data)
                    n += len(data)
                got.update(digest=h.digest(), n=n)
                receiver.close()
            except Exception as exc:        # reported below
                got["error"] = exc

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        payload = os.urandom(TOTAL)
        view = memoryview(payload)
        t0 = time.monotonic()
        for off in range(0, TOTAL, CHUNK):
            assert time.monotonic() - t0 < 120                  # bounded
            sender.sendall(view[off:off + CHUNK])
            if off == 16 << 20:
                os.kill(p1.pid, signal.SIGKILL)                 # node-1 dies, relay and all
                p1.wait(10)
        sender.close_write()
        while sender.recv(CHUNK):
            pass
        sender.close()
        reader.join(60)
        assert "error" not in got, got.get("error")
        assert got["n"] == TOTAL and got["digest"] == hashlib.sha256(payload).digest()
        assert sender.resumes >= 1 and receiver.resumes >= 1, sender.history
        assert (cam.node, viewer.node) == ("node-2", "node-2")
        history = [(e.what, e.detail) for e in sender.history]
        assert history[0] == ("established", "relay (relay)")
        assert ("resume", "relay (relay)") in history, history
    finally:
        for dev in (cam, viewer):
            try:
                loop.run(dev.close(), 20)
            except Exception:
                pass
        loop.stop()
        for p in (p1, p2):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
