"""A secure session that outlives its transports, as a sans-IO machine.

A :class:`Session` is one reliable, ordered, encrypted byte stream in each
direction between two devices. It runs over a *transport*, a TCP stream (a
punched direct connection, or one through a CCS relay) that carries one
:class:`~fastpunch.proto.channel.Channel`. When the transport dies (a gateway
forgot the flow, the relay's node died, the viewer changed address) the
session is *suspended*, not lost: the caller opens a new transport by any
route and calls :meth:`Session.resume`; every byte is delivered exactly once
and in order across the change.

Like the channel, the machine never touches a socket or a clock:
``receive_data(bytes)`` buffers what the current transport delivered (``b""``
is its EOF), ``next_event()`` returns the next event or ``NEED_DATA``,
``data_to_send()`` returns the bytes owed to the current transport,
``send(data)`` takes application bytes (as many as the window allows),
``close()`` ends our direction, ``poll(now)`` sends a delayed
acknowledgement. Randomness is injected (it reaches the channels' nonces).

Frames (inside the channel's plaintext; integers big-endian)::

    frame  = type:u8 length:u32 body[length]
    RESUME = received:u64 window:u32   first frame on every transport, each way
    DATA   = 1..MAX_FRAME application bytes
    ACK    = received:u64              cumulative
    FIN    = empty                     our stream ends; counts as one byte
    MOVED  = empty                     nothing more from us on this transport:
                                       we resume on a better one (moving())

Offsets are implicit: on one transport the channel delivers frames in order,
exactly once (a dropped, replayed or reordered record fails its MAC). A
side's ``received`` counts the bytes of the peer's stream it holds (FIN
counting as one). The sender keeps every byte the peer has not acknowledged
(at most ``window`` bytes: ``send`` accepts less, or nothing, when the window
is full: that is the back-pressure) and, on a new transport, resends from the
offset the peer's RESUME names. A receiver acknowledges every quarter of the
peer's window (the RESUME says what it is), on its FIN, and on ``poll`` once
``ack_delay`` has passed.

Keys. The first transport's channel runs under the CCS-issued pair key. Once
its hellos are in, both ends derive from the channel's exporter::

    session id  = exporter("fastpunch-session-v1 id", 16)
    resume key  = exporter("fastpunch-session-v1 resume key", 32)

Every later transport runs a fresh channel handshake under the resume key,
so a resume needs no CCS key and proves both ends hold this session's secret.
Both hello nonces are fresh each time: a recorded resume replayed to either
end fails its confirm, as does a forged one (``confirm-failed``). The
initiator prefixes a resumed transport with a preamble (cleartext, 44 bytes)::

    preamble = "FPS1" || session id[16] || attempt:u64 || tag[16]
    tag      = HMAC-SHA256(exporter("fastpunch-session-v1 preamble key", 32),
                           session id || attempt)[:16]

so a listener can tell which session a new stream resumes
(:func:`read_preamble`) and the session can tell, before it gives up a
working transport for the new one, that the session's other end sent it
(:meth:`Session.preamble_valid`): ``attempt`` counts the initiator's
resumes and must exceed the last one accepted, so a recorded preamble
replayed is refused as surely as a forged one.

Failures. Whatever breaks a transport (EOF, a cut inside a record, a record
that fails its MAC, a bad preamble, a failed confirm) is a
:class:`TransportLost` event: the session is suspended, keeps its data, and
can resume. What the authenticated peer says that contradicts the session
(an unknown frame, an ACK beyond what we sent, a RESUME behind what it already
acknowledged) is a :class:`SessionViolation`: the session is over.

Rule 1 (after h11): states and what each transition may do are in the
tables below; see docs/session.md.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

from fastpunch.errors import LocalProtocolError, RemoteProtocolError
from fastpunch.proto import channel as _ch
from fastpunch.proto.channel import Channel, ChannelViolation, Cipher, Role

__all__ = [
    "Session", "SessionState", "FrameType",
    "Established", "Resumed", "Data", "Closed", "Finished", "TransportLost", "NEED_DATA",
    "SessionEvent", "PathEvent", "SessionViolation", "SessionUsageError", "read_preamble",
    "PREAMBLE_MAGIC", "PREAMBLE_BYTES", "SESSION_ID_BYTES", "FRAME_HEADER_BYTES",
    "MAX_FRAME", "DEFAULT_WINDOW", "MIN_WINDOW", "DEFAULT_ACK_DELAY",
]

FRAME = struct.Struct("!BI")
FRAME_HEADER_BYTES = FRAME.size            # 5
_U64 = struct.Struct("!Q")
_RESUME = struct.Struct("!QI")
MAX_FRAME = 1 << 20                         # bytes of application data per DATA frame
DEFAULT_WINDOW = 4 << 20                    # unacknowledged bytes a sender keeps, at most
MIN_WINDOW = 4096
MAX_WINDOW = (1 << 32) - 1
DEFAULT_ACK_DELAY = 0.2                     # seconds a received byte waits for its ACK
SESSION_ID_BYTES = 16
HISTORY = 64                                # path-history entries kept, newest
PREAMBLE_MAGIC = b"FPS1"
_ATTEMPT = struct.Struct("!Q")
PREAMBLE_TAG_BYTES = 16
PREAMBLE_BYTES = len(PREAMBLE_MAGIC) + SESSION_ID_BYTES + _ATTEMPT.size + PREAMBLE_TAG_BYTES
#: A DATA frame smaller than this is copied next to its header into one
#: record; a larger one is sealed where it lies, its header a record apart.
_COPY_BELOW = 8192

_ID_LABEL = b"fastpunch-session-v1 id"
_RESUME_KEY_LABEL = b"fastpunch-session-v1 resume key"
_PREAMBLE_KEY_LABEL = b"fastpunch-session-v1 preamble key"


class FrameType(enum.IntEnum):
    RESUME = 1
    DATA = 2
    ACK = 3
    FIN = 4
    MOVED = 5


_FIXED_BODY = {FrameType.RESUME: _RESUME.size, FrameType.ACK: _U64.size, FrameType.FIN: 0,
               FrameType.MOVED: 0}


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"    # a transport's channel is confirming
    SYNC = "sync"              # confirmed; waiting for the peer's RESUME to resend from
    OPEN = "open"              # data flows both ways on the current transport
    SUSPENDED = "suspended"    # no transport: resume() on a new one
    FINISHED = "finished"      # both streams ended and our FIN is acknowledged
    ERROR = "error"            # a violation ended the session; it is raised again


#: Which transitions each state allows (rule 1): the event or call, and the
#: state it leads to. ``_goto`` refuses anything else.
TRANSITIONS: Dict[SessionState, frozenset] = {
    SessionState.HANDSHAKE: frozenset({SessionState.SYNC, SessionState.OPEN,
                                       SessionState.SUSPENDED}),
    SessionState.SYNC: frozenset({SessionState.OPEN, SessionState.SUSPENDED}),
    SessionState.OPEN: frozenset({SessionState.FINISHED, SessionState.SUSPENDED}),
    SessionState.SUSPENDED: frozenset({SessionState.HANDSHAKE}),
    SessionState.FINISHED: frozenset({SessionState.SUSPENDED}),   # a peer needs our last ACK
    SessionState.ERROR: frozenset(),
}


# -- errors ---------------------------------------------------------------------------
class SessionViolation(RemoteProtocolError):
    """The authenticated peer said something that contradicts the session.
    ``code`` is stable (docs/session.md); the session is over."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


class SessionUsageError(LocalProtocolError):
    """A call the session's state forbids (``code``: "bad-argument",
    "not-established", "closed")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Established:
    """The first transport's channel is confirmed: the session exists."""
    session_id: bytes


@dataclass(frozen=True)
class Resumed:
    """A later transport is confirmed and the peer said where it stands:
    ``resent`` bytes (FIN counting as one) go again, ``epoch`` counts transports."""
    epoch: int
    resent: int


@dataclass(frozen=True)
class Data:
    """The peer's bytes, in order. Bytes-like, not always bytes: a slice
    (memoryview) of the buffer the channel opened the records into, which
    nothing writes again; ``bytes(event.data)`` for a copy of one's own."""
    data: Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class PeerMoved:
    """The peer sent its last frame on this transport (MOVED): it resumes the
    session on a better one. Everything it sent here before is in."""


@dataclass(frozen=True)
class Closed:
    """The peer's stream ended (its FIN): nothing more will arrive."""


@dataclass(frozen=True)
class Finished:
    """Both streams ended and the peer holds all of ours: close the transport."""


@dataclass(frozen=True)
class PathEvent:
    """One entry of a session's path history: ``what`` is "established",
    "lost", "resume", "resumed", "finished", or a note of the caller's
    (note(): "upgrade-failed"...); ``at`` the clock's reading
    (None without a clock)."""
    at: Optional[float]
    epoch: int
    what: str
    detail: str


@dataclass(frozen=True)
class TransportLost:
    """The current transport is unusable (``code``: the channel's error code,
    "eof", "bad-preamble", "abandoned"); the session is suspended."""
    code: str
    message: str


NEED_DATA = _ch.NEED_DATA
SessionEvent = Union[Established, Resumed, Data, Closed, Finished, TransportLost, PeerMoved,
                     object]


def read_preamble(data: bytes) -> Optional[bytes]:
    """The session id a resumed transport starts with, None if ``data`` (the
    first bytes of a new stream, at least PREAMBLE_BYTES) is not a resume."""
    if len(data) < PREAMBLE_BYTES or bytes(data[:len(PREAMBLE_MAGIC)]) != PREAMBLE_MAGIC:
        return None
    return bytes(data[len(PREAMBLE_MAGIC):len(PREAMBLE_MAGIC) + SESSION_ID_BYTES])


def _keepable(data, n: int) -> Union[bytes, memoryview]:
    """The first n bytes of data, in a form nobody can change while we keep
    it: a slice of immutable bytes as is (no copy), anything else copied."""
    if isinstance(data, bytes):
        return data if n == len(data) else memoryview(data)[:n]
    view = memoryview(data)
    if isinstance(view.obj, bytes):
        return view[:n]
    return bytes(view[:n])


class Session:
    """One end of a resumable session. ``role`` and ``session_key`` as for
    :class:`Channel` (the first transport's key); ``window``: bytes we keep
    for resending, at most (back-pressure beyond); ``ack_delay``: seconds."""

    def __init__(self, role: Union[str, Role], session_key: bytes, *,
                 window: int = DEFAULT_WINDOW, ack_delay: float = DEFAULT_ACK_DELAY,
                 random: Callable[[int], bytes] = os.urandom,
                 cipher: Optional[Cipher] = None,
                 clock: Optional[Callable[[], float]] = None, path: str = "first transport"
                 ) -> None:
        if not isinstance(window, int) or not MIN_WINDOW <= window <= MAX_WINDOW:
            raise SessionUsageError("bad-argument",
                                    f"window must be {MIN_WINDOW}..{MAX_WINDOW} bytes")
        if not ack_delay >= 0:
            raise SessionUsageError("bad-argument", "ack_delay must be >= 0")
        self.window = window
        self.ack_delay = float(ack_delay)
        self._random = random
        self._cipher = cipher
        self._clock = clock                      # only to date the path history
        self._first_path = path
        self._channel = Channel(role, session_key, random=random, cipher=cipher)
        self.role = self._channel.role
        self.session_id: Optional[bytes] = None
        self._resume_key: Optional[bytes] = None
        self.epoch = 0                           # transports started, minus one
        self.state = SessionState.HANDSHAKE
        self._error: Optional[SessionViolation] = None
        self._out: List[bytes] = [self._channel.start()]
        self._events: Deque[object] = deque()
        self._preamble_left = 0                  # bytes of the peer's preamble still due
        self._preamble = bytearray()
        self._preamble_key: Optional[bytes] = None
        self._attempts = 0                       # initiator: preambles we sent
        self._peer_attempt = 0                   # responder: the newest accepted
        # -- our stream: offsets count bytes, FIN being the byte after the data
        self._kept: Deque[Union[bytes, memoryview]] = deque()   # unacknowledged, oldest first
        self._kept_base = 0                      # stream offset of _kept[0][0]
        self._written = 0                        # data bytes taken by send()
        self._fin = False                        # close() called
        self._acked = 0                          # the peer holds [0, _acked)
        self._sent = 0                           # emitted on this transport up to here
        self._emitted = 0                        # emitted on any transport up to here
        self._peer_window = DEFAULT_WINDOW
        # -- the peer's stream
        self._received = 0                       # we hold [0, _received), FIN included
        self._peer_fin = False
        self._acked_told = 0                     # what our last ACK or RESUME said
        self._ack_since: Optional[float] = None
        self._peer_synced = False                # the peer's RESUME seen on this transport
        self._peer_moved = False                 # the peer's MOVED seen on this transport
        self._moved_out = False                  # our MOVED sent on this transport
        # -- the frame parser
        self._hdr = bytearray()                  # a frame header (or fixed body) in pieces
        self._ftype = 0
        self._data_left = 0                      # bytes of the current DATA frame to come
        self._body_left = 0                      # bytes of the current fixed body to come
        self._finished = False                   # Finished was reported
        #: Where the session has been: (epoch, what, detail) for reports.
        self.history: Deque[PathEvent] = deque(maxlen=HISTORY)

    # -- state --------------------------------------------------------------------------
    def _goto(self, state: SessionState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"session: {self.state.value} -> {state.value} is not a "
                                 "transition")        # a bug in this module, not the peer's
        self.state = state

    def _note(self, epoch: int, what: str, detail: str) -> None:
        self.history.append(PathEvent(self._clock() if self._clock else None, epoch, what,
                                      detail))

    def note(self, what: str, detail: str = "") -> None:
        """Something the caller saw about the paths (a better path that did
        not come), into the history; the state is unchanged."""
        self._note(self.epoch, what, detail)

    @property
    def writable(self) -> int:
        """Bytes send() accepts now (0: wait for the peer's acknowledgements)."""
        if self._fin or self.state in (SessionState.FINISHED, SessionState.ERROR):
            return 0
        return max(0, self.window - (self._written - self._acked_data()))

    @property
    def unacknowledged(self) -> int:
        """Data bytes we hold for resending (the window's use)."""
        return self._written - self._acked_data()

    @property
    def received(self) -> int:
        """Bytes of the peer's stream we hold (its FIN counting as one)."""
        return self._received

    @property
    def resumable(self) -> bool:
        """The session exists and can take a new transport (also once
        finished: a peer that missed our last ACK needs one to finish)."""
        return self._resume_key is not None and self.state is not SessionState.ERROR

    def _acked_data(self) -> int:
        return min(self._acked, self._written)

    def _fail(self, exc: SessionViolation) -> SessionViolation:
        self.state = SessionState.ERROR
        self._error = exc
        self._kept.clear()
        self._out.clear()
        self._events.clear()
        return exc

    # -- transports ---------------------------------------------------------------------
    def resume(self, detail: str = "transport opened") -> None:
        """Start a new transport (any route): the current one, if any, is
        abandoned. The bytes to write first are in data_to_send().
        ``detail`` (the route, say) goes into the path history."""
        if self._error is not None:
            raise SessionUsageError("closed", "the session failed")
        if self._resume_key is None:
            raise SessionUsageError("not-established",
                                    "no session to resume before the first transport confirms")
        if self.state is not SessionState.SUSPENDED:
            # (Also when finished: our last ACK may have died with the transport.)
            self._lose("abandoned", "a new transport replaces this one", emit=False)
        self.epoch += 1
        self._channel = Channel(self.role, self._resume_key, random=self._random,
                                cipher=self._cipher)
        hello = self._channel.start()
        assert self.session_id is not None
        if self.role is Role.INITIATOR:
            self._attempts += 1
            self._out = [self._make_preamble(self._attempts), hello]
            self._preamble_left = 0
        else:
            self._out = [hello]
            self._preamble_left = PREAMBLE_BYTES
        self._preamble = bytearray()
        self._goto(SessionState.HANDSHAKE)
        self._note(self.epoch, "resume", detail)

    def _make_preamble(self, attempt: int) -> bytes:
        assert self.session_id is not None and self._preamble_key is not None
        body = self.session_id + _ATTEMPT.pack(attempt)
        tag = hmac.new(self._preamble_key, body, hashlib.sha256).digest()[:PREAMBLE_TAG_BYTES]
        return PREAMBLE_MAGIC + body + tag

    def preamble_valid(self, head: bytes) -> bool:
        """``head`` (a new stream's first PREAMBLE_BYTES) was sent by this
        session's initiator for an attempt newer than any accepted: safe to
        give up the current transport for. Changes nothing."""
        if self._preamble_key is None or self.role is not Role.RESPONDER or \
                len(head) < PREAMBLE_BYTES or read_preamble(head) != self.session_id:
            return False
        head = bytes(head[:PREAMBLE_BYTES])
        (attempt,) = _ATTEMPT.unpack_from(head, len(PREAMBLE_MAGIC) + SESSION_ID_BYTES)
        return attempt > self._peer_attempt and \
            hmac.compare_digest(self._make_preamble(attempt), head)

    def lose(self, code: str, message: str = "") -> None:
        """The caller found the current transport dead (a write failed, the
        keepalive gave up): suspend now, keeping every byte. ``code`` goes
        into the path history. No TransportLost event: the caller knows."""
        if self.state in (SessionState.HANDSHAKE, SessionState.SYNC, SessionState.OPEN,
                          SessionState.FINISHED):
            self._lose(code, message, emit=False)

    def _lose(self, code: str, message: str, *, emit: bool = True) -> None:
        """The current transport is gone: suspend, keep every byte."""
        self._goto(SessionState.SUSPENDED)
        self._out = []
        self._hdr = bytearray()
        self._data_left = self._body_left = 0
        self._peer_synced = False
        self._peer_moved = self._moved_out = False
        self._ack_since = None
        self._note(self.epoch, "lost", code)
        if emit:
            self._events.append(TransportLost(code, message))

    # -- receiving ----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the current transport; ``b""`` is its EOF."""
        if self.state in (SessionState.SUSPENDED, SessionState.ERROR, SessionState.FINISHED):
            return          # a dead transport's leftovers; after the end, only its close
        if self._preamble_left and data:
            take = data[:self._preamble_left]
            self._preamble += take
            self._preamble_left -= len(take)
            data = data[len(take):]
            if self._preamble_left == 0:
                if not self.preamble_valid(self._preamble):
                    self._lose("bad-preamble", "the new transport's preamble is not this "
                               "session's, or not a new attempt")
                    return
                (self._peer_attempt,) = _ATTEMPT.unpack_from(
                    self._preamble, len(PREAMBLE_MAGIC) + SESSION_ID_BYTES)
            if not data:
                return
        try:
            self._channel.receive_data(data)
        except _ch.ChannelUsageError as exc:     # data after EOF: the transport is broken
            self._lose("eof", str(exc))

    def next_event(self) -> SessionEvent:
        if self._error is not None:
            raise self._error
        try:
            while not self._events:
                if self.state is SessionState.SUSPENDED or self.state is SessionState.FINISHED:
                    return NEED_DATA
                if self._preamble_left:
                    if self._channel.eof:
                        self._lose("eof", "the transport ended before its preamble")
                        continue
                    return NEED_DATA
                try:
                    event = self._channel.next_event()
                except ChannelViolation as exc:
                    self._lose(exc.code, str(exc))
                    continue
                self._out.append(self._channel.data_to_send())
                if event is NEED_DATA:
                    return NEED_DATA
                self._on_channel_event(event)
            return self._events.popleft()
        except SessionViolation as exc:
            raise self._fail(exc)

    def _on_channel_event(self, event: object) -> None:
        if isinstance(event, _ch.Confirmed):
            self._on_confirmed()
        elif isinstance(event, _ch.Data):
            self._parse(event.data)
        elif isinstance(event, _ch.Closed):
            if self.state is SessionState.FINISHED:
                return
            self._lose("closed-early", "the peer closed the transport before the session ended")

    def _on_confirmed(self) -> None:
        if self.epoch == 0:
            self.session_id = self._channel.exporter(_ID_LABEL, SESSION_ID_BYTES)
            self._resume_key = self._channel.exporter(_RESUME_KEY_LABEL, _ch.KEY_BYTES)
            self._preamble_key = self._channel.exporter(_PREAMBLE_KEY_LABEL, 32)
            self._events.append(Established(self.session_id))
            self._note(0, "established", self._first_path)
        self._emit_frame(FrameType.RESUME, _RESUME.pack(self._received, self.window))
        self._acked_told = self._received
        self._ack_since = None
        if self.epoch == 0:
            # The peer holds nothing yet: data may go before its RESUME says so.
            self._sent = 0
            self._goto(SessionState.OPEN)
            self._flush()
        else:
            self._goto(SessionState.SYNC)

    # -- frames -------------------------------------------------------------------------
    def _parse(self, chunk: Union[bytes, bytearray]) -> None:
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            if self._data_left:                  # inside a DATA frame: pass it through
                n = min(self._data_left, end - pos)
                self._data_left -= n
                self._received += n
                # The channel's buffer is fresh for each run and never
                # written again: slices of it go out uncopied.
                self._events.append(Data(chunk if n == end else view[pos:pos + n]))
                pos += n
                if self._data_left == 0:
                    self._after_data()
                continue
            if self._body_left:                  # a fixed body, perhaps in pieces
                take = min(self._body_left, end - pos)
                self._hdr += view[pos:pos + take]
                pos += take
                self._body_left -= take
                if self._body_left:
                    return
                body = bytes(self._hdr)
                self._hdr = bytearray()
                self._on_frame(FrameType(self._ftype), body)
                continue
            take = min(FRAME_HEADER_BYTES - len(self._hdr), end - pos)
            self._hdr += view[pos:pos + take]
            pos += take
            if len(self._hdr) < FRAME_HEADER_BYTES:
                return
            ftype, length = FRAME.unpack(self._hdr)
            self._hdr = bytearray()
            kind = self._on_header(ftype, length)
            if kind is FrameType.DATA:
                continue
            if length:
                self._body_left = length
            else:
                self._on_frame(kind, b"")

    def _on_header(self, ftype: int, length: int) -> FrameType:
        try:
            kind = FrameType(ftype)
        except ValueError:
            raise SessionViolation("unknown-frame", f"frame type {ftype}") from None
        if not self._peer_synced and kind is not FrameType.RESUME:
            raise SessionViolation("unexpected-frame",
                                   f"{kind.name} frame before the peer's RESUME")
        if self._peer_synced and kind is FrameType.RESUME:
            raise SessionViolation("unexpected-frame", "a second RESUME on one transport")
        if self._peer_moved:
            raise SessionViolation("unexpected-frame", f"{kind.name} frame after the peer's "
                                   "MOVED on this transport")
        if kind is FrameType.DATA:
            if not 1 <= length <= MAX_FRAME:
                raise SessionViolation("bad-frame", f"DATA frame of {length} bytes "
                                       f"(1..{MAX_FRAME})")
            if self._peer_fin:
                raise SessionViolation("data-after-fin", "DATA after the peer's FIN")
            self._data_left = length
            return kind
        if length != _FIXED_BODY[kind]:
            raise SessionViolation("bad-frame", f"{kind.name} frame of {length} bytes, "
                                   f"not {_FIXED_BODY[kind]}")
        self._ftype = ftype
        return kind

    def _on_frame(self, kind: FrameType, body: bytes) -> None:
        if kind is FrameType.RESUME:
            received, window = _RESUME.unpack(body)
            self._on_resume(received, window)
        elif kind is FrameType.ACK:
            (received,) = _U64.unpack(body)
            self._on_ack(received)
        elif kind is FrameType.MOVED:
            self._peer_moved = True
            self._events.append(PeerMoved())
        else:                                    # FIN
            if self._peer_fin:
                raise SessionViolation("unexpected-frame", "a second FIN")
            self._peer_fin = True
            self._received += 1
            self._events.append(Closed())
            self._send_ack()                     # the peer may be waiting to finish
            self._check_finished()

    def _stream_end(self) -> int:
        return self._written + (1 if self._fin else 0)

    def _on_resume(self, received: int, window: int) -> None:
        if received < self._acked:
            raise SessionViolation("resume-behind",
                                   f"the peer resumes at {received} but acknowledged "
                                   f"{self._acked}: those bytes are gone")
        if received > (0 if self.epoch == 0 else self._emitted):
            raise SessionViolation("resume-ahead", f"the peer claims {received} bytes of "
                                   f"our stream; we ever sent {self._emitted if self.epoch else 0}")
        if window < MIN_WINDOW:
            raise SessionViolation("bad-frame", f"window of {window} bytes")
        self._peer_window = window
        self._peer_synced = True
        self._release(received)
        if self.epoch == 0:
            return
        resent = self._stream_end() - received
        self._sent = received
        self._goto(SessionState.OPEN)
        self._events.append(Resumed(self.epoch, resent))
        self._note(self.epoch, "resumed", f"{resent} bytes resent")
        self._flush()
        self._check_finished()

    def _on_ack(self, received: int) -> None:
        if received < self._acked:
            raise SessionViolation("ack-behind", f"ACK of {received} after {self._acked}")
        if received > self._sent:
            raise SessionViolation("ack-ahead", f"ACK of {received}, only {self._sent} sent")
        self._release(received)
        self._check_finished()

    def _release(self, received: int) -> None:
        """The peer holds [0, received): drop what we kept of it."""
        self._acked = received
        upto = min(received, self._written)
        kept = self._kept
        while kept and self._kept_base + len(kept[0]) <= upto:
            self._kept_base += len(kept.popleft())
        if kept and self._kept_base < upto:
            cut = upto - self._kept_base
            kept[0] = memoryview(kept[0])[cut:]      # the rest, uncopied
            self._kept_base = upto

    def _after_data(self) -> None:
        if self._received - self._acked_told >= max(1, self._peer_window // 4):
            self._send_ack()

    def _send_ack(self) -> None:
        if self.state in (SessionState.OPEN, SessionState.SYNC) and self._peer_synced \
                and self._received != self._acked_told:
            self._emit_frame(FrameType.ACK, _U64.pack(self._received))
            self._acked_told = self._received
            self._ack_since = None

    def _check_finished(self) -> None:
        if self.state is SessionState.OPEN and self._peer_fin and self._fin \
                and self._acked == self._stream_end() and self._acked_told == self._received:
            self._out.append(self._channel.close())
            self._goto(SessionState.FINISHED)
            if not self._finished:
                self._finished = True
                self._note(self.epoch, "finished", "")
                self._events.append(Finished())

    # -- sending ------------------------------------------------------------------------
    def _emit_frame(self, kind: FrameType, body: bytes) -> None:
        if self._moved_out:                      # after our MOVED, nothing on this transport
            return
        self._out.append(self._channel.send_data(FRAME.pack(kind, len(body)) + body))

    def send(self, data: bytes) -> int:
        """Take application bytes; returns how many (all, some, or 0 when the
        window is full). Taken bytes are delivered exactly once, in order,
        whatever transports come and go."""
        if self._error is not None:
            raise SessionUsageError("closed", "the session failed")
        if self._fin or self.state is SessionState.FINISHED:
            raise SessionUsageError("closed", "send() after close()")
        if not isinstance(data, bytes):
            data = memoryview(data).cast("B")    # len() in bytes, whatever the format
        n = min(len(data), self.writable)
        if n == 0:
            return 0
        piece = _keepable(data, n)
        self._kept.append(piece)
        self._written += n
        self._flush()
        return n

    def moving(self) -> None:
        """We leave this transport for a better one (resume() on it comes
        next): a MOVED frame after everything owed here, so the peer knows
        it has all we sent on this one and follows (PeerMoved)."""
        if self.state is not SessionState.OPEN:
            raise SessionUsageError("not-open", f"cannot move a {self.state.value} session")
        if self._moved_out:
            raise SessionUsageError("moved", "already moving off this transport: resume()")
        self._flush()
        self._emit_frame(FrameType.MOVED, b"")
        self._moved_out = True

    def close(self) -> None:
        """End our stream (a FIN after the data); the peer gets it on this or
        a later transport. Finished comes once both ends closed."""
        if self._error is not None or self._fin:
            return
        self._fin = True
        self._flush()

    def _flush(self) -> None:
        """Emit DATA frames for [_sent, _written) and our FIN, if a transport
        is open for them."""
        if self.state is not SessionState.OPEN or self._moved_out:
            return
        if self._sent < self._written:
            # Find the kept piece holding _sent (normally the newest).
            pieces: List[Tuple[Union[bytes, memoryview], int]] = []
            off = self._written                  # _kept spans [_kept_base, _written)
            for piece in reversed(self._kept):
                off -= len(piece)
                if off + len(piece) <= self._sent:
                    break
                pieces.append((piece, max(0, self._sent - off)))
            plain = bytearray()                  # small frames, gathered into one record
            seal, out = self._channel.send_data, self._out
            for piece, start in reversed(pieces):
                view = memoryview(piece)[start:]
                for i in range(0, len(view), MAX_FRAME):
                    part = view[i:i + MAX_FRAME]
                    header = FRAME.pack(FrameType.DATA, len(part))
                    if len(part) < _COPY_BELOW:
                        plain += header
                        plain += part
                        if len(plain) < _COPY_BELOW:
                            continue
                    else:
                        # A large frame: its header in a record of its own,
                        # its bytes sealed straight from where they are kept.
                        if plain:
                            out.append(seal(plain))
                            plain = bytearray()
                        out.append(seal(header))
                        out.append(seal(part))
                        continue
                    out.append(seal(plain))
                    plain = bytearray()
            if plain:
                out.append(seal(plain))
            self._sent = self._written
        if self._fin and self._sent == self._written:
            self._emit_frame(FrameType.FIN, b"")
            self._sent = self._written + 1
        self._emitted = max(self._emitted, self._sent)
        self._check_finished()

    def data_to_send(self) -> bytes:
        """Bytes owed to the current transport (write them all, in order)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def poll(self, now: float) -> None:
        """Acknowledge what waited ack_delay seconds (call it every
        next_deadline(); ``now`` from any monotonic clock)."""
        if self._received == self._acked_told:
            self._ack_since = None
            return
        if self._ack_since is None:
            self._ack_since = now
        if now - self._ack_since >= self.ack_delay:
            self._send_ack()

    def next_deadline(self, now: float) -> Optional[float]:
        """When poll() has work, None when it has none."""
        if self._received == self._acked_told or self.state is not SessionState.OPEN:
            return None
        return now if self._ack_since is None else self._ack_since + self.ack_delay
