"""What every strategy takes and gives back."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from fastpunch.errors import FastpunchError


class PunchFailed(FastpunchError):
    """A strategy did not produce a connection; ``reason`` is a stable word."""

    def __init__(self, reason: str, message: str, **details) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class PunchContext:
    """Both sides' next-connection info, as one side sees it."""
    role: str                       # "initiator" or "responder"
    local_ip: str
    local_port: int
    iss: int
    peer_ip: str                    # the peer's public address (reflexive, from the CCS)
    peer_port: int
    peer_isn: int
    mss: int = 1460
    wscale: Optional[int] = 7
    sack_permitted: bool = True
    timestamps: bool = True
    peer_mss: int = 1460
    peer_wscale: Optional[int] = 7
    peer_sack_permitted: bool = True
    peer_timestamps: bool = True
    peer_nat: str = "unknown"
    nat: str = "unknown"            # our own NAT guess
    ccs_ip: str = ""                # the CCS's address, as we reach it (spoof's source)
    mapped_port: Optional[int] = None   # our gateway forwards this external port to local_port

    @property
    def mine_random(self) -> bool:
        return self.nat == "napt-random"


@dataclass
class Attempt:
    """One strategy's try: what it sent and saw, how long, how it ended."""
    strategy: str
    ok: bool = False
    seconds: float = 0.0
    sent: int = 0
    seen: int = 0
    reason: str = ""
    detail: str = ""
    events: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    peer: str
    path: str = ""                  # "direct" or "relay"
    strategy: str = ""
    seconds: float = 0.0            # from connect()/accept() to a connected socket
    attempts: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"peer": self.peer, "path": self.path, "strategy": self.strategy,
                "seconds": round(self.seconds, 4),
                "attempts": [a.as_dict() for a in self.attempts]}

    def lines(self) -> list[str]:
        out = [f"{self.peer}: {self.path or 'failed'} via {self.strategy or '-'} "
               f"in {self.seconds * 1000:.0f} ms"]
        for a in self.attempts:
            out.append(f"  {a.strategy:10s} {'ok' if a.ok else 'failed':6s} {a.seconds * 1000:7.0f} ms"
                       f"  sent {a.sent:4d} seen {a.seen:4d}  {a.reason} {a.detail}".rstrip())
            out.extend(f"      {t:8.3f}s {what}" for t, what in a.events)
        return out


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def in_this_netns(fn: Callable, *args):
    """Run blocking ``fn`` on a new thread in the calling thread's network
    namespace (executor threads would sit in the process's original one);
    returns a Future of its result."""
    import asyncio

    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

    def settle(exc, result):
        if fut.done():                      # the awaiting task gave up: drop a socket
            if result is not None and hasattr(result, "close"):
                result.close()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def body():
        try:
            # A thread inherits its creator's namespaces, so this is usually a
            # no-op; setns (which needs CAP_SYS_ADMIN even for the same
            # namespace) only when it is not.
            if os.fstat(fd).st_ino != os.stat("/proc/thread-self/ns/net").st_ino and \
                    _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            result = fn(*args)
        except BaseException as exc:      # handed to the awaiting task
            loop.call_soon_threadsafe(settle, exc, None)
        else:
            loop.call_soon_threadsafe(settle, None, result)
        finally:
            os.close(fd)

    threading.Thread(target=body, daemon=True, name="fastpunch-punch").start()
    return fut


_ties: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tie(sock: socket.socket, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` when the connection is done with: at :func:`release`
    (``PeerConnection.close``) or, failing that, when the socket object is
    garbage collected."""
    _ties.setdefault(sock, []).append(weakref.finalize(sock, cleanup))


def release(sock: socket.socket) -> None:
    """Run what :func:`tie` attached to ``sock`` (each once)."""
    for finalizer in _ties.pop(sock, []):
        finalizer()


def free_port() -> int:
    """A TCP port free on this host right now (bound once, released)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def route_source(peer_ip: str) -> str:
    """The local address the kernel would use toward ``peer_ip`` (no packet sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_ip, 9))
        return s.getsockname()[0]


# A kernel-socket strategy gives its slot up this long before the slot ends:
# the next strategy's first SYN (crafted, from the same port to the same peer)
# may arrive from then on, and a kernel socket still open would answer it
# with a SYN-ACK of its own ISN and, closed after that, hold the 4-tuple in
# FIN_WAIT1 (measured: the following strategies failed with EADDRNOTAVAIL).
SLOT_GUARD = 0.03


def kernel_connect(ctx: PunchContext, deadline: float, attempt: Attempt, retry: float,
                   what: str, local_port: Optional[int] = None) -> socket.socket:
    """Plain kernel connect() from our announced port to the peer's, again
    and again until SLOT_GUARD before ``deadline``: one socket for as long as
    it lives (the kernel resends its SYN itself, and a socket closed mid-open
    would lose a crossing SYN-ACK), a new one ``retry`` s after it dies (RST,
    refusal). A socket given up is aborted (SO_LINGER 0), so nothing of it
    stays on the 4-tuple. Returns the connected, blocking socket; ``what``
    names it in the error. ``local_port`` (default: our announced port; 0:
    any) is where the SYNs leave from."""
    t0 = time.time()
    port = ctx.local_port if local_port is None else local_port
    end = deadline - SLOT_GUARD
    last = None
    while time.time() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ctx.local_ip, port))
            s.setblocking(False)
            rc = s.connect_ex((ctx.peer_ip, ctx.peer_port))
            attempt.sent += 1
            attempt.events.append((round(time.time() - t0, 3),
                                   f"connect() to {ctx.peer_ip}:{ctx.peer_port}"))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, errno.errorcode.get(rc, str(rc)))
            _, w, _ = select.select([], [s], [], max(0.0, end - time.time()))
            if not w:
                raise OSError(errno.ETIMEDOUT, "no answer before the slot ended")
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, str(err)))
            attempt.seen += 1
            s.setblocking(True)
            return s
        except OSError as exc:
            last = exc
            attempt.events.append((round(time.time() - t0, 3), f"failed: {exc.strerror or exc}"))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            time.sleep(min(retry, max(0.0, end - time.time())))
    raise PunchFailed("timeout", f"{what} did not complete ({last})")


def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)
