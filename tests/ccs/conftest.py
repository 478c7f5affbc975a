"""Fixtures for the CCS tests: a deployment (private CA, key store), a CCS
started on loopback inside the test's own event loop (uvloop), and a real
redis-server started by the test and stopped after it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from fastpunch.ccs import pki
from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.server import CCSServer, new_event_loop
from fastpunch.client import Device
from fastpunch.proto.backoff import Backoff


def arun(coro, timeout: float = 120):
    """Run a coroutine on a fresh uvloop loop, bounded in time."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


@dataclass
class Deployment:
    dir: str
    ca: str
    store: KeyStore
    keys: dict
    cluster_key: bytes = b""

    def enroll(self, name: str, *may_reach: str) -> bytes:
        self.keys[name] = self.store.add_device(name, may_reach)
        return self.keys[name]

    def enroll_pair(self) -> None:
        """The usual cast: "cam" may reach "viewer"."""
        self.enroll("cam", "viewer")
        self.enroll("viewer")

    def server(self, **kw) -> CCSServer:
        kw.setdefault("heartbeat", 5)
        if kw.get("registry") is not None and kw["registry"].shared:
            kw.setdefault("cluster_key", self.cluster_key)
        return CCSServer(self.store, pki.server_context(self.dir), **kw)

    def device(self, addr, name: str, key: bytes = None, **kw) -> Device:
        kw.setdefault("backoff", Backoff(base=0.05, cap=0.5))
        return Device(addr, name, key if key is not None else self.keys[name], ca_file=self.ca,
                      server_hostname="localhost", **kw)


@pytest.fixture
def deployment(tmp_path) -> Deployment:
    paths = pki.init(str(tmp_path / "ccs"))
    store = KeyStore(str(tmp_path / "ccs" / "keys.db"))
    cluster_key = os.urandom(32)
    (tmp_path / "ccs" / "cluster.key").write_text(cluster_key.hex())
    yield Deployment(str(tmp_path / "ccs"), paths["ca"], store, {}, cluster_key)
    store.close()


@contextlib.asynccontextmanager
async def running(server: CCSServer, port: int = 0, relay_port=0):
    addr = await server.start("127.0.0.1", port, relay_port)
    try:
        yield addr
    finally:
        await server.close()


async def answer_one(dev, info):
    """Answer the next offer ``dev`` gets; returns (asker, RendezvousReady)."""
    async for offer in dev.incoming():
        return offer.peer, await offer.answer(info)


async def rendezvous(a, b, peer: str, a_info, b_info, **kw) -> tuple:
    """a asks for peer (``kw``: rendezvous()'s options), b answers: returns
    (a's Ready, b's Ready, who b saw asking)."""
    answering = asyncio.create_task(answer_one(b, b_info))
    ra = await a.rendezvous(peer, a_info, **kw)
    asker, rb = await answering
    return ra, rb, asker


async def standing_info(server, name: str, other_than=None, seconds: float = 2.0):
    """The next-connection info ``name`` announced ahead to ``server``, once
    it is there (and is not ``other_than``); None if it never came."""
    for _ in range(int(seconds / 0.02)):
        info = server.sessions[name].standing if name in server.sessions else None
        if info is not None and info != other_than:
            return info
        await asyncio.sleep(0.02)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(redis_proc):
    yield redis_proc[0]


@pytest.fixture
def redis_proc(tmp_path):
    """A real redis-server on loopback: (its URL, its process), stopped after."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        proc.wait(10)
