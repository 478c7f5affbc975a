"""PeerConnection's channel helpers over a real connected socket pair (what
connect()/accept() hand back, minus the punching)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

from fastpunch.client import PeerConnection

KEY = os.urandom(32)


def pair() -> tuple:
    a, b = socket.socketpair()
    return (PeerConnection(a, "b", "direct", "symmetric", "initiator", KEY, None),
            PeerConnection(b, "a", "direct", "symmetric", "responder", KEY, None))


def test_secure_blocking_both_ways():
    ca, cb = pair()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", cb.secure()))
    t.start()
    sa = ca.secure()
    t.join(10)
    sb = out["b"]
    sa.sendall(b"camera frame")
    assert bytes(sb.recv(100)) == b"camera frame"
    sb.sendall(b"ack")
    assert bytes(sa.recv(100)) == b"ack"
    sa.close(), sb.close()


def test_secure_streams_asyncio():
    ca, cb = pair()

    async def main():
        (ra, wa), (rb, wb) = await asyncio.gather(ca.secure_streams(), cb.secure_streams())
        wa.write(b"x" * 100_000)
        await wa.drain()
        got = await rb.readexactly(100_000)
        wb.write(b"done")
        await wb.drain()
        back = await ra.readexactly(4)
        wa.close(), wb.close()
        return got, back

    got, back = asyncio.run(main())
    assert got == b"x" * 100_000 and back == b"done"
