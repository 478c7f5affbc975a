"""The asyncio UDP glue PCP and NAT-PMP share (SSDP uses its datagram queue).

A request is sent on a connected UDP socket (so ICMP errors surface) and
resent on :data:`RETRY_SCHEDULE`: retries at 0.25 s and 0.5 s, then a last
0.75 s, about 1.5 s per protocol (RFC 6887's and RFC 6886's schedules
shortened), all within one deadline. What comes back is handed to a pure
decoder; at most 64 datagrams wait in the queue."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Optional, Tuple

from ._common import PortMapError


RETRY_SCHEDULE = (0.25, 0.5, 0.75)      # seconds to wait after each (re)transmission
DEFAULT_TIMEOUT = sum(RETRY_SCHEDULE)   # per protocol


class _Datagrams(asyncio.DatagramProtocol):
    """Received datagrams (and ICMP errors) as a bounded queue."""

    def __init__(self) -> None:
        self.queue: "asyncio.Queue[Tuple[bytes, object]]" = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((b"", exc))


async def _next(proto: _Datagrams, until: float) -> Optional[Tuple[bytes, object]]:
    """The next datagram (or error) before loop time ``until``; None after."""
    loop = asyncio.get_running_loop()
    remaining = until - loop.time()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(proto.queue.get(), remaining)
    except asyncio.TimeoutError:
        return None


class _Exchange:
    """A connected UDP socket to gateway:port (so ICMP errors surface),
    sending requests on RETRY_SCHEDULE within one budget."""

    def __init__(self, what: str, deadline: float) -> None:
        self.what = what
        self.deadline = deadline
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.proto = _Datagrams()

    async def open(self, gateway: str, port: int) -> str:
        """Returns this host's address toward the gateway."""
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: self.proto, remote_addr=(gateway, port), family=socket.AF_INET)
        except OSError as exc:
            raise PortMapError("network", f"{self.what}: cannot reach {gateway}: {exc}") from exc
        return self.transport.get_extra_info("sockname")[0]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def ask(self, request: bytes, decode):
        """Send ``request`` until ``decode`` accepts a reply. A decode error
        carrying the gateway's result code ends the exchange; any other
        (malformed, stale, not ours) is ignored and reported on timeout."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        rejected: Optional[PortMapError] = None
        for wait in RETRY_SCHEDULE:
            if loop.time() >= self.deadline:
                break
            self.transport.sendto(request)
            until = min(loop.time() + wait, self.deadline)
            while True:
                item = await _next(self.proto, until)
                if item is None:
                    break
                data, extra = item
                if isinstance(extra, ConnectionRefusedError):
                    raise PortMapError("unreachable", f"{self.what}: the gateway answered port "
                                       "unreachable (no daemon)")
                if isinstance(extra, OSError):
                    raise PortMapError("network", f"{self.what}: {extra}")
                try:
                    return decode(data)
                except PortMapError as exc:
                    if exc.result is not None:
                        raise
                    rejected = exc
        more = f"; a reply was rejected: {rejected}" if rejected else ""
        raise PortMapError("timeout", f"{self.what}: no answer in time{more}")


def _check_third_party(what: str, internal_addr: str, local: str) -> str:
    if internal_addr in ("", "0.0.0.0"):
        return local
    if internal_addr != local:
        raise PortMapError("third-party", f"{what} maps for the requesting address only "
                           f"({local}), not {internal_addr}")
    return internal_addr
