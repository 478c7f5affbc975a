"""``fastpunch forward``: a service of a remote agent on a local port.

    fastpunch forward --to camera-1 --service camera-rtsp --listen 127.0.0.1:8554
    ffprobe rtsp://127.0.0.1:8554/stream

A :class:`Forwarder` listens on the local port; every client that connects
there becomes one stream of one secure session to the peer (connected on
the first client, shared by every later one, made again when it dies), and
the peer's agent splices it to its service. Unmodified clients (ffplay,
VLC, curl, a browser) need nothing else.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Callable, Optional

from fastpunch.agent.pipe import splice
from fastpunch.agent.service import LIST_LABEL, event
from fastpunch.errors import FastpunchError
from fastpunch.mux import MuxSession, StreamResetError
from fastpunch.proto.mux import DEFAULT_MAX_WINDOW

__all__ = ["Forwarder", "ForwardError"]


class ForwardError(FastpunchError):
    """The peer's agent refused the service (``reason``: "no-such-service",
    "not-allowed", "connect-failed"...), or no session could be made."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


_REFUSALS = {
    "no-such-service": "exposes no service {service!r}",
    "not-allowed": "does not let this device use {service!r}",
    "connect-failed": "could not reach its own {service!r} service",
    "too-many-streams": "has too many streams open from us",
    "going-away": "is shutting down",
}


class Forwarder:
    """``device``: a logged-in Device; ``peer``: the agent's name;
    ``service``: what to reach there."""

    def __init__(self, device, peer: str, service: str, *, strategies=None,
                 connect_timeout: float = 60.0, max_window: int = DEFAULT_MAX_WINDOW,
                 emit: Callable = event) -> None:
        self.device, self.peer, self.service = device, peer, service
        self.strategies = strategies
        self.connect_timeout = connect_timeout
        self.max_window = max_window
        self.emit = emit
        self._session: Optional[MuxSession] = None
        self._conn = None
        self._lock = asyncio.Lock()
        self.sessions = 0                     # sessions made so far
        self.clients = 0
        self.server: Optional[asyncio.AbstractServer] = None
        self._tasks: set = set()

    async def session(self) -> MuxSession:
        """The session to the peer: the live one, or a new one."""
        async with self._lock:
            s = self._session
            if s is not None and not s.closed.is_set() and not s.going_away:
                return s
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            conn = await asyncio.wait_for(self.device.connect(self.peer,
                                                              strategies=self.strategies),
                                          self.connect_timeout)
            try:
                reader, writer = await asyncio.wait_for(conn.secure_streams(), 30)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._session = MuxSession(reader, writer, conn.role, max_window=self.max_window,
                                       name=self.peer)
            self.sessions += 1
            self.emit("session", peer=self.peer, path=conn.path, strategy=conn.strategy,
                      number=self.sessions)
            return self._session

    def refusal(self, exc: StreamResetError) -> ForwardError:
        """The peer's reset of a stream, said as a ForwardError."""
        text = _REFUSALS.get(exc.reason, "refused the stream ({reason})")
        return ForwardError(f"{self.peer} " + text.format(service=self.service,
                                                          reason=exc.reason), exc.reason)

    async def open(self, label: Optional[str] = None, *, wait: bool = True):
        """A stream to the service (or ``label``), accepted by the peer
        (``wait=False``: at once, the peer's answer still to come: bytes
        written meanwhile travel behind the OPEN, a refusal ends the stream
        as a reset whose reason ``refusal()`` explains)."""
        for attempt in (1, 2):
            session = await self.session()
            try:
                stream = await session.open(label or self.service)
                if wait:
                    await stream.accepted()
                return stream
            except StreamResetError as exc:
                if exc.local and attempt == 1:    # the session died under us: once more
                    continue
                raise self.refusal(exc) from None
            except FastpunchError:
                if attempt == 1 and session.closed.is_set():
                    continue
                raise
        raise ForwardError(f"no session to {self.peer} holds", "session-lost")

    async def list_services(self) -> list:
        stream = await self.open(LIST_LABEL)
        data = b""
        while len(data) < 1 << 20:
            chunk = await stream.read()
            if not chunk:
                break
            data += chunk
        try:
            return list(json.loads(data)["services"])
        except (ValueError, KeyError, TypeError):
            raise ForwardError(f"{self.peer} sent no service list", "bad-list") from None

    async def _client(self, reader, writer) -> None:
        self.clients += 1
        number = self.clients
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # not waiting for the peer's ACCEPT: the client's first request
            # travels behind the OPEN (one round trip to the first byte)
            stream = await self.open(wait=False)
        except (OSError, asyncio.TimeoutError, FastpunchError) as exc:
            self.emit("client-refused", client=number, reason=str(exc) or type(exc).__name__)
            writer.transport.abort()             # the client sees its connection reset
            return
        self.emit("client-open", client=number, stream=stream.id)
        how = await splice(stream, reader, writer)
        err = stream.error
        if err is not None and not err.local and not stream.was_accepted:
            self.emit("client-refused", client=number, reason=str(self.refusal(err)))
            return
        self.emit("client-closed", client=number, how=how, bytes_in=stream.bytes_in,
                  bytes_out=stream.bytes_out)

    async def serve(self, host: str, port: int) -> tuple:
        """Listen on host:port; returns the bound address."""
        def spawn(reader, writer) -> None:
            task = asyncio.ensure_future(self._client(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.server = await asyncio.start_server(spawn, host, port)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
