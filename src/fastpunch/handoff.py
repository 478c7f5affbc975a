"""Hand a crafted, established TCP flow to the kernel with TCP_REPAIR.

After our raw SYN / SYN-ACK / ACK exchange, the kernel knows nothing of the
flow. A socket in repair mode can be given its whole state: bound to our
address and port, its send and receive sequence numbers set, "connected"
without a packet, the options both SYNs negotiated (MSS, window scale,
SACK-permitted, timestamps) and the windows. Leaving repair mode makes it an
ordinary ESTABLISHED socket, and data flows through the kernel's own TCP at
full speed. The order follows CRIU's (criu/sk-tcp.c) and the kernel's checks
in net/ipv4/tcp.c (tcp_repair_set_window, tcp_repair_options_est).

IPv4 and IPv6 alike (the family is the local address's). Needs
CAP_NET_ADMIN (the kernel refuses TCP_REPAIR otherwise).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Callable, Optional

from fastpunch.errors import FastpunchError, InsufficientPrivilegeError
from fastpunch.proto.punch import Established

__all__ = ["FlowState", "Established", "repair_socket", "HandoffError"]

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8


class HandoffError(FastpunchError, OSError):
    """The kernel refused a step of the repair hand-off; ``step`` names it."""

    def __init__(self, step: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"TCP_REPAIR hand-off failed at {step}: {exc.strerror}")
        self.step = step


# The established flow's state is the punch machine's result (pure data).
FlowState = Established


def _u32(value: int) -> bytes:
    """setsockopt's int form is signed: sequence numbers past 2**31 go as bytes."""
    return struct.pack("=I", value & 0xFFFFFFFF)


def _set(sock: socket.socket, step: str, opt: int, value) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise InsufficientPrivilegeError("CAP_NET_ADMIN", "TCP_REPAIR hand-off") from exc
        raise HandoffError(step, exc) from exc


def repair_socket(state: Established, *, nonblocking: bool = False,
                  late: Optional[Callable[[], bytes]] = None) -> socket.socket:
    """A kernel socket ESTABLISHED on ``state``'s flow, no packet sent.
    ``late`` (the punch machine's late_data) is called at the last moment
    before the socket joins the flow: the peer's bytes that came since
    ``state`` was taken, which the kernel dropped for want of a socket, go
    into the receive queue after ``state.received``."""
    family = socket.AF_INET6 if ":" in state.local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _set(sock, "repair-on", TCP_REPAIR, TCP_REPAIR_ON)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(state.local)
        except OSError as exc:
            raise HandoffError("bind", exc) from exc
        # The segment size this socket starts with is fixed at the repair
        # connect() below (tcp_connect_init: mss_cache from the path MTU and
        # the clamp in force then); the peer's MSS, set with the options
        # after it, raises no recomputation. So the clamp before it is the
        # smaller of the peer's MSS and ours (what our SYN announced, from
        # the route): without it the socket sent 1448-byte segments toward a
        # peer on a 1280-byte link that had announced 1240.
        _set(sock, "maxseg", socket.TCP_MAXSEG,
             min(state.mss, state.advmss) if state.advmss else state.mss)
        _set(sock, "send-queue", TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _set(sock, "send-seq", TCP_QUEUE_SEQ, _u32(state.snd_nxt))
        _set(sock, "recv-queue", TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        extra = late() if late is not None else b""
        received = state.received + extra
        rcv_nxt = (state.rcv_nxt + len(extra)) & 0xFFFFFFFF
        _set(sock, "recv-seq", TCP_QUEUE_SEQ, _u32(rcv_nxt - len(received)))
        try:
            sock.connect(state.peer)            # repair mode: straight to ESTABLISHED
        except OSError as exc:
            raise HandoffError("connect", exc) from exc
        if received:
            # still in repair mode with the receive queue selected: a send()
            # queues the bytes for our reader and moves rcv_nxt past them
            try:
                queued = sock.send(received)
            except OSError as exc:
                raise HandoffError("recv-queue-data", exc) from exc
            if queued != len(received):
                raise HandoffError("recv-queue-data", OSError(
                    errno.EMSGSIZE, f"queued {queued} of {len(received)} bytes"))
        opts = [(TCPOPT_MSS, state.mss)]
        if state.snd_wscale is not None and state.rcv_wscale is not None:
            opts.append((TCPOPT_WINDOW, state.snd_wscale | (state.rcv_wscale << 16)))
        if state.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if state.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        _set(sock, "options", TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", c, v) for c, v in opts))
        if state.timestamps:
            _set(sock, "timestamp", TCP_TIMESTAMP, _u32(state.tsval))
        # struct tcp_repair_window {snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup}
        window = struct.pack("=IIIII", rcv_nxt, state.snd_wnd, state.snd_wnd,
                             state.rcv_wnd, rcv_nxt)
        _set(sock, "window", TCP_REPAIR_WINDOW, window)
        _set(sock, "repair-off", TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        sock.setblocking(not nonblocking)
        return sock
    except BaseException:
        sock.close()
        raise
