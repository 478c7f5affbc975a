"""``upnp``: the gateway forwards a port to us, so the peer just connects.

A device whose gateway grants port mappings (PCP, NAT-PMP or UPnP-IGD, see
:mod:`fastpunch.portmap`; natcheck finds out and the device announces
its NAT as ``upnp``) asks for one for its next local port before it tells
the CCS its next-connection info, and announces the *external* port it was
given. In this strategy's slot that side listens on its local port, and the
other side makes a plain kernel connect() to the announced address and port;
its own NAT, whatever kind, lets an outbound connection out. When both sides
have a mapping, the initiator listens. No raw packets, no privilege: it
works for devices without CAP_NET_RAW too, and against any NAT on the
connecting side, ``napt-random`` included.

The listener accepts only a connection from the peer's public address
(announced by the CCS); anything else that finds the port in the slot is
closed. The mapping is deleted once the connection is made (or given up);
conntrack keeps the established flow.
"""

from __future__ import annotations

import select
import socket
import time

from fastpunch.punch.base import (SLOT_GUARD, Attempt, PunchContext, PunchFailed, kernel_connect,
                                  sleep_until)

NAME = "upnp"
RETRY = 0.1           # a refused connect (the listener not up yet) is retried after this


def listens(ctx: PunchContext) -> bool:
    """Which side waits for the other's connect()."""
    if ctx.mapped_port is None:
        return False
    return ctx.peer_nat != "upnp" or ctx.role == "initiator"


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    if listens(ctx):
        return _listen(ctx, deadline, attempt, start)
    if ctx.peer_nat != "upnp":
        raise PunchFailed("no-mapping", "neither side has a port mapping from its gateway")
    return _connect(ctx, deadline, attempt, start)


def _listen(ctx: PunchContext, deadline: float, attempt: Attempt, start: float):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("0.0.0.0", ctx.local_port))
        lsock.listen(8)
        t0 = time.time()
        attempt.events.append((0.0, f"listening on {ctx.local_port} (mapped from external "
                                    f"port {ctx.mapped_port})"))
        while True:
            left = deadline - SLOT_GUARD - time.time()      # see SLOT_GUARD
            if left <= 0:
                raise PunchFailed("timeout", f"the peer did not connect to external port "
                                             f"{ctx.mapped_port} before the slot ended")
            ready, _, _ = select.select([lsock], [], [], left)
            if not ready:
                continue
            conn, addr = lsock.accept()
            attempt.seen += 1
            if addr[0] != ctx.peer_ip:
                attempt.events.append((round(time.time() - t0, 3),
                                       f"refused a connection from {addr[0]}:{addr[1]}"))
                conn.close()
                continue
            attempt.events.append((round(time.time() - t0, 3),
                                   f"accepted {addr[0]}:{addr[1]}"))
            attempt.detail = f"external port {ctx.mapped_port} -> {ctx.local_port}"
            conn.setblocking(True)
            return conn
    finally:
        lsock.close()


def _connect(ctx: PunchContext, deadline: float, attempt: Attempt, start: float):
    sleep_until(start)
    # from any port, not the announced one: the listener takes any port of
    # our address, and SYNs from the announced port would leave a conntrack
    # entry with the kernel's ISN on the 4-tuple the crafted strategies use
    # next, which then judged their segments out of window (measured: 2 of
    # 20 symmetric opens after a failed upnp slot never completed)
    sock = kernel_connect(ctx, deadline, attempt, RETRY, "connecting to the peer's mapped port",
                          local_port=0)
    attempt.detail = f"to the peer's mapped port {ctx.peer_port}"
    return sock
