"""Devices and a CCS inside a lab: each on its own thread and event loop,
each thread in its namespace (a site's host, or the internet core)."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future

from fastpunch.ccs import pki
from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.server import CCSServer, new_event_loop
from fastpunch.client import Device
from fastpunch.lab.topology import CCS_ADDR

CCS_PORT = 7443


class LoopThread:
    """An event loop running forever on a thread that lives in ``where``."""

    def __init__(self, lab, where: str) -> None:
        self.loop = new_event_loop()
        started = threading.Event()

        def body():
            with lab.inside(where):
                asyncio.set_event_loop(self.loop)
                started.set()
                self.loop.run_forever()

        self.thread = threading.Thread(target=body, daemon=True, name=f"loop-{where}")
        self.thread.start()
        started.wait(10)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class LabCCS:
    """A deployment and a CCS node in the lab's internet core."""

    def __init__(self, lab, tmpdir: str, **server_kw) -> None:
        self.dir = os.path.join(tmpdir, "ccs")
        self.paths = pki.init(self.dir, ["localhost"], [CCS_ADDR])
        self.store = KeyStore(os.path.join(self.dir, "keys.db"))
        self.keys = {}
        self.lab = lab
        self.core = LoopThread(lab, "inet")
        self.server = CCSServer(self.store, pki.server_context(self.dir), **server_kw)
        self.core.run(self.server.start(CCS_ADDR, CCS_PORT, CCS_PORT + 1))
        self.loops = {}

    def enroll(self, name: str, *reach: str) -> None:
        self.keys[name] = self.store.add_device(name, reach)

    def device(self, site: str, name: str, **kw) -> tuple:
        """(loop thread in the site, Device logged in)."""
        loop = self.loops.get(site) or LoopThread(self.lab, site)
        self.loops[site] = loop
        dev = Device((CCS_ADDR, CCS_PORT), name, self.keys[name], ca_file=self.paths["ca"],
                     server_hostname="localhost", **kw)
        loop.run(dev.login())
        return loop, dev

    def close(self) -> None:
        for loop in self.loops.values():
            loop.stop()
        self.core.run(self.server.close())
        self.core.stop()
        self.store.close()


def start_responder_late(monkeypatch, seconds: float) -> None:
    """The accepting side starts its first stage this long after the
    connecting side (a clock or scheduling skew, made exact)."""
    import asyncio
    from dataclasses import replace

    from fastpunch.proto.kinds import Role
    from fastpunch.punch import planner

    real = planner._run_stage

    async def late(stage, ctx, slot, attempt, cancel):
        if ctx.role is Role.RESPONDER:
            await asyncio.sleep(seconds)
            slot = replace(slot, start=slot.start + seconds)
        return await real(stage, ctx, slot, attempt, cancel)

    monkeypatch.setattr(planner, "_run_stage", late)
