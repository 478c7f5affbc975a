"""Kernel sockets for the strategies that need no crafted segment (simopen,
upnp): connect() again and again until a slot ends, in asyncio."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import Optional

from fastpunch.punch.base import Attempt, PunchFailed, abort

__all__ = ["SLOT_GUARD", "connect_until", "sleep_until"]

# A kernel-socket strategy gives its slot up this long before the slot ends:
# the next strategy's first SYN (crafted, from the same port to the same peer)
# may arrive from then on, and a kernel socket still open would answer it
# with a SYN-ACK of its own ISN and, closed after that, hold the 4-tuple in
# FIN_WAIT1 (measured: the following strategies failed with EADDRNOTAVAIL).
SLOT_GUARD = 0.03
RETRY_MAX = 0.4          # a refused connect() is retried after 0.05, 0.1, 0.2, 0.4 s ...


async def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def connect_until(remote: tuple, local_port: int, end: float, attempt: Attempt,
                        retry: float, what: str) -> socket.socket:
    """Plain kernel connect() from ``local_port`` (0: any) to ``remote``,
    again until SLOT_GUARD before ``end``: one socket for as long as it
    lives (the kernel resends its SYN itself, and a socket closed mid-open
    would lose a crossing SYN-ACK), a new one after it dies (RST, refusal),
    ``retry`` s later and doubling up to RETRY_MAX, so a peer that keeps
    refusing never draws a storm. A socket given up is aborted (SO_LINGER
    0), so nothing of it stays on the 4-tuple. Returns the connected,
    blocking socket."""
    loop = asyncio.get_running_loop()
    t0 = time.time()
    stop = end - SLOT_GUARD
    last: Optional[BaseException] = None
    wait = retry
    while time.time() < stop:
        six = ":" in remote[0]
        s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if six:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setblocking(False)
            s.bind(("::" if six else "0.0.0.0", local_port))
            attempt.sent += 1
            attempt.events.append((round(time.time() - t0, 3),
                                   f"connect() to {remote[0]}:{remote[1]}"))
            await asyncio.wait_for(loop.sock_connect(s, remote), max(0.001, stop - time.time()))
            attempt.seen += 1
            s.setblocking(True)
            return s
        except asyncio.CancelledError:
            abort(s)
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
            why = getattr(exc, "strerror", None) or type(exc).__name__
            attempt.events.append((round(time.time() - t0, 3), f"failed: {why}"))
            abort(s)
            if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise PunchFailed("port-busy", f"{what}: port {local_port} is in use ({exc})")
            await asyncio.sleep(max(0.0, min(wait, stop - time.time())))
            wait = min(RETRY_MAX, wait * 2)
    raise PunchFailed("timeout", f"{what} did not complete ({last or 'no time left'})")
