"""The secure channel over real streams: thin glue around proto.channel.Channel.

Two faces, one machine:

* blocking: ``SecureSocket(sock, role, session_key)`` wraps a connected socket
  (the handshake runs in the constructor unless ``handshake=False``), with
  ``sendall``, ``recv``, ``close``;
* asyncio: ``reader, writer = await secure_streams(reader, writer, role, key)``
  gives a ``SecureReader`` (``read``, ``readexactly``, ``at_eof``) and a
  ``SecureWriter`` (``write``, ``drain``, ``close``, ``wait_closed``).

All protocol decisions (what to accept, error codes, key schedule) live in
``fastpunch.proto.channel``; docs/channel.md describes them. Errors raised
here are that module's ``ChannelViolation`` / ``ChannelUsageError`` classes,
and ``fastpunch.liveness.PathLost`` when the kernel's keepalive or user
timeout found the path dead (ETIMEDOUT): never a silent hang.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

from fastpunch.liveness import Keepalive, PathLost, path_lost

from fastpunch.proto.channel import (
    NEED_DATA,
    Channel,
    ChannelUsageError,
    ChannelViolation,
    Cipher,
    Closed,
    Confirmed,
    Data,
    Role,
)

__all__ = ["SecureSocket", "SecureReader", "SecureWriter", "secure_streams",
           "ChannelViolation", "ChannelUsageError", "PathLost"]

#: Plaintext encrypted per socket write: 16 records. Bounds the extra memory a
#: huge sendall() needs, and lets the kernel drain one chunk while we seal
#: the next.
WRITE_CHUNK = 16 * 16384
#: Bytes asked of the kernel per read.
READ_CHUNK = 256 * 1024


class _Plaintext:
    """Decrypted bytes waiting for the reader: a queue of chunks, so a read
    that takes whole records copies nothing and a partial read copies only
    what it returns."""

    __slots__ = ("_chunks", "_off", "size")

    def __init__(self) -> None:
        self._chunks: deque = deque()
        self._off = 0
        self.size = 0

    def push(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def take_some(self, n: int) -> bytes:
        """Up to n bytes from the first chunk only (recv/read semantics:
        a short read is allowed), so whole records pass through uncopied."""
        first = self._chunks[0]
        off = self._off
        left = len(first) - off
        if left <= n:
            self._chunks.popleft()
            self._off = 0
            self.size -= left
            return first if off == 0 else first[off:]
        self._off = off + n
        self.size -= n
        return first[off:off + n]

    def take(self, n: int) -> bytes:
        """Up to n bytes (n < 0: everything)."""
        if n < 0 or n >= self.size:
            n = self.size
        chunks, out = self._chunks, []
        need = n
        while need:
            first = chunks[0]
            left = len(first) - self._off
            if left <= need:
                out.append(first if self._off == 0 else first[self._off:])
                chunks.popleft()
                self._off = 0
                need -= left
            else:
                out.append(first[self._off:self._off + need])
                self._off += need
                need = 0
        self.size -= n
        return out[0] if len(out) == 1 else b"".join(out)


@contextmanager
def _liveness(keepalive: Optional[Keepalive]) -> Iterator[None]:
    """ETIMEDOUT from the stream (the kernel gave the path up) as PathLost."""
    try:
        yield
    except OSError as exc:
        lost = path_lost(exc, keepalive)
        if lost is None:
            raise
        raise lost from exc


def _pump(channel: Channel, sink: _Plaintext) -> Union[bool, None]:
    """Drain the machine's events into sink. Returns True once the peer's
    close is in, None when it needs more bytes."""
    while True:
        event = channel.next_event()
        if event is NEED_DATA:
            return None
        if type(event) is Data:
            sink.push(event.data)
        elif type(event) is Closed:
            return True
        # Confirmed: nothing for the reader


# -- blocking ---------------------------------------------------------------------------
class SecureSocket:
    """A connected stream socket carrying the secure channel (blocking)."""

    def __init__(self, sock: socket.socket, role: Union[str, Role], session_key: bytes, *,
                 random: Callable[[int], bytes] = os.urandom, cipher: Optional[Cipher] = None,
                 handshake: bool = True, keepalive: Optional[Keepalive] = None) -> None:
        self.sock = sock
        self.keepalive = keepalive       # what the socket was given: named in PathLost
        self.channel = Channel(role, session_key, random=random, cipher=cipher)
        self._plain = _Plaintext()
        self._peer_closed = False
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        if handshake:
            self.handshake()

    @property
    def cipher(self) -> Optional[Cipher]:
        return self.channel.cipher

    def handshake(self) -> None:
        """Hellos both ways, then confirms both ways; returns when the peer
        is confirmed. Raises ChannelViolation (e.g. confirm-failed)."""
        with _liveness(self.keepalive):
            self._handshake()

    def _handshake(self) -> None:
        ch = self.channel
        self.sock.sendall(ch.start())
        while not ch.confirmed:
            try:
                event = ch.next_event()
            finally:
                # Our confirm goes out even if the peer's, right behind its
                # hello, failed: the peer then learns "confirm-failed" too.
                out = ch.data_to_send()
                if out:
                    self.sock.sendall(out)
            if event is NEED_DATA:
                ch.receive_data(self.sock.recv(READ_CHUNK))
            elif type(event) is not Confirmed:       # pragma: no cover - the machine forbids it
                raise ChannelUsageError("not-confirmed", f"{event!r} during the handshake")

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        send, encrypt = self.sock.sendall, self.channel.send_data
        with _liveness(self.keepalive):
            for off in range(0, len(view), WRITE_CHUNK):
                send(encrypt(view[off:off + WRITE_CHUNK]))

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize plaintext bytes (bytes-like: often a bytearray, so
        opened records reach the caller uncopied); b"" once the peer closed
        cleanly. EOF without the peer's close record raises Truncated."""
        plain = self._plain
        while not plain.size and not self._peer_closed:
            if _pump(self.channel, plain):
                self._peer_closed = True
            elif not plain.size:
                # recv_into one reused buffer: no 256 KiB object per read.
                with _liveness(self.keepalive):
                    n = self.sock.recv_into(self._rbuf)
                self.channel.receive_data(self._rview[:n] if n else b"")
        return plain.take_some(bufsize) if bufsize > 0 and plain.size else b""

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Up to ``nbytes`` (0: len(buffer)) plaintext bytes into ``buffer``,
        as socket.recv_into; 0 once the peer closed cleanly. Whole records
        are opened straight into the buffer (no copy between the cipher and
        the caller; give it at least 16 KiB for that); bytes of the buffer
        past the returned count are undefined."""
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes:
            view = view[:nbytes]
        if not view.nbytes:
            return 0
        plain, channel = self._plain, self.channel
        while True:
            if plain.size:
                chunk = plain.take_some(view.nbytes)
                n = len(chunk)
                view[:n] = chunk
                return n
            if self._peer_closed:
                return 0
            n = channel.read_into(view)
            if n:
                return n
            event = channel.next_event()
            if event is NEED_DATA:
                with _liveness(self.keepalive):
                    got = self.sock.recv_into(self._rbuf)
                channel.receive_data(self._rview[:got] if got else b"")
            elif type(event) is Data:
                plain.push(event.data)
            elif type(event) is Closed:
                self._peer_closed = True

    def close_write(self) -> None:
        """Send our close record and shut the socket for writing; recv()
        still works until the peer's close."""
        record = self.channel.close()
        if record:
            with _liveness(self.keepalive):
                self.sock.sendall(record)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Send our close record (best effort) and close the socket."""
        try:
            record = self.channel.close()
            if record and self.sock.fileno() >= 0:
                self.sock.sendall(record)
        except OSError:
            pass
        finally:
            self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def __enter__(self) -> "SecureSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- asyncio ---------------------------------------------------------------------------------
class _Shared:
    def __init__(self, channel: Channel, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, keepalive: Optional[Keepalive]) -> None:
        self.channel, self.reader, self.writer = channel, reader, writer
        self.keepalive = keepalive
        self.plain = _Plaintext()
        self.peer_closed = False


class SecureReader:
    """Plaintext side of an asyncio StreamReader carrying the channel."""

    def __init__(self, shared: _Shared) -> None:
        self._s = shared

    async def _fill(self) -> bool:
        """Get more plaintext; False at the peer's clean close."""
        s = self._s
        while True:
            if s.peer_closed:
                return False
            if _pump(s.channel, s.plain):
                s.peer_closed = True
            if s.plain.size:
                return True
            if not s.peer_closed:
                with _liveness(s.keepalive):
                    data = await s.reader.read(READ_CHUNK)
                s.channel.receive_data(data)

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: until the peer's close); b"" at its close."""
        plain = self._s.plain
        if n == 0:
            return b""
        if n < 0:
            while await self._fill():
                pass
            return plain.take(-1)
        if not plain.size and not await self._fill():
            return b""
        return plain.take_some(n)

    async def readexactly(self, n: int) -> bytes:
        plain = self._s.plain
        while plain.size < n:
            if not await self._fill():
                partial = plain.take(-1)
                raise asyncio.IncompleteReadError(partial, n)
        return plain.take(n)

    def at_eof(self) -> bool:
        return self._s.peer_closed and not self._s.plain.size


class SecureWriter:
    """Plaintext side of an asyncio StreamWriter carrying the channel."""

    def __init__(self, shared: _Shared) -> None:
        self._s = shared

    @property
    def transport(self) -> asyncio.BaseTransport:
        return self._s.writer.transport

    @property
    def cipher(self) -> Optional[Cipher]:
        return self._s.channel.cipher

    def write(self, data) -> None:
        if data:
            # Each send_data() result is a fresh buffer never touched again,
            # so the transport may keep it without copying.
            self._s.writer.write(self._s.channel.send_data(data))

    async def drain(self) -> None:
        with _liveness(self._s.keepalive):
            await self._s.writer.drain()

    def close(self) -> None:
        """Send our close record and close the transport."""
        record = self._s.channel.close()
        w = self._s.writer
        if record and not w.is_closing():
            w.write(record)
        w.close()

    def write_eof(self) -> None:
        """Send our close record (and a TCP FIN where possible); reading
        goes on until the peer's close."""
        record = self._s.channel.close()
        w = self._s.writer
        if record:
            w.write(record)
        if w.can_write_eof():
            w.write_eof()

    async def wait_closed(self) -> None:
        try:
            await self._s.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    def is_closing(self) -> bool:
        return self._s.writer.is_closing()

    def get_extra_info(self, name: str, default=None):
        return self._s.writer.get_extra_info(name, default)


async def secure_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         role: Union[str, Role], session_key: bytes, *,
                         random: Callable[[int], bytes] = os.urandom,
                         cipher: Optional[Cipher] = None,
                         keepalive: Optional[Keepalive] = None
                         ) -> tuple[SecureReader, SecureWriter]:
    """Run the handshake over (reader, writer) and return the plaintext pair.
    Raises ChannelViolation (e.g. confirm-failed) if the peer does not prove
    the key. ``keepalive``: the liveness settings of the stream under it
    (named in the PathLost a dead path raises)."""
    with _liveness(keepalive):
        ch = await _handshake(reader, writer, role, session_key, random, cipher)
    shared = _Shared(ch, reader, writer, keepalive)
    return SecureReader(shared), SecureWriter(shared)


async def _handshake(reader, writer, role, session_key, random, cipher) -> Channel:
    ch = Channel(role, session_key, random=random, cipher=cipher)
    writer.write(ch.start())
    await writer.drain()
    while not ch.confirmed:
        try:
            event = ch.next_event()
        finally:
            out = ch.data_to_send()         # owed even if the peer's confirm failed
            if out:
                writer.write(out)
        if out:
            await writer.drain()
        if event is NEED_DATA:
            ch.receive_data(await reader.read(READ_CHUNK))
    return ch
