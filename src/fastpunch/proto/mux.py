"""Many logical streams over one secure session, as a sans-IO machine.

One punch to a camera should serve every TCP connection a viewer's RTSP or
HTTP client opens. A :class:`Mux` runs over one reliable ordered byte stream
(the secure channel's plaintext, or a resumable session's) and carries any
number of *streams*, each a pair of byte streams with its own flow control:
a stream whose reader is slow stops only its own sender, never the others
(yamux, as libp2p uses it, is the model; the frames are our own).

The machine never touches a socket or a clock: ``receive_data(bytes)``
takes what the transport delivered, ``next_event()`` returns the next event
or ``NEED_DATA``, ``data_to_send()`` returns the bytes owed to the
transport. ``open(label)`` starts a stream (the label says what it is for:
the agent's service name), ``accept``/``refuse`` answer the peer's,
``send(stream, data)`` takes as many bytes as the peer's window allows,
``consumed(stream, n)`` gives the peer credit once the application has
taken n bytes, ``close(stream)`` ends our direction, ``reset(stream,
reason)`` ends both at once. ``connection_lost()`` ends every stream when
the transport dies.

Frames (integers big-endian)::

    frame  = type:u8 stream:u32 length:u32 body[length]
    OPEN   = stream: the opener's next id   body: label (1..MAX_LABEL bytes)
    ACCEPT = body: empty                    the peer took the stream
    DATA   = body: 1..MAX_DATA bytes        within the receiver's window
    WINDOW = body: credit:u32               the receiver took that many more
    FIN    = body: empty                    no more DATA from the sender
    RESET  = body: reason (0..MAX_REASON bytes of ASCII)   both ways end
    PING   = stream 0, body: opaque:u64     answered by PONG with the same
    PONG   = stream 0, body: opaque:u64
    GOAWAY = stream 0, body: reason         the sender opens no more and
                                            accepts no more; streams go on

Stream ids: the channel's initiator opens odd ids, the responder even ones,
each side counting up from its first (1 or 2), so neither ever needs to ask
which ids are free and an OPEN can never collide. Every stream's window
starts at INITIAL_WINDOW bytes each way, so an opener may send DATA right
behind its OPEN (a viewer's first request costs no extra round trip); a
receiver grants more with WINDOW frames, as the application consumes what
it holds (every half window), so what a side buffers for a stream it is
not reading is bounded by that stream's window, and in all by
``max_streams`` times ``max_window``.

Window tuning (after go-yamux): a fixed window caps a stream at window/RTT
(256 KiB over a 40 ms path: 6.5 MB/s). The receiver doubles a stream's
window, up to ``max_window``, when the application consumed half of it in
less than four round trips (the sender, not the reader, was the limit), by
granting the extra bytes in the same WINDOW frame. The round trip is what
the caller measured and set as ``rtt`` (the asyncio face times a PING);
without it, or without ``now`` in ``consumed``, windows stay as they are.
A stalled reader consumes nothing, so its window never grows.

Limits and failures. A peer that opens more than ``max_streams`` streams at
once gets those beyond refused (RESET "too-many-streams": the mux goes on).
Everything else the peer may not do (an unknown frame type, a frame past
MAX_DATA, DATA past the window, an id of the wrong parity or going
backwards, a frame for a stream never opened, DATA after its FIN, a window
past 2**32-1) is a :class:`MuxViolation` with a stable code: the mux is
over, owes the peer a GOAWAY saying why, and raises it again. Frames for a
stream that ended here (a RESET crossing the peer's DATA) are dropped.

Rule 1 (after h11): what each frame may do in each state is in the tables
below; docs/agent.md describes the protocol for people.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Union

from fastpunch.errors import LocalProtocolError, RemoteProtocolError
from fastpunch.proto.channel import Role

__all__ = [
    "Mux", "FrameType", "MuxViolation", "MuxUsageError", "NEED_DATA",
    "StreamOpened", "StreamAccepted", "StreamData", "StreamEnded", "StreamReset",
    "WindowOpened", "Pong", "GoneAway", "MuxEvent",
    "HEADER", "HEADER_BYTES", "MAX_DATA", "MAX_LABEL", "MAX_REASON", "INITIAL_WINDOW",
    "MAX_WINDOW", "DEFAULT_MAX_STREAMS", "DEFAULT_MAX_WINDOW", "valid_label",
]

HEADER = struct.Struct("!BII")
HEADER_BYTES = HEADER.size                  # 9
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
MAX_DATA = 32 * 1024                        # bytes per DATA frame: streams interleave finely
MAX_LABEL = 255
MAX_REASON = 255
INITIAL_WINDOW = 256 * 1024                 # every stream's window, each way, at its start
MAX_WINDOW = (1 << 32) - 1
MAX_STREAM_ID = (1 << 32) - 1
DEFAULT_MAX_STREAMS = 64                    # streams the peer may hold open at once
DEFAULT_MAX_WINDOW = 4 * 1024 * 1024        # a stream's window grows to this, at most
_LABEL = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LABEL)    # printable ASCII, no spaces
_REASON = re.compile(rb"[\x20-\x7e]{0,%d}" % MAX_REASON)


def _ascii(text: Union[str, bytes]) -> bytes:
    """The bytes of ``text``; a non-ASCII character becomes a NUL, which no
    label or reason allows (so "caf\u00e9" is refused, not sent as "caf?")."""
    if isinstance(text, str):
        return text.encode("ascii", "replace").replace(b"?", b"\0") if not text.isascii() \
            else text.encode("ascii")
    return bytes(text)


def valid_label(label: Union[str, bytes]) -> bool:
    """A stream label: 1-255 printable ASCII characters, no spaces."""
    return bool(_LABEL.fullmatch(_ascii(label)))


class FrameType(enum.IntEnum):
    OPEN = 1
    ACCEPT = 2
    DATA = 3
    WINDOW = 4
    FIN = 5
    RESET = 6
    PING = 7
    PONG = 8
    GOAWAY = 9


_SESSION_FRAMES = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOAWAY})
#: body length each frame type allows: (least, most)
_BODY = {
    FrameType.OPEN: (1, MAX_LABEL), FrameType.ACCEPT: (0, 0), FrameType.DATA: (1, MAX_DATA),
    FrameType.WINDOW: (4, 4), FrameType.FIN: (0, 0), FrameType.RESET: (0, MAX_REASON),
    FrameType.PING: (8, 8), FrameType.PONG: (8, 8), FrameType.GOAWAY: (0, MAX_REASON),
}


class MuxViolation(RemoteProtocolError):
    """The peer broke the multiplexing protocol; ``code`` is stable
    (docs/agent.md). The mux is over."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


class MuxUsageError(LocalProtocolError):
    """A call the mux's or the stream's state forbids (``code``:
    "bad-argument", "unknown-stream", "closed", "going-away", "over")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamOpened:
    """The peer opened ``stream`` for ``label``: accept() or refuse() it
    (its DATA may already follow)."""
    stream: int
    label: str


@dataclass(frozen=True)
class StreamAccepted:
    """The peer took a stream we opened."""
    stream: int


@dataclass(frozen=True)
class StreamData:
    """Bytes of the peer's side of ``stream``; call consumed() once the
    application has taken them, or the peer's window stays spent."""
    stream: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded:
    """The peer's side of ``stream`` ended (its FIN): no more data."""
    stream: int


@dataclass(frozen=True)
class StreamReset:
    """``stream`` is over both ways: the peer reset or refused it, or (with
    ``local``) the transport died under it."""
    stream: int
    reason: str
    local: bool = False


@dataclass(frozen=True)
class WindowOpened:
    """The peer granted ``stream`` more window: send() takes more now."""
    stream: int
    window: int


@dataclass(frozen=True)
class Pong:
    opaque: int


@dataclass(frozen=True)
class GoneAway:
    """The peer opens and accepts no more streams (those open go on)."""
    reason: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
MuxEvent = Union[StreamOpened, StreamAccepted, StreamData, StreamEnded, StreamReset,
                 WindowOpened, Pong, GoneAway]


# -- a stream's state -------------------------------------------------------------------
class Phase(enum.Enum):
    OPENING = "opening"        # we opened it; the peer has not accepted yet
    OFFERED = "offered"        # the peer opened it; we have not answered yet
    OPEN = "open"              # accepted (both may have sent already)


class _Stream:
    __slots__ = ("id", "phase", "ours", "send_window", "recv_window", "unacked", "sent_fin",
                 "got_fin", "target", "credited_at")

    def __init__(self, sid: int, phase: Phase, ours: bool) -> None:
        self.id, self.phase, self.ours = sid, phase, ours
        self.send_window = INITIAL_WINDOW    # what the peer still takes
        self.recv_window = INITIAL_WINDOW    # what we still take
        self.unacked = 0                     # consumed, not yet granted back
        self.target = INITIAL_WINDOW         # the window we grant (tuned up to max_window)
        self.credited_at: Optional[float] = None
        self.sent_fin = False
        self.got_fin = False


#: Rule 1: the frames a stream may receive in each phase, and what each does.
#: (OPEN is handled before a stream exists; a frame left out is a violation.)
_MAY_RECEIVE = {
    Phase.OPENING: {FrameType.ACCEPT, FrameType.DATA, FrameType.WINDOW, FrameType.FIN,
                    FrameType.RESET},
    Phase.OFFERED: {FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RESET},
    Phase.OPEN: {FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RESET},
}


class Mux:
    """One side of the multiplexer. ``role``: this side's channel role (it
    decides the parity of the ids we open). ``max_streams``: streams the
    peer may hold open at once (those beyond are refused)."""

    def __init__(self, role: Union[str, Role], *, max_streams: int = DEFAULT_MAX_STREAMS,
                 max_window: int = DEFAULT_MAX_WINDOW) -> None:
        if not isinstance(role, Role):
            try:
                role = Role[str(role).upper()]
            except KeyError:
                raise MuxUsageError("bad-argument", "role is 'initiator' or 'responder', "
                                                    f"not {role!r}") from None
        if not isinstance(max_streams, int) or not 1 <= max_streams <= 1 << 20:
            raise MuxUsageError("bad-argument", f"max_streams is 1..{1 << 20}, not {max_streams!r}")
        if not isinstance(max_window, int) or not INITIAL_WINDOW <= max_window <= MAX_WINDOW:
            raise MuxUsageError("bad-argument", f"max_window is {INITIAL_WINDOW}..{MAX_WINDOW}, "
                                                f"not {max_window!r}")
        self.role = role
        self.max_streams = max_streams
        self.max_window = max_window
        #: the path's round trip in seconds, as the caller measured it (window tuning)
        self.rtt: Optional[float] = None
        self._next_id = 1 if role is Role.INITIATOR else 2
        self._peer_parity = 0 if role is Role.INITIATOR else 1
        self._peer_last = 0                  # the last id the peer opened
        self._streams: Dict[int, _Stream] = {}
        self._peer_open = 0                  # streams the peer opened that are still live
        self._inbuf = bytearray()
        self._out: List[bytes] = []
        self._events: Deque[MuxEvent] = deque()
        self._error: Optional[MuxViolation] = None
        self._lost = False
        self.going_away = False              # we sent GOAWAY
        self.peer_going_away = False         # the peer did

    # -- state ---------------------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Streams live now (ours and the peer's)."""
        return len(self._streams)

    def send_window(self, stream: int) -> int:
        """Bytes send() would take on ``stream`` now."""
        s = self._stream(stream)
        return 0 if s.sent_fin else s.send_window

    def is_live(self, stream: int) -> bool:
        return stream in self._streams

    # -- frames out ------------------------------------------------------------------------
    def _frame(self, kind: FrameType, stream: int, body: bytes = b"") -> None:
        self._out.append(HEADER.pack(kind, stream, len(body)))
        if body:
            self._out.append(body)

    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)

    def _usable(self) -> None:
        if self._error is not None:
            raise MuxUsageError("over", f"the mux is over: {self._error}")
        if self._lost:
            raise MuxUsageError("over", "the mux is over: its transport is gone")

    def _stream(self, stream: int) -> _Stream:
        s = self._streams.get(stream)
        if s is None:
            raise MuxUsageError("unknown-stream", f"no live stream {stream}")
        return s

    # -- calls -----------------------------------------------------------------------------
    def open(self, label: Union[str, bytes]) -> int:
        """A new stream for ``label``; returns its id. DATA may follow at once."""
        self._usable()
        raw = _ascii(label)
        if not _LABEL.fullmatch(raw):
            raise MuxUsageError("bad-argument", f"a label is 1-{MAX_LABEL} printable ASCII "
                                                f"characters without spaces, not {label!r}")
        if self.going_away or self.peer_going_away:
            raise MuxUsageError("going-away", "this mux opens no more streams (GOAWAY)")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise MuxUsageError("going-away", "stream ids are used up: open a new session")
        self._next_id += 2
        self._streams[sid] = _Stream(sid, Phase.OPENING, ours=True)
        self._frame(FrameType.OPEN, sid, raw)
        return sid

    def accept(self, stream: int) -> None:
        self._usable()
        s = self._stream(stream)
        if s.phase is not Phase.OFFERED:
            raise MuxUsageError("bad-argument", f"stream {stream} is not waiting for an answer")
        s.phase = Phase.OPEN
        self._frame(FrameType.ACCEPT, stream)

    def refuse(self, stream: int, reason: str = "refused") -> None:
        """Answer the peer's OPEN with no (a RESET saying why)."""
        s = self._stream(stream)
        if s.phase is not Phase.OFFERED:
            raise MuxUsageError("bad-argument", f"stream {stream} is not waiting for an answer")
        self.reset(stream, reason)

    def send(self, stream: int, data) -> int:
        """Queue as much of ``data`` as ``stream``'s window takes; returns how
        many bytes that was (0: wait for WindowOpened)."""
        self._usable()
        s = self._stream(stream)
        if s.sent_fin:
            raise MuxUsageError("closed", f"stream {stream}: our side is closed")
        view = memoryview(data).cast("B")
        n = min(len(view), s.send_window)
        for off in range(0, n, MAX_DATA):
            self._frame(FrameType.DATA, stream, bytes(view[off:min(n, off + MAX_DATA)]))
        s.send_window -= n
        return n

    def consumed(self, stream: int, n: int, now: Optional[float] = None) -> None:
        """The application took ``n`` bytes of ``stream``'s data: give the
        peer credit (a WINDOW frame every half window), and more window
        when the reader keeps up with the path (``now``: see the module's
        window tuning)."""
        s = self._streams.get(stream)
        if s is None or n <= 0 or self._error is not None or self._lost:
            return                           # (a stream that ended: nothing owed)
        s.unacked += n
        if s.unacked >= s.target // 2 and not s.got_fin:
            credit = s.unacked
            if now is not None and self.rtt is not None and s.credited_at is not None \
                    and now - s.credited_at < 4 * self.rtt and s.target < self.max_window:
                grow = min(s.target, self.max_window - s.target)
                s.target += grow
                credit += grow
            s.credited_at = now
            s.recv_window += credit
            self._frame(FrameType.WINDOW, stream, _U32.pack(credit))
            s.unacked = 0

    def window(self, stream: int) -> int:
        """The window we grant ``stream`` now (INITIAL_WINDOW, or tuned up)."""
        return self._stream(stream).target

    def close(self, stream: int) -> None:
        """End our side of ``stream`` (FIN); the peer's may go on."""
        self._usable()
        s = self._stream(stream)
        if s.sent_fin:
            return
        s.sent_fin = True
        self._frame(FrameType.FIN, stream)
        self._maybe_done(s)

    def reset(self, stream: int, reason: str = "reset") -> None:
        """End ``stream`` both ways at once; the peer is told ``reason``."""
        s = self._streams.get(stream)
        if s is None or self._error is not None or self._lost:
            return
        raw = reason.encode("ascii", "replace")[:MAX_REASON]
        if not _REASON.fullmatch(raw):
            raw = b"reset"
        self._frame(FrameType.RESET, stream, raw)
        self._drop(s)

    def ping(self, opaque: int) -> None:
        self._usable()
        self._frame(FrameType.PING, 0, _U64.pack(opaque & (1 << 64) - 1))

    def go_away(self, reason: str = "") -> None:
        """Open and accept no more streams; those open go on."""
        self._usable()
        if not self.going_away:
            self.going_away = True
            raw = reason.encode("ascii", "replace")[:MAX_REASON]
            self._frame(FrameType.GOAWAY, 0, raw if _REASON.fullmatch(raw) else b"")

    def connection_lost(self) -> None:
        """The transport died: every live stream is reset (local)."""
        if self._lost:
            return
        self._lost = True
        for s in list(self._streams.values()):
            self._drop(s)
            self._events.append(StreamReset(s.id, "session-lost", local=True))

    def _drop(self, s: _Stream) -> None:
        del self._streams[s.id]
        if not s.ours:
            self._peer_open -= 1

    def _maybe_done(self, s: _Stream) -> None:
        if s.sent_fin and s.got_fin and s.id in self._streams:
            self._drop(s)

    # -- frames in -------------------------------------------------------------------------
    def receive_data(self, data) -> None:
        if self._error is not None:
            raise self._error
        if self._lost:
            return
        self._inbuf += data
        try:
            self._parse()
        except MuxViolation as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: MuxViolation) -> None:
        self._error = exc
        self._inbuf.clear()
        self._frame(FrameType.GOAWAY, 0, exc.code.encode("ascii")[:MAX_REASON])
        for s in list(self._streams.values()):
            self._drop(s)
            self._events.append(StreamReset(s.id, exc.code, local=True))

    def next_event(self):
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def _parse(self) -> None:
        buf = self._inbuf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_BYTES:
                kind, sid, length = HEADER.unpack_from(buf, pos)
                try:
                    ftype = FrameType(kind)
                except ValueError:
                    raise MuxViolation("unknown-frame", f"frame type {kind} is not one "
                                                        "of ours") from None
                least, most = _BODY[ftype]
                if not least <= length <= most:
                    raise MuxViolation("bad-length", f"a {ftype.name} frame's body is "
                                                     f"{least}..{most} bytes, not {length}")
                end = pos + HEADER_BYTES + length
                if end > len(buf):
                    break
                self._on_frame(ftype, sid, bytes(buf[pos + HEADER_BYTES:end]))
                pos = end
        finally:
            del buf[:pos]

    def _on_frame(self, ftype: FrameType, sid: int, body: bytes) -> None:
        if ftype in _SESSION_FRAMES:
            if sid != 0:
                raise MuxViolation("bad-stream-id", f"{ftype.name} belongs to stream 0, "
                                                    f"not {sid}")
            if ftype is FrameType.PING:
                self._frame(FrameType.PONG, 0, body)
            elif ftype is FrameType.PONG:
                self._events.append(Pong(_U64.unpack(body)[0]))
            else:
                if not _REASON.fullmatch(body):
                    raise MuxViolation("bad-reason", "a GOAWAY's reason is printable ASCII")
                if not self.peer_going_away:
                    self.peer_going_away = True
                    self._events.append(GoneAway(body.decode("ascii")))
            return
        if sid == 0:
            raise MuxViolation("bad-stream-id", f"{ftype.name} needs a stream id, not 0")
        if ftype is FrameType.OPEN:
            self._on_open(sid, body)
            return
        s = self._streams.get(sid)
        if s is None:
            if self._known(sid):
                return                       # it ended here: a RESET crossed this frame
            raise MuxViolation("unknown-stream", f"{ftype.name} for stream {sid}, "
                                                 "never opened")
        if ftype not in _MAY_RECEIVE[s.phase]:
            raise MuxViolation("unexpected-frame", f"{ftype.name} on stream {sid} "
                                                   f"while {s.phase.value}")
        if ftype is FrameType.ACCEPT:
            if not s.ours:
                raise MuxViolation("unexpected-frame", f"ACCEPT of stream {sid}, "
                                                       "which the peer opened itself")
            s.phase = Phase.OPEN
            self._events.append(StreamAccepted(sid))
        elif ftype is FrameType.DATA:
            if s.got_fin:
                raise MuxViolation("data-after-fin", f"DATA on stream {sid} after its FIN")
            if len(body) > s.recv_window:
                raise MuxViolation("window-exceeded", f"{len(body)} bytes on stream {sid}, "
                                                      f"its window {s.recv_window}")
            s.recv_window -= len(body)
            self._events.append(StreamData(sid, body))
        elif ftype is FrameType.WINDOW:
            credit = _U32.unpack(body)[0]
            if s.send_window + credit > MAX_WINDOW:
                raise MuxViolation("window-overflow", f"stream {sid}'s window past 2**32-1")
            s.send_window += credit
            if credit and not s.sent_fin:
                self._events.append(WindowOpened(sid, s.send_window))
        elif ftype is FrameType.FIN:
            if s.got_fin:
                raise MuxViolation("data-after-fin", f"a second FIN on stream {sid}")
            s.got_fin = True
            self._events.append(StreamEnded(sid))
            self._maybe_done(s)
        else:                                # RESET
            if not _REASON.fullmatch(body):
                raise MuxViolation("bad-reason", "a RESET's reason is printable ASCII")
            self._drop(s)
            self._events.append(StreamReset(sid, body.decode("ascii") or "reset"))

    def _known(self, sid: int) -> bool:
        """An id that was opened once (by either side) and has ended."""
        if sid % 2 == self._peer_parity:
            return sid <= self._peer_last
        return sid < self._next_id

    def _on_open(self, sid: int, label: bytes) -> None:
        if sid % 2 != self._peer_parity:
            raise MuxViolation("bad-stream-id", f"the peer opened stream {sid}, an id of ours")
        if sid <= self._peer_last:
            raise MuxViolation("bad-stream-id", f"stream {sid} opened again (the last was "
                                                f"{self._peer_last})")
        if not _LABEL.fullmatch(label):
            raise MuxViolation("bad-label", "a label is printable ASCII without spaces")
        self._peer_last = sid
        s = _Stream(sid, Phase.OFFERED, ours=False)
        self._streams[sid] = s
        self._peer_open += 1
        if self.going_away:
            self.reset(sid, "going-away")
        elif self._peer_open > self.max_streams:
            self.reset(sid, "too-many-streams")
        else:
            self._events.append(StreamOpened(sid, label.decode("ascii")))
