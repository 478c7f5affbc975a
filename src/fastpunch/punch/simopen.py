"""``simopen``: plain kernel simultaneous open, the baseline and the path of
a device without the privileges crafted segments need. Both sides bind the
punch port and connect() toward every candidate pair of the other's at once
(one kernel socket each, SO_REUSEADDR), again until the slot ends; when the
SYNs cross, the kernel completes the handshake itself (netfilter-facts 4). The
first socket connected wins; the others are aborted."""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

from fastpunch.proto.candidates import form_pairs
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, abort
from fastpunch.punch.kernel import connect_until, sleep_until
from fastpunch.punch.strategy import Slot, Strategy, our_candidates

RETRY = 0.05


class SimOpen(Strategy):
    name = "simopen"
    budget = 3.0
    crafted = False

    async def run(self, ctx: PunchContext, slot: Slot, attempt: Attempt,
                  cancel: Optional[asyncio.Event] = None) -> socket.socket:
        await sleep_until(slot.start)
        pairs = form_pairs(our_candidates(ctx), ctx.peer.reachable_at(), ctx.role,
                           our_public=ctx.ours.public, peer_public=ctx.peer.public)
        if not pairs:
            raise PunchFailed("no-pairs", "no candidate pair to try")
        tasks = [asyncio.ensure_future(connect_until(p.remote.endpoint, ctx.local_port, slot.end,
                                                     attempt, RETRY, "kernel simultaneous open"))
                 for p in pairs]
        winner = None
        last: Optional[BaseException] = None
        try:
            pending = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None and winner is None:
                        winner = t.result()
                        i = tasks.index(t)
                        attempt.winner = str(pairs[i])
                    elif t.exception() is not None:
                        last = t.exception()
                    else:
                        abort(t.result())        # a second one connected: not ours
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for t in tasks:
                try:
                    sock = await t
                except BaseException:
                    continue
                if sock is not winner:
                    abort(sock)
        if winner is None:
            raise last if isinstance(last, PunchFailed) else \
                PunchFailed("timeout", f"kernel simultaneous open did not complete ({last})")
        return winner


STRATEGY = SimOpen()
