"""Many streams over one secure session, on asyncio: thin glue around
fastpunch.proto.mux.Mux.

    reader, writer = await conn.secure_streams()
    session = MuxSession(reader, writer, conn.role)
    stream = await session.open("camera-rtsp")      # the viewer
    await stream.write(b"OPTIONS ...");  await stream.read(65536)

    async for stream in session:                     # the camera
        stream.accept()  (or stream.refuse("no-such-service"))

Each :class:`MuxStream` has asyncio's stream shape (``read``, ``readexactly``,
``write`` + ``drain`` as one awaitable ``write``, ``write_eof``, ``close``)
and its own flow control: what a stream's reader has not taken holds back
that stream's sender only. All protocol decisions are in proto/mux.py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Deque, Dict, Optional

from fastpunch.errors import FastpunchError
from fastpunch.proto import mux as _m
from fastpunch.proto.mux import MuxUsageError, MuxViolation

__all__ = ["MuxSession", "MuxStream", "StreamResetError", "MuxViolation", "MuxUsageError"]

READ_CHUNK = 256 * 1024
RTT_EVERY = 30.0                 # seconds between round-trip timings
CLOSE_TIMEOUT = 5.0              # seconds close() lets buffered bytes drain before aborting


class StreamResetError(FastpunchError, ConnectionResetError):
    """The stream ended both ways before its data did: the peer reset or
    refused it (``reason``: its word, e.g. "no-such-service"), or the
    session under it died (``local``)."""

    def __init__(self, stream: int, reason: str, local: bool = False) -> None:
        who = "the session under it ended" if local else "the peer reset it"
        super().__init__(f"stream {stream}: {who} ({reason})")
        self.stream, self.reason, self.local = stream, reason, local


class MuxStream:
    """One logical stream of a :class:`MuxSession`."""

    def __init__(self, session: "MuxSession", sid: int, label: str, ours: bool) -> None:
        self._s = session
        self.id, self.label, self.ours = sid, label, ours
        self._chunks: Deque[bytes] = deque()
        self._eof = False
        self._reset: Optional[StreamResetError] = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._answered: asyncio.Future = asyncio.get_running_loop().create_future()
        self.bytes_in = self.bytes_out = 0
        if not ours:
            self._answered.set_result(None)      # (ours: the peer's ACCEPT or RESET)

    # -- events from the session ---------------------------------------------------------
    def _on(self, ev) -> None:
        if isinstance(ev, _m.StreamData):
            self._chunks.append(ev.data)
            self._readable.set()
        elif isinstance(ev, _m.StreamEnded):
            self._eof = True
            self._readable.set()
        elif isinstance(ev, _m.StreamReset):
            self._reset = StreamResetError(self.id, ev.reason, ev.local)
            self._readable.set()
            self._writable.set()
            if not self._answered.done():
                self._answered.set_exception(self._reset)
                self._answered.exception()       # (retrieved: nobody may wait for it)
        elif isinstance(ev, _m.StreamAccepted):
            if not self._answered.done():
                self._answered.set_result(None)
        elif isinstance(ev, _m.WindowOpened):
            self._writable.set()

    # -- answering the peer's open -------------------------------------------------------
    def accept(self) -> None:
        """Take the peer's stream; StreamResetError if it ended meanwhile
        (the peer gave up, or the session died)."""
        if self._reset is not None:
            raise self._reset
        self._s._mux.accept(self.id)
        self._s._flush()

    def refuse(self, reason: str = "refused") -> None:
        """Say no to the peer's stream (nothing to do if it ended meanwhile)."""
        if self._reset is not None:
            return
        self._s._mux.refuse(self.id, reason)
        self._reset = StreamResetError(self.id, reason, local=True)
        self._s._forget(self.id)
        self._s._flush()

    async def accepted(self) -> None:
        """Wait for the peer's answer to our open; StreamResetError if no."""
        await asyncio.shield(self._answered)

    # -- reading -------------------------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: one chunk as it came); b"" at the peer's end."""
        while not self._chunks:
            if self._reset is not None:
                raise self._reset
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        first = self._chunks[0]
        if n < 0 or n >= len(first):
            self._chunks.popleft()
            out = first
        else:
            out, self._chunks[0] = first[:n], first[n:]
        self.bytes_in += len(out)
        self._s._mux.consumed(self.id, len(out), self._s._loop.time())
        self._s._flush()
        return out

    async def readexactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    @property
    def was_accepted(self) -> bool:
        """The peer took the stream (always, for a stream the peer opened)."""
        f = self._answered
        return f.done() and not f.cancelled() and f.exception() is None

    @property
    def error(self) -> Optional[StreamResetError]:
        """Why the stream was reset (the peer's reason, or local), if it was."""
        return self._reset

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    # -- writing -------------------------------------------------------------------------
    async def write(self, data) -> None:
        """Send all of ``data``, waiting for window as needed (and for the
        transport to drain)."""
        view = memoryview(data).cast("B")
        mux = self._s._mux
        while view:
            if self._reset is not None:
                raise self._reset
            self._writable.clear()
            try:
                n = mux.send(self.id, view)
            except MuxUsageError:
                if self._reset is not None:
                    raise self._reset from None
                raise
            self.bytes_out += n
            view = view[n:]
            self._s._flush()
            if view:
                await self._writable.wait()
        await self._s._drain()

    def write_eof(self) -> None:
        """End our side (the peer reads b"" after what we sent)."""
        if self._reset is None and self._s._mux.is_live(self.id):
            self._s._mux.close(self.id)
            self._s._flush()
            if not self._s._mux.is_live(self.id):
                self._s._forget(self.id)

    def reset(self, reason: str = "reset") -> None:
        if self._reset is None:
            self._s._mux.reset(self.id, reason)
            self._reset = StreamResetError(self.id, reason, local=True)
            self._readable.set()
            self._writable.set()
            self._s._forget(self.id)
            self._s._flush()

    def close(self) -> None:
        """Our side ends; what the peer still sends is dropped (a RESET
        if it has not ended its own side)."""
        if self._eof:
            self.write_eof()
        else:
            self.reset("closed")


class MuxSession:
    """The multiplexer over an asyncio (reader, writer) pair: a secure
    channel's SecureReader/SecureWriter, or plain streams in tests.
    ``role``: this side's channel role. Iterating it (``async for``) gives
    the streams the peer opens; it ends when the session does."""

    def __init__(self, reader, writer, role, *, max_streams: int = _m.DEFAULT_MAX_STREAMS,
                 max_window: int = _m.DEFAULT_MAX_WINDOW, name: str = "") -> None:
        self._mux = _m.Mux(role, max_streams=max_streams, max_window=max_window)
        self._loop = asyncio.get_running_loop()
        self._pings: Dict[int, float] = {}            # opaque -> when sent
        self._reader, self._writer = reader, writer
        self._streams: Dict[int, MuxStream] = {}
        self._incoming: asyncio.Queue = asyncio.Queue()
        self.name = name
        self.error: Optional[BaseException] = None    # why it ended, if not cleanly
        self.closed = asyncio.Event()
        self._task = self._loop.create_task(self._run())
        self._pinger = self._loop.create_task(self._ping_loop())

    @property
    def rtt(self) -> Optional[float]:
        """The session's round trip, timed by PING (window tuning uses it)."""
        return self._mux.rtt

    async def _ping_loop(self) -> None:
        """Time a PING now and every RTT_EVERY seconds (the path may change)."""
        n = 0
        while not self.closed.is_set():
            n += 1
            self._pings = {n: self._loop.time()}
            try:
                self._mux.ping(n)
            except MuxUsageError:
                return
            self._flush()
            await asyncio.sleep(RTT_EVERY)

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def going_away(self) -> bool:
        return self._mux.going_away or self._mux.peer_going_away

    def _flush(self) -> None:
        data = self._mux.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._lost(exc)

    def _forget(self, sid: int) -> None:
        self._streams.pop(sid, None)

    def _lost(self, exc: Optional[BaseException]) -> None:
        if self.error is None and exc is not None:
            self.error = exc
        self._mux.connection_lost()
        self._dispatch()

    async def _run(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                self._mux.receive_data(data)
                self._dispatch()
                self._flush()
                # what we owe a peer that does not read (PONGs, WINDOWs)
                # waits in the transport: stop reading until it drains
                await self._writer.drain()
        except MuxViolation as exc:
            self.error = exc
            self._dispatch()
            self._flush()                       # the GOAWAY saying why
        except asyncio.CancelledError:
            pass
        except Exception as exc:                 # the channel's or the socket's end
            self.error = exc
        finally:
            self._lost(None)
            self._incoming.put_nowait(None)
            if not self._writer.is_closing():
                self._writer.close()
            self._pinger.cancel()
            self.closed.set()

    def _dispatch(self) -> None:
        while True:
            try:
                ev = self._mux.next_event()
            except MuxViolation:
                return
            if ev is _m.NEED_DATA:
                return
            if isinstance(ev, _m.StreamOpened):
                stream = MuxStream(self, ev.stream, ev.label, ours=False)
                self._streams[ev.stream] = stream
                self._incoming.put_nowait(stream)
                continue
            if isinstance(ev, _m.Pong):
                sent = self._pings.pop(ev.opaque, None)
                if sent is not None:
                    self._mux.rtt = max(self._loop.time() - sent, 1e-6)
                continue
            if isinstance(ev, _m.GoneAway):
                continue                         # (the mux refuses opens after a GOAWAY)
            stream = self._streams.get(ev.stream)
            if stream is None:
                continue
            stream._on(ev)
            if isinstance(ev, _m.StreamReset) or not self._mux.is_live(ev.stream):
                self._forget(ev.stream)

    async def open(self, label: str) -> MuxStream:
        """A new stream for ``label``; write at once, or await
        ``stream.accepted()`` to know the peer took it."""
        if self.closed.is_set():
            raise MuxUsageError("over", f"the session is over: {self.error or 'closed'}")
        sid = self._mux.open(label)
        stream = MuxStream(self, sid, label, ours=True)
        self._streams[sid] = stream
        self._flush()
        return stream

    async def accept(self) -> Optional[MuxStream]:
        """The next stream the peer opens (accept() or refuse() it), None
        once the session is over."""
        if self.closed.is_set() and self._incoming.empty():
            return None
        item = await self._incoming.get()
        if item is None:
            self._incoming.put_nowait(None)      # for every later caller too
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> MuxStream:
        item = await self.accept()
        if item is None:
            raise StopAsyncIteration
        return item

    def go_away(self, reason: str = "") -> None:
        if not self.closed.is_set():
            self._mux.go_away(reason)
            self._flush()

    async def close(self) -> None:
        """End the session: every stream is reset, the transport closed."""
        if not self.closed.is_set():
            try:
                self._mux.go_away("closing")
                self._flush()
            except MuxUsageError:
                pass
            self._writer.close()
            self._task.cancel()
        await self.closed.wait()
        try:
            # what is still buffered goes out, unless the peer does not read
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass

    async def wait_closed(self) -> None:
        await self.closed.wait()
