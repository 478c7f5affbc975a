"""A deployment inside a lab: a CCS node in the internet core, devices in
the sites' hosts, each on an event loop of its own thread.

    from fastpunch.lab import Lab
    from fastpunch.lab.deploy import LabCCS

    with Lab(a="nat", b="napt-random", hosts={"a": 2}) as lab, \\
            LabCCS(lab, tmpdir) as ccs:
        ccs.enroll("cam", "viewer")                 # cam may reach viewer
        ccs.enroll("viewer")
        la, cam = ccs.device("a", "cam")            # logged in on host a
        lb, viewer = ccs.device("a2", "viewer")     # on site a's second host
        lb.run(viewer.ready(15))                    # natcheck done (optional)
        accepting = lb.submit(viewer.accept())
        conn = la.run(cam.connect("viewer"), 60)

A namespace is a per-thread property (``setns``), so each place gets a
:class:`LoopThread`: a thread that entered the namespace and runs an event
loop forever; coroutines are handed to it from any thread (``run`` waits,
``submit`` returns a ``concurrent.futures.Future``). Every device placed on
one host shares that host's loop. The CCS is a real
:class:`fastpunch.ccs.server.CCSServer` with its own private CA and key
store in ``tmpdir``, listening on the lab's CCS address (``CCS_PORT``, its
relay on the next port). Used by the compatibility matrix
(``fastpunch lab matrix``), the punching tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future

from fastpunch.lab.topology import CCS_ADDR, CCS_ADDR6, LabError

__all__ = ["LoopThread", "LabCCS", "CCS_PORT"]

CCS_PORT = 7443             # the CCS's TLS port in the lab's core; its relay listens on +1


class LoopThread:
    """An event loop running forever on a daemon thread that lives in the
    lab namespace ``where`` (a host "a", "a2", ..., "gw-a", "inet": anything
    :meth:`Lab.ns` takes)."""

    def __init__(self, lab, where: str) -> None:
        from fastpunch.ccs.server import new_event_loop

        lab.ns(where)                     # an unknown place fails here, not in the thread
        self.where = where
        self.loop = new_event_loop()
        started = threading.Event()
        failed: list = []

        def body():
            try:
                with lab.inside(where):
                    asyncio.set_event_loop(self.loop)
                    started.set()
                    self.loop.run_forever()
            except BaseException as exc:          # setns refused: say so to the creator
                failed.append(exc)
                started.set()

        self.thread = threading.Thread(target=body, daemon=True, name=f"loop-{where}")
        self.thread.start()
        if not started.wait(10) or failed:
            self.loop.close()
            raise LabError(f"no event loop in {where!r}: "
                           f"{failed[0] if failed else 'the thread did not start'}")

    def run(self, coro, timeout: float = 120):
        """Run ``coro`` on this loop and wait (at most ``timeout`` s) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> Future:
        """Start ``coro`` on this loop; its result comes in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel what still runs on the loop (a relay admission, a task a
        failed trial left), then stop the loop and its thread."""
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        if self.thread.is_alive():
            try:
                self.run(cancel_all(), 10)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class LabCCS:
    """A deployment and a CCS node in the lab's internet core.

    ``tmpdir`` holds the CCS's CA, certificate and key store; ``server_kw``
    go to :class:`~fastpunch.ccs.server.CCSServer`. ``server`` is the node
    (``server.relay.bytes_total``: bytes it relayed), ``keys`` the enrolled
    devices' keys, ``paths["ca"]`` the CA devices trust. ``close()`` (or
    leaving the ``with`` block) stops every device loop and the CCS; log
    devices out (``loop.run(dev.close())``) before."""

    def __init__(self, lab, tmpdir: str, **server_kw) -> None:
        from fastpunch.ccs import pki
        from fastpunch.ccs.keystore import KeyStore
        from fastpunch.ccs.server import CCSServer

        self.dir = os.path.join(tmpdir, "ccs")
        self.paths = pki.init(self.dir, ["localhost"], [CCS_ADDR])
        self.store = KeyStore(os.path.join(self.dir, "keys.db"))
        self.keys: dict = {}
        self.lab = lab
        self.addr = (CCS_ADDR, CCS_PORT)
        self.core = LoopThread(lab, "inet")
        # dual stack when a site has IPv6: one listener on "::" takes both families
        self.dual = any(v is not None for v in getattr(lab, "v6", {}).values())
        if self.dual:
            server_kw.setdefault("public_addr", CCS_ADDR)
            server_kw.setdefault("public_addr6", CCS_ADDR6)
        self.server = CCSServer(self.store, pki.server_context(self.dir), **server_kw)
        try:
            self.core.run(self.server.start("::" if self.dual else CCS_ADDR, CCS_PORT,
                                            CCS_PORT + 1))
        except BaseException:
            self.core.stop()
            self.store.close()
            raise
        self.loops: dict = {}             # host name -> LoopThread
        self._closed = False

    def __enter__(self) -> "LabCCS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def enroll(self, name: str, *reach: str) -> None:
        """Add device ``name`` to the key store, allowed to reach ``reach``."""
        self.keys[name] = self.store.add_device(name, reach)

    def loop(self, host: str) -> LoopThread:
        """The event loop thread of ``host`` (made on first use)."""
        if host not in self.loops:
            self.loops[host] = LoopThread(self.lab, host)
        return self.loops[host]

    def device(self, site: str, name: str, *, over: int = 4, **kw) -> tuple:
        """(loop thread, Device logged in) for enrolled device ``name`` on
        ``site``: a site's first host ("a") or any other host of it ("a2",
        ...). ``over``: the family it logs in over (6: to the CCS's IPv6
        address, in a lab with IPv6). ``kw`` go to
        :class:`fastpunch.client.Device` (``nat=``, ``standing=``, ...). The
        login does not wait for natcheck: call ``loop.run(dev.ready(15))``
        for that."""
        from fastpunch.client import Device

        loop = self.loop(site)
        addr = (CCS_ADDR6, CCS_PORT) if over == 6 else self.addr
        dev = Device(addr, name, self.keys[name], ca_file=self.paths["ca"],
                     server_hostname="localhost", **kw)
        loop.run(dev.login())
        return loop, dev

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for loop in self.loops.values():
            loop.stop()
        self.loops.clear()
        self.core.run(self.server.close())
        self.core.stop()
        self.store.close()
