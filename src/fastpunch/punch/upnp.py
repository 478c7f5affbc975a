"""``upnp``: the gateway forwards a port to us, so the peer just connects.

A device whose gateway grants port mappings (PCP, NAT-PMP or UPnP-IGD, see
:mod:`fastpunch.portmap`; natcheck finds out) maps its punch port before
announcing its candidates, and announces the mapped one. In this
strategy's slot that side listens on its punch port, and the other side
makes a plain kernel connect() to the mapped candidate; its own NAT,
whatever kind, lets an outbound connection out. When both sides have a
mapping, the initiator listens. No raw packets, no privilege: it works for
devices without CAP_NET_RAW too, and against any NAT on the connecting
side, ``napt-random`` included. (Devices that can craft segments do not
need this slot: the mapped candidate is a pair of their race, and the
peer's SYN through the mapping is answered like any other.)

The listener accepts only a connection from one of the peer's addresses;
anything else that finds the port in the slot is closed. The mapping is
deleted once the connection is made (or given up); conntrack keeps the
established flow.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional

from fastpunch.punch.base import Attempt, PunchContext, PunchFailed
from fastpunch.punch.kernel import SLOT_GUARD, connect_until, sleep_until
from fastpunch.punch.strategy import Slot, Strategy

RETRY = 0.1           # a refused connect (the listener not up yet) is retried after this


def listens(ctx: PunchContext) -> bool:
    """Which side waits for the other's connect()."""
    if ctx.ours.mapped() is None:
        return False
    return ctx.peer.mapped() is None or ctx.initiator


class Upnp(Strategy):
    name = "upnp"
    budget = 2.0
    crafted = False

    async def run(self, ctx: PunchContext, slot: Slot, attempt: Attempt,
                  cancel: Optional[asyncio.Event] = None) -> socket.socket:
        if listens(ctx):
            return await _listen(ctx, slot, attempt)
        mapped = ctx.peer.mapped()
        if mapped is None:
            raise PunchFailed("no-mapping", "neither side has a port mapping from its gateway")
        await sleep_until(slot.start)
        # from any port, not the punch port: the listener takes any port of
        # our address, and SYNs from the punch port would leave a conntrack
        # entry with the kernel's ISN on the 4-tuple crafted strategies use
        # next (measured: 2 of 20 symmetric opens after a failed upnp slot
        # never completed)
        sock = await connect_until(mapped.endpoint, 0, slot.end, attempt, RETRY,
                                   "connecting to the peer's mapped port")
        attempt.detail = f"to the peer's mapped port {mapped.port}"
        return sock


async def _listen(ctx: PunchContext, slot: Slot, attempt: Attempt) -> socket.socket:
    loop = asyncio.get_running_loop()
    mapped = ctx.ours.mapped()
    peers = {ctx.peer.public} | {c.addr for c in ctx.peer.reachable_at()}
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setblocking(False)
        lsock.bind(("0.0.0.0", ctx.local_port))
        lsock.listen(8)
        t0 = time.time()
        attempt.events.append((0.0, f"listening on {ctx.local_port} (mapped from external "
                                    f"port {mapped.port})"))
        while True:
            left = slot.end - SLOT_GUARD - time.time()      # see SLOT_GUARD
            if left <= 0:
                raise PunchFailed("timeout", f"the peer did not connect to external port "
                                             f"{mapped.port} before the slot ended")
            try:
                conn, addr = await asyncio.wait_for(loop.sock_accept(lsock), left)
            except asyncio.TimeoutError:
                continue
            attempt.seen += 1
            if addr[0] not in peers:
                attempt.events.append((round(time.time() - t0, 3),
                                       f"refused a connection from {addr[0]}:{addr[1]}"))
                conn.close()
                continue
            attempt.events.append((round(time.time() - t0, 3), f"accepted {addr[0]}:{addr[1]}"))
            attempt.detail = f"external port {mapped.port} -> {ctx.local_port}"
            conn.setblocking(True)
            return conn
    finally:
        lsock.close()


STRATEGY = Upnp()
