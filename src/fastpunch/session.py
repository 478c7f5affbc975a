"""Resumable sessions over blocking sockets: glue around proto.session.Session.

``ResumableSocket(sock, role, session_key, reconnect=...)`` is a stream that
survives the death of the socket under it. When the transport fails (EOF, a
reset, a dead path found by the keepalive: ETIMEDOUT, a record that fails its
MAC) the socket asks ``reconnect`` for a new one, by whatever route the
application has (a fresh punch, the CCS relay, another node's relay), resumes
the session over it and carries on: ``sendall`` and ``recv`` see no gap, and
every byte arrives once, in order. Only when ``reconnect`` gives up (returns
None, raises, or ``resume_timeout`` passes) does the socket raise
:class:`SessionLost`.

The two sides do not reconnect alike. The initiator dials: its ``reconnect``
returns a connected socket. The responder waits: a :class:`ResumeListener`
on a listening socket hands it the connection whose preamble names its
session. A ResumeListener is watched while the socket waits for data, so a responder whose old path
died silently switches to the new transport as soon as the initiator brings
one, without waiting for its own keepalive to give the old one up.

Protocol decisions live in fastpunch.proto.session; docs/session.md.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from fastpunch import liveness
from fastpunch.channel import _Plaintext
from fastpunch.errors import FastpunchError
from fastpunch.liveness import Keepalive
from fastpunch.proto import session as _s
from fastpunch.proto.channel import Cipher, Role

__all__ = ["ResumableSocket", "ResumeListener", "PeerRoute", "SessionLost", "Transport", "Upgrade"]

READ_CHUNK = 256 * 1024
WRITE_CHUNK = 16 * 16384
#: seconds a session whose transport died waits for a better path being
#: made before it asks its reconnect route for one
UPGRADE_GRACE = 3.0
#: seconds the initiator, its better path ready, waits for the session's
#: first bytes on the old one before it moves anyway (so a move does not
#: hold the first bytes back)
FIRST_BYTE_GRACE = 1.0
#: seconds the responder keeps a better path the initiator does not move to
PEER_MOVE_TIMEOUT = 30.0

#: What a reconnect source gives: a connected socket, or one whose first
#: bytes (the resume preamble) were already read, with those bytes.
Transport = Union[socket.socket, Tuple[socket.socket, bytes]]


class SessionLost(FastpunchError, ConnectionError):
    """The session's transport died and no new one could be had in time.
    ``history`` is the session's path history; ``code`` "session-lost"."""

    code = "session-lost"

    def __init__(self, message: str, history: list) -> None:
        super().__init__(message)
        self.history = history


class _Lost(Exception):
    """The current transport failed, or (``transport``) a better one is
    here to move to (internal: triggers a resume)."""

    def __init__(self, code: str, message: str, transport=None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.transport = transport


class ResumeListener:
    """Accepts resumed transports on a listening socket and routes each to
    the session its preamble names; nothing in it blocks. New streams are
    read without blocking until their preamble is in (``preamble_timeout``
    seconds at most, else closed); one without a resume preamble is closed
    (``refused`` counts them). Those that name a session wait for it, at
    most ``per_session`` each (the oldest closed first) and ``backlog`` in
    all. ``fileno()`` is an epoll descriptor, readable when any of that
    has work, so a ResumableSocket waiting for data wakes for it too.

    The preamble is cleartext: anyone can send one naming a session. So a
    session takes a stream from here only once ``valid(head)`` (the
    session's preamble_valid) says its own initiator sent it for a new
    attempt; the others are closed."""

    #: The peer brings transports here (ResumableSocket watches fileno()).
    waits = True

    def __init__(self, listener: socket.socket, *, preamble_timeout: float = 5.0,
                 backlog: int = 64, per_session: int = 4) -> None:
        self.listener = listener               # left as it is (blocking or not)
        self.preamble_timeout = preamble_timeout
        self.backlog, self.per_session = backlog, per_session
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._reading: Dict[int, Tuple[socket.socket, bytearray, float]] = {}
        self._waiting: Dict[bytes, List[Tuple[socket.socket, bytes]]] = {}
        self.refused = 0

    def fileno(self) -> int:
        return self._epoll.fileno()

    def _drop(self, fd: int) -> None:
        conn, _, _ = self._reading.pop(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        conn.close()

    def _service(self, timeout: float) -> None:
        """Accept and read what is ready (waiting at most timeout for any)."""
        events = self._epoll.poll(max(0.0, timeout))
        now = time.monotonic()
        for fd, _ in events:
            if fd == self.listener.fileno():
                self._accept_all(now)
            elif fd in self._reading:
                self._read_preamble(fd)
        for fd, (_, _, since) in list(self._reading.items()):
            if now - since > self.preamble_timeout:
                self.refused += 1
                self._drop(fd)

    def _accept_all(self, now: float) -> None:
        while select.select([self.listener], [], [], 0)[0]:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                    # out of descriptors, a reset in the queue
                return
            if len(self._reading) >= self.backlog:
                oldest = min(self._reading, key=lambda fd: self._reading[fd][2])
                self.refused += 1
                self._drop(oldest)
            conn.setblocking(False)
            self._reading[conn.fileno()] = (conn, bytearray(), now)
            self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _read_preamble(self, fd: int) -> None:
        conn, head, _ = self._reading[fd]
        try:
            part = conn.recv(_s.PREAMBLE_BYTES - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            part = b""
        head += part
        magic = _s.PREAMBLE_MAGIC[:len(head)]
        if not part or bytes(head[:len(magic)]) != magic:
            self.refused += 1
            self._drop(fd)
            return
        if len(head) < _s.PREAMBLE_BYTES:
            return
        self._epoll.unregister(fd)
        del self._reading[fd]
        sid = _s.read_preamble(head)
        queue = self._waiting.setdefault(sid, [])
        queue.append((conn, bytes(head)))
        while len(queue) > self.per_session:
            queue.pop(0)[0].close()
        while sum(len(q) for q in self._waiting.values()) > self.backlog:
            stale = next(iter(self._waiting))
            for old, _ in self._waiting.pop(stale):
                old.close()

    def _take(self, session_id: bytes, valid: Optional[Callable[[bytes], bool]]):
        """The newest waiting stream for session_id that ``valid`` accepts
        (the others for it closed), or None."""
        queue = self._waiting.pop(session_id, [])
        found = None
        while queue:
            conn, head = queue.pop()
            if found is None and (valid is None or valid(head)):
                found = (conn, head)
            else:
                self.refused += 1
                conn.close()
        if found is not None:
            found[0].setblocking(True)
        return found

    def offered(self, session_id: bytes, valid: Optional[Callable[[bytes], bool]] = None):
        """A stream for session_id that ``valid`` accepts, if one is here
        now (kept for accept_for), else None. Never blocks."""
        self._service(0)
        got = self._take(session_id, valid)
        if got is not None:
            self._waiting[session_id] = [got]
        return got

    def accept_for(self, session_id: bytes, timeout: Optional[float],
                   valid: Optional[Callable[[bytes], bool]] = None):
        """(socket, preamble) for session_id within timeout, or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self._take(session_id, valid)
            if got is not None:
                return got
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            self._service(min(left, 1.0))

    def close(self) -> None:
        for fd in list(self._reading):
            self._drop(fd)
        for queue in self._waiting.values():
            for conn, _ in queue:
                conn.close()
        self._waiting.clear()
        self._epoll.close()
        self.listener.close()


def _waits(source) -> bool:
    """A source the peer brings transports to (ResumeListener, PeerRoute's
    accepting side), as opposed to a callable that dials."""
    return getattr(source, "waits", False)


def _unpack(got) -> Tuple[socket.socket, bytes, str]:
    """(socket, bytes already read from it, route) from what a source gave."""
    if isinstance(got, tuple):
        return got[0], got[1], "transport opened"
    if isinstance(got, socket.socket):
        return got, b"", "transport opened"
    sock = got.sock                            # a client.PeerConnection
    sock.setblocking(True)
    return sock, b"", f"{got.path} ({got.strategy})"


class PeerRoute:
    """New transports to one peer through a logged-in Device, for a
    ResumableSocket: a fresh rendezvous through the CCS, so a fresh punch or
    the relay, whatever works now. The Device runs on its event loop in
    another thread; ``submit(coro)`` starts a coroutine there and returns a
    concurrent.futures.Future (a LoopThread's submit, or
    ``lambda c: asyncio.run_coroutine_threadsafe(c, loop)``).

    ``dial=True`` (the side that connected): each call connects again.
    ``dial=False`` (the side that accepted): an accept of that peer runs in
    the background from the start, so the transport the peer brings is
    ready, and watched, before this side has found its own dead. It takes
    every connection from that peer: one resumable session per pair of
    devices at a time."""

    def __init__(self, device, peer: str, *, dial: bool, submit: Callable,
                 strategies=None, timeout: float = 35.0) -> None:
        self.device, self.peer, self.dial = device, peer, dial
        self.waits = not dial               # the accepting side waits for the peer's transport
        self.submit, self.strategies, self.timeout = submit, strategies, timeout
        self._pending = None
        self.last_error: Optional[BaseException] = None   # why the last accept failed
        self._rfd, self._wfd = socket.socketpair()
        self._rfd.setblocking(False)
        if not dial:
            self._start_accept()

    # -- the dialling side ----------------------------------------------------------------
    def __call__(self):
        fut = self.submit(self.device.connect(self.peer, strategies=self.strategies,
                                              timeout=self.timeout))
        return fut.result(self.timeout + 10)

    # -- the accepting side ---------------------------------------------------------------
    def _start_accept(self) -> None:
        fut = self.submit(self.device.accept(strategies=self.strategies, peer=self.peer))
        self._pending = fut
        fut.add_done_callback(self._notify)

    def _notify(self, _fut) -> None:
        try:
            self._wfd.send(b"!")
        except OSError:                       # closed meanwhile
            pass

    def fileno(self) -> int:
        return self._rfd.fileno()

    def offered(self, session_id: bytes, valid=None) -> bool:
        """The peer's new transport is here (a failed accept, as when the
        peer abandoned an attempt, is not: it is started again). It came
        through the CCS from the authenticated peer device: ``valid`` is not
        needed (the session still checks the preamble it reads)."""
        fut = self._pending
        if fut is None or not fut.done():
            return False
        if fut.cancelled() or fut.exception() is not None:
            self.last_error = None if fut.cancelled() else fut.exception()
            self._drain_notice()
            self._start_accept()
            return False
        return True

    def _drain_notice(self) -> None:
        try:
            self._rfd.recv(16)
        except BlockingIOError:
            pass

    def accept_for(self, session_id: bytes, timeout: Optional[float], valid=None):
        if self._pending is None:
            return None
        try:
            conn = self._pending.result(timeout)
        except concurrent.futures.TimeoutError:
            return None
        except Exception as exc:             # the device closed, the CCS refused: no route
            self.last_error = exc
            conn = None
        self._drain_notice()
        self._start_accept()                  # the next loss's transport, in the background
        return conn

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._rfd.close()
        self._wfd.close()


def _discard(got) -> None:
    """Close a transport nobody will use (a socket, (socket, head), or a
    client.PeerConnection)."""
    if got is None:
        return
    if isinstance(got, tuple):
        got = got[0]
    try:
        got.close()
    except OSError:
        pass


class Upgrade:
    """A better transport that may come later, for a ResumableSocket to move
    to: relay-first's direct path, which the punch behind the relay brings.
    ``future`` (a concurrent.futures.Future) gives a Transport or a
    client.PeerConnection, or fails (the session then stays where it is).
    ``fileno()`` is readable once it is done, so a socket waiting for data
    wakes for it. Whatever it brings and nobody takes is closed."""

    def __init__(self, future: "concurrent.futures.Future") -> None:
        self.future = future
        self.error: Optional[str] = None       # why it brought nothing
        self._taken = False
        self._rfd, self._wfd = socket.socketpair()
        self._rfd.setblocking(False)
        future.add_done_callback(self._notify)

    def _notify(self, _fut) -> None:
        try:
            self._wfd.send(b"!")
        except OSError:                       # closed meanwhile
            pass

    def fileno(self) -> int:
        return self._rfd.fileno()

    def done(self) -> bool:
        return self.future.done()

    def wait(self, timeout: float) -> bool:
        """Wait (timeout seconds at most) until it is done; whether it is."""
        try:
            self.future.result(max(0.0, timeout))
        except Exception:                     # a timeout, a failed punch, a cancel
            pass
        return self.future.done()

    def take(self):
        """What it brought (once), or None: not yet, or it failed (``error``)."""
        fut = self.future
        if self._taken or not fut.done():
            return None
        self._taken = True
        if fut.cancelled():
            self.error = "cancelled"
            return None
        exc = fut.exception()
        if exc is not None:
            self.error = f"{getattr(exc, 'reason', None) or type(exc).__name__}: {exc}"
            return None
        return fut.result()

    def close(self) -> None:
        """Give it up: cancelled if pending, closed if it arrives anyway."""
        if not self._taken:
            self._taken = True
            self.future.cancel()
            self.future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() is not None
                else _discard(f.result()))
        self._rfd.close()
        self._wfd.close()


def _end_writer(dst) -> None:
    """bridge()'s end of ``dst``: a socket is shut for writing (it may be
    src too), anything else closed."""
    try:
        if isinstance(dst, socket.socket):
            dst.shutdown(socket.SHUT_WR)
        else:
            dst.close()
    except OSError:                     # (a broken pipe's close flushes nothing here)
        pass


class ResumableSocket:
    """A session that outlives its sockets (blocking). ``reconnect``: a
    callable returning a new Transport (or None to give up), or a
    ResumeListener (the responder's side); None: the first transport's death
    is final. ``resume_timeout``: seconds to get a new transport and resume
    over it, per loss (and for the first handshake).

    One thread per ResumableSocket, as with a socket. Like TCP, two ends
    that only send, never reading, stop: with a window full and the
    peer's bytes unread, sendall() raises SessionUsageError("unread-limit")
    past ``max_unread`` (8 windows) rather than buffer without bound."""

    def __init__(self, sock: socket.socket, role: Union[str, Role], session_key: bytes, *,
                 reconnect: Union[None, ResumeListener,
                                  Callable[[], Optional[Transport]]] = None,
                 keepalive: Optional[Keepalive] = liveness.DEFAULT,
                 window: int = _s.DEFAULT_WINDOW, resume_timeout: float = 30.0,
                 random: Callable[[int], bytes] = os.urandom, cipher: Optional[Cipher] = None,
                 clock: Callable[[], float] = time.monotonic, handshake: bool = True,
                 path: str = "first transport", max_unread: Optional[int] = None,
                 own_reconnect: bool = False, upgrade: Optional[Upgrade] = None,
                 move_timeout: float = 10.0) -> None:
        self.session = _s.Session(role, session_key, window=window, random=random,
                                  cipher=cipher, clock=clock, path=path)
        self.keepalive = keepalive
        self.reconnect = reconnect
        self._own_reconnect = own_reconnect    # close() closes it (a PeerRoute made for us)
        self.resume_timeout = resume_timeout
        #: a better transport to move to when it comes (relay-first's direct
        #: path); move_timeout: seconds its resume handshake may take
        self._upgrade = upgrade
        self.move_timeout = move_timeout
        #: (transport, since): the upgrade's transport, not moved to yet. The
        #: initiator leads (see _consider_move); the responder follows its
        #: MOVED frame, having taken everything sent before it
        self._better: Optional[tuple] = None
        self._seen_data = False                # the app has had bytes from the peer
        self._peer_moved = False               # its MOVED came on the current transport
        self._clock = clock
        self._plain = _Plaintext()
        self._peer_closed = False
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self.resumes = 0                       # transports after the first
        #: bytes from the peer recv() may leave waiting while sendall() waits
        self.max_unread = max_unread if max_unread is not None else 8 * window
        self._adopt(sock)
        if handshake:
            self.handshake()

    @property
    def session_id(self) -> Optional[bytes]:
        return self.session.session_id

    @property
    def history(self) -> list:
        """The session's path history (proto.session.PathEvent): for reports."""
        return list(self.session.history)

    # -- transport I/O ------------------------------------------------------------------
    def _write_out(self) -> None:
        """Write what the session owes the transport. While the socket takes
        no more, what the peer sends is read in (fed to the session, parsed
        at the next pump): two ends writing at once, neither reading, would
        otherwise both block in the kernel for good."""
        out = self.session.data_to_send()
        if not out:
            return
        view, off, sock = memoryview(out), 0, self.sock
        ended = False                             # the peer's EOF is in: only write now
        try:
            while off < len(view):
                try:
                    off += sock.send(view[off:], socket.MSG_DONTWAIT)
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                readable, writable, _ = select.select([] if ended else [sock], [sock], [])
                if readable and not writable:
                    try:
                        n = sock.recv_into(self._rbuf, 0, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        continue
                    self.session.receive_data(self._rview[:n] if n else b"")
                    ended = not n
        except OSError as exc:
            lost = liveness.path_lost(exc, self.keepalive)
            raise _Lost("path-lost" if lost else "write-failed", str(exc)) from exc

    def _pump(self) -> None:
        """Process the session's events; _Lost when the transport died."""
        s = self.session
        while True:
            event = s.next_event()
            # The event first: a Data event is already counted as ours (and
            # acknowledged on resume), so a failing write must not drop it.
            if type(event) is _s.Data:
                self._plain.push(event.data)
                self._seen_data = True
            elif type(event) is _s.Closed:
                self._peer_closed = True
            elif type(event) is _s.PeerMoved:
                self._peer_moved = True        # acted on by the next read
            elif type(event) is _s.TransportLost:
                raise _Lost(event.code, event.message)
            self._write_out()
            if event is _s.NEED_DATA:
                return

    def _left(self, until: Optional[float]) -> Optional[float]:
        return None if until is None else max(0.0, until - self._clock())

    def _read_once(self, until: Optional[float] = None, extra_r: Sequence[int] = (),
                   extra_w: Sequence[int] = (), read: bool = True,
                   extra_hup: Sequence[int] = ()) -> Tuple[list, list]:
        """Wait (until the clock reads ``until``, at most) for bytes from the
        transport, a new transport offered, a better path, or an ACK falling
        due, and feed the session what came. ``extra_r``/``extra_w``: the
        caller's descriptors to watch as well (bridge()); returns those of
        them that are ready, a descriptor of ``extra_hup`` among the
        writable ones once its reader is gone (POLLERR/POLLHUP). ``read=False``
        leaves the transport unread (its peer meets TCP's back-pressure)
        while the rest is watched. An extra descriptor that is not open is
        the caller's error (ValueError), never the transport's loss."""
        s = self.session
        is_open = s.state is _s.SessionState.OPEN
        if self._peer_moved and is_open:
            # its MOVED came after everything it sent here, which the app
            # has had: follow it (to our better path, or one the route brings)
            self._peer_moved = False
            raise _Lost("peer-moved", "the peer moved to a better path")
        watch: list = [self.sock] if read else []
        if _waits(self.reconnect):
            watch.append(self.reconnect)
        up = self._upgrade if is_open else None
        if up is not None:
            watch.append(up)
        due = s.next_deadline(self._clock())
        if is_open and self._better is not None:
            lapse = self._better[1] + (PEER_MOVE_TIMEOUT if s.role is Role.RESPONDER
                                       else FIRST_BYTE_GRACE)
            due = lapse if due is None else min(due, lapse)
        timeout = self._left(until)
        if due is not None:
            wait = max(0.0, due - self._clock())
            timeout = wait if timeout is None else min(timeout, wait)
        # poll, not select: no limit on descriptor numbers, and a pipe whose
        # reader is gone is told apart (POLLERR) from one with room
        poller = select.poll()
        ours: Dict[int, object] = {}
        try:
            for obj in watch:
                fd = obj.fileno()
                ours[fd] = obj
                poller.register(fd, select.POLLIN)
        except (OSError, ValueError) as exc:
            raise _Lost("select-failed", str(exc)) from exc
        masks: Dict[int, int] = {}
        for fd in extra_r:
            masks[fd] = masks.get(fd, 0) | select.POLLIN
        for fd in extra_w:
            masks[fd] = masks.get(fd, 0) | select.POLLOUT
        for fd in extra_hup:
            masks.setdefault(fd, 0)          # (POLLERR and POLLHUP are always reported)
        for fd, mask in masks.items():
            if fd in ours:
                raise ValueError(f"descriptor {fd} is the session's own")
            poller.register(fd, mask)
        try:
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        except OSError as exc:
            raise _Lost("select-failed", str(exc)) from exc
        ready, got_r, got_w = [], [], []
        for fd, ev in events:
            if fd in ours:
                ready.append(ours[fd])
                continue
            if ev & select.POLLNVAL:
                raise ValueError(f"descriptor {fd} is not open")
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and fd in extra_r:
                got_r.append(fd)
            if ev & (select.POLLOUT | select.POLLERR | select.POLLHUP) and \
                    (fd in extra_w or fd in extra_hup):
                got_w.append(fd)
        mine = got_r, got_w
        if self.reconnect in ready and s.session_id is not None and \
                self.reconnect.offered(s.session_id, s.preamble_valid):
            # The peer brought a new transport (its preamble proves it is
            # this session's other end): the old one is dead to it.
            raise _Lost("superseded", "the peer resumed on a new transport")
        if self.sock in ready:
            try:
                n = self.sock.recv_into(self._rbuf)
            except OSError as exc:
                lost = liveness.path_lost(exc, self.keepalive)
                raise _Lost("path-lost" if lost else "read-failed", str(exc)) from exc
            s.receive_data(self._rview[:n] if n else b"")
        if up is not None and up in ready:
            self._collect_upgrade()
        if is_open and self._better is not None:
            self._consider_move()
        s.poll(self._clock())
        return mine

    def _collect_upgrade(self) -> None:
        """The upgrade, done: its transport into _better (a failed one is
        noted in the history)."""
        better = self._take_upgrade()
        if better is not None:
            self._better = (better, self._clock())

    def _consider_move(self, lead: bool = False) -> None:
        """Move to the better path if it is time (raises _Lost "moved").
        The initiator leads: once the app has had the session's first bytes
        (a move right before them would hold them back for its handshake),
        or FIRST_BYTE_GRACE after the path came, or (``lead``, from
        sendall) once its own bytes left. It ends the old transport with a
        MOVED frame, so the responder takes everything sent there and then
        follows (PeerMoved), nothing sent twice that way. A responder whose
        peer never moves drops the path after PEER_MOVE_TIMEOUT."""
        better, since = self._better
        if self.session.role is Role.RESPONDER:
            if self._clock() - since >= PEER_MOVE_TIMEOUT:
                self._better = None
                _discard(better)
                self.session.note("upgrade-failed", "the peer did not move to the better "
                                  f"path in {PEER_MOVE_TIMEOUT:g} s")
            return
        if not (lead or self._seen_data) and self._clock() - since < FIRST_BYTE_GRACE:
            return
        # what the old transport brought, through the session now (bytes fed
        # but not yet parsed would die with its channel, and be resent)
        self._pump()
        if self.session.state is not _s.SessionState.OPEN:
            return
        self.session.moving()
        try:
            self._write_out()
        except _Lost:                          # the old path is dying anyway: the peer
            pass                               # learns it from its end
        self._better = None
        raise _Lost("moved", "a better path is ready", transport=better)

    def _step(self, until: Optional[float] = None, extra_r: Sequence[int] = (),
              extra_w: Sequence[int] = (), read: bool = True,
              extra_hup: Sequence[int] = ()) -> Tuple[list, list]:
        """One read and its events; resumes across a lost transport. Returns
        the ready ones of ``extra_r``/``extra_w``/``extra_hup`` (see _read_once)."""
        try:
            mine = self._read_once(until, extra_r, extra_w, read, extra_hup)
            self._pump()
            return mine
        except _Lost as lost:
            self._resume(lost, until)
            return [], []

    def _adopt(self, sock: socket.socket) -> None:
        sock.settimeout(None)            # a dialer's connect timeout is not a stall limit
        liveness.apply(sock, self.keepalive)
        # the session writes whole batches of records (data_to_send): Nagle
        # would only hold a small one (an ACK, a handshake's last record) a
        # round trip behind the one before
        if sock.family in (socket.AF_INET, socket.AF_INET6):   # (a test's socketpair: no Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    def _take_upgrade(self, until: Optional[float] = None):
        """The upgrade's transport if it is done (waiting until the clock
        reads ``until`` for it, if given), else None; a failed one is noted
        in the history and dropped, a pending one kept for later."""
        up = self._upgrade
        if up is None:
            return None
        if until is not None and not up.done():
            up.wait(until - self._clock())
        if not up.done():
            return None
        self._upgrade = None
        better = up.take()
        up.close()
        if better is None:
            self.session.note("upgrade-failed", up.error or "")
        return better

    def _resume(self, lost: "_Lost", until: Optional[float] = None) -> None:
        self.session.lose(lost.code, str(lost))
        why = str(lost)
        if not self.session.resumable:
            raise SessionLost(f"the transport died ({why}) and the session cannot resume",
                              self.history)
        deadline = self._clock() + self.resume_timeout
        if until is not None:
            deadline = min(deadline, until)
        better = lost.transport
        if better is None and self._better is not None:
            better, self._better = self._better[0], None
        if better is None and self._upgrade is not None:
            # the old path died while the better one is being made (the
            # peer moved first and closed it): it is the likeliest way on
            better = self._take_upgrade(min(deadline, self._clock() + UPGRADE_GRACE))
        if better is not None:
            try:
                self._resume_over(better, min(deadline, self._clock() + self.move_timeout))
                return
            except _Lost as again:            # the peer never came on it
                self.session.lose(again.code, str(again))
                self.session.note("upgrade-failed", str(again))
                why = str(again)
        if self.reconnect is None:
            raise SessionLost(f"the transport died ({why}) and the session cannot resume",
                              self.history)
        while True:
            left = deadline - self._clock()
            if left <= 0:
                raise SessionLost(f"no new transport within {self.resume_timeout} s "
                                  f"(last: {why})", self.history)
            try:
                if _waits(self.reconnect):
                    got = self.reconnect.accept_for(self.session.session_id, left,
                                                    self.session.preamble_valid)
                else:
                    got = self.reconnect()
            except Exception as exc:          # the peer offline a moment, a punch refused...
                why = f"reconnect: {exc}"
                time.sleep(min(1.0, max(0.0, deadline - self._clock())))
                continue
            if got is None:
                if _waits(self.reconnect):    # nothing yet (or a failed accept, started
                    time.sleep(min(0.2, max(0.0, deadline - self._clock())))   # again)
                    continue                  # the loop's deadline decides
                cause = getattr(self.reconnect, "last_error", None)
                raise SessionLost(f"no new transport (last: {why}"
                                  f"{f'; the route: {cause}' if cause else ''})", self.history)
            try:
                self._resume_over(got, deadline)
                return
            except _Lost as again:
                self.session.lose(again.code, str(again))
                why = str(again)

    def _resume_over(self, got, deadline: float) -> None:
        """Resume the suspended session over the transport ``got``, its
        handshake done by ``deadline``; _Lost if it fails."""
        sock, head, route = _unpack(got)
        # the old transport is closed once the new one is up (or failed): a
        # move leaves what it carried a moment to arrive (closed at once with
        # bytes unread, it would reset them away)
        old = self.sock
        self._peer_moved = False
        self._adopt(sock)
        try:
            self.session.resume(route)
            self.resumes += 1
            self._write_out()
            if head:
                self.session.receive_data(head)
            self._pump()
            while self.session.state in (_s.SessionState.HANDSHAKE, _s.SessionState.SYNC):
                if self._clock() >= deadline:
                    raise _Lost("resume-timeout", "the resume handshake did not finish")
                self._read_once(deadline)
                self._pump()
        finally:
            try:
                old.close()
            except OSError:
                pass

    # -- the application's face ---------------------------------------------------------
    def handshake(self) -> None:
        """The first transport's handshake (at most resume_timeout seconds);
        returns once the session exists."""
        deadline = self._clock() + self.resume_timeout
        try:
            self._write_out()
            while self.session.session_id is None or \
                    self.session.state is _s.SessionState.HANDSHAKE:
                if self._clock() >= deadline:
                    raise _Lost("handshake-timeout", f"no handshake in {self.resume_timeout} s")
                self._read_once(deadline)
                self._pump()
        except _Lost as lost:
            raise SessionLost(f"the first transport failed: {lost}", self.history) from None

    def sendall(self, data) -> None:
        """Every byte is taken (waiting for the peer's acknowledgements when
        the window is full) and will be delivered, whatever the transports.
        Raises SessionUsageError("unread-limit") if, while we wait, the peer
        has sent more than max_unread bytes that recv() did not take: they
        are kept, recv() them (one thread per socket, as with a socket)."""
        view = memoryview(data).cast("B")
        off, n = 0, len(view)
        s = self.session
        while off < n:
            took = self._offer(view[off:off + WRITE_CHUNK])
            off += took
            if not took and not s.writable:     # (a move just now may have freed it)
                if self._plain.size >= self.max_unread:
                    raise _s.SessionUsageError(
                        "unread-limit", f"{self._plain.size} bytes from the peer wait for "
                        f"recv() while sendall() waits for its window ({off} of {n} taken)")
                self._step()                    # wait for ACKs (or a new transport)

    def _offer(self, view) -> int:
        """What the window takes of ``view`` now (maybe nothing), written out
        (resuming if the transport died meanwhile); a move is looked at."""
        s = self.session
        took = s.send(view)
        try:
            self._write_out()
        except _Lost as lost:
            self._resume(lost)
            return took
        if s.state is _s.SessionState.OPEN and (self._better is not None or (
                self._upgrade is not None and self._upgrade.done())):
            self._move_while_sending()          # a sender that never waits moves too
        return took

    def _move_while_sending(self) -> None:
        """sendall()'s look at a move, after its bytes left on the old path:
        the initiator leads at once; the responder takes what waits on the
        old path (the initiator's MOVED among it) without blocking, and
        follows."""
        if self._better is None and self._upgrade is not None and self._upgrade.done():
            self._collect_upgrade()
        try:
            if self.session.role is Role.RESPONDER:
                if select.select([self.sock], [], [], 0)[0]:
                    self._read_once(self._clock())
                    self._pump()
                    self._read_once(self._clock())     # raises "peer-moved" if it came
            elif self._better is not None:
                self._consider_move(lead=True)
        except _Lost as lost:
            self._resume(lost)

    def recv(self, bufsize: int) -> Union[bytes, bytearray]:
        """Up to bufsize bytes (bytes or bytearray); b"" once the peer closed
        its stream."""
        plain = self._plain
        while not plain.size and not self._peer_closed:
            self._step()
        if bufsize <= 0 or not plain.size:
            return b""
        data = plain.take_some(bufsize)
        return bytes(data) if isinstance(data, memoryview) else data

    def bridge(self, src, dst, *, sent: Optional[Callable[[int], None]] = None,
               received: Optional[Callable[[int], None]] = None) -> None:
        """Carry ``src``'s bytes to the peer and the peer's to ``dst`` (pipes or
        sockets: objects with fileno(), made non-blocking here) in this one
        thread, until both streams ended: src's EOF ends ours (close_write),
        and once the peer's stream ended and all of it is written, ``dst`` is
        closed (a socket is shut for writing instead), so its reader sees
        EOF. A ``dst`` whose reader is gone (EPIPE, or a pipe's POLLERR while
        nothing waits for it) is closed and the peer's further bytes
        dropped, as a pipe would; then the bridge ends with our stream.
        ``sent``/``received``: called with each count of bytes taken from
        src / written to dst. Neither side blocks the other: while dst takes
        nothing, the peer's bytes are held and src is still carried; while
        the window is full, src is left unread. Past ``max_unread`` bytes
        held the transport is left unread (its sender meets TCP's
        back-pressure), but the peer's acknowledgements come on that same
        transport: if our window is full then too, the bridge raises
        SessionUsageError("unread-limit") as sendall() does, rather than
        wait for ever (each side would wait for the other). Resumes happen
        inside, as in recv()."""
        s = self.session
        src_fd, dst_fd = src.fileno(), dst.fileno()
        os.set_blocking(src_fd, False)
        os.set_blocking(dst_fd, False)
        out, off = b"", 0                   # read from src, not yet in the window
        src_open = True
        ended = False                       # our stream's end is sent
        pending = memoryview(b"")           # the peer's bytes not yet written to dst
        dst_open = True
        while True:
            if dst_open:
                while True:
                    if not pending:
                        if not self._plain.size:
                            break
                        pending = memoryview(self._plain.take_some(WRITE_CHUNK)).cast("B")
                    try:
                        n = os.write(dst_fd, pending)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:             # EPIPE: nobody reads dst any more
                        dst_open, pending = False, memoryview(b"")
                        break
                    pending = pending[n:]
                    if received is not None:
                        received(n)
                if dst_open and not pending and not self._plain.size and self._peer_closed:
                    dst_open = False
                if not dst_open:
                    _end_writer(dst)
            if not dst_open and self._plain.size:
                self._plain = _Plaintext()      # dropped: nobody can read them
            if off < len(out):
                took = self._offer(memoryview(out)[off:])
                off += took
                if took and sent is not None:
                    sent(took)
            elif not src_open and not ended:
                self.close_write()
                ended = True
            if ended and not dst_open:
                return
            want_src = src_open and off >= len(out)
            held = len(pending) + self._plain.size
            full = dst_open and held >= self.max_unread
            if full and off < len(out) and not s.writable:
                raise _s.SessionUsageError(
                    "unread-limit", f"{held} bytes from the peer wait for the local reader "
                    "while our window waits for the peer's acknowledgements, which come "
                    "behind them")
            finished = s.state is _s.SessionState.FINISHED     # (nothing more can come)
            ready_r, ready_w = self._step(None, [src_fd] if want_src else [],
                                          [dst_fd] if dst_open and pending else [],
                                          read=not (full or finished),
                                          extra_hup=[dst_fd] if dst_open and not pending
                                          else [])
            if dst_open and not pending and dst_fd in ready_w:
                dst_open = False                # its reader is gone: the pipe's POLLERR
                self._plain = _Plaintext()
                _end_writer(dst)
            if src_fd in ready_r:
                try:
                    data = os.read(src_fd, WRITE_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:                 # src broke: treat it as its end
                    data = b""
                if data:
                    out, off = data, 0
                else:
                    src_open = False

    def close_write(self) -> None:
        """End our stream (the peer's recv returns b"" after the last byte);
        recv() goes on until the peer ends its own."""
        self.session.close()
        try:
            self._write_out()
        except _Lost as lost:
            self._resume(lost)

    def close(self, timeout: float = 10.0) -> None:
        """End our stream and wait (timeout seconds at most, resumes
        included) until both streams ended and the peer holds all of ours;
        then close the socket. Bytes the peer still sends meanwhile are
        dropped."""
        s = self.session
        end = self._clock() + timeout
        try:
            s.close()
            try:
                self._write_out()
            except _Lost as lost:
                self._resume(lost, end)
            while s.state is not _s.SessionState.FINISHED and self._clock() < end:
                self._step(end)
                self._plain = _Plaintext()
            if s.state is _s.SessionState.FINISHED:
                self._linger(min(end, self._clock() + 1.0))
        except (SessionLost, _s.SessionViolation):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            if self._own_reconnect and hasattr(self.reconnect, "close"):
                self.reconnect.close()
            if self._upgrade is not None:
                self._upgrade.close()
                self._upgrade = None
            if self._better is not None:
                _discard(self._better[0])
                self._better = None

    def _linger(self, until: float) -> None:
        """Our FIN and our last ACK are written; give them a moment to leave
        before close() (closing with the peer's close record unread would
        reset the stream under them)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self._clock() < until:
                ready, _, _ = select.select([self.sock], [], [], self._left(until))
                if not ready or not self.sock.recv(65536):
                    return
        except OSError:
            return

    def fileno(self) -> int:
        return self.sock.fileno()

    def __enter__(self) -> "ResumableSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
