"""The device's side of the CCS: ``async with Device(...) as dev``.

    async with Device("ccs.example:7443", "camera-1", key, ca_file="ca.pem") as dev:
        ready = await dev.rendezvous("viewer-1", NextInfo(port=40000, isn=1234, nat="nat"))
        async for offer in dev.incoming():
            ready = await offer.answer(NextInfo(...))
            sock = await dev.relay(ready)          # when nothing direct works

A thin asyncio layer over fastpunch.proto.connection: this module keeps
the CCS session (login, heartbeats, rendezvous, offers, the relay);
gathering candidates is ``fastpunch.netcheck.gatherer``'s job and punching
``fastpunch.punch.rendezvous``'s. The device stays connected: when the
connection drops it reconnects with jittered exponential backoff, trying
each CCS address it was given in turn (several nodes of one deployment).
Requests in flight when the connection drops fail with
``CCSError("disconnected")``; ``incoming()`` carries on after a reconnect.
A credential the CCS refuses is final (no retry loop). It speaks the
newest protocol version and falls back to the version an older CCS
answers in for a login it refuses (the next login tries the newest again:
a rolling upgrade does not pin a device to an old version). Every stream
it hands out carries the kernel's keepalive and user timeout
(fastpunch.liveness): the period the CCS advertises unless the
application chose one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence, Union

from fastpunch import _loop, liveness
from fastpunch._addr import unmap
from fastpunch.errors import FastpunchError, RemoteProtocolError
from fastpunch.liveness import Keepalive
from fastpunch.proto import wire
from fastpunch.proto.backoff import Backoff
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, Role
from fastpunch.proto.kinds import RelayFirst
from fastpunch.proto.wire import STANDING, NextInfo

log = logging.getLogger("fastpunch.client")
# Errors after which a device does not log in again: its credentials were
# refused, or an operator removed, disabled or re-keyed it (ccs devices ...).
FINAL_CODES = frozenset({"auth-failed", "device-disabled", "device-removed", "device-rekeyed"})

__all__ = ["Device", "Offer", "NextInfo", "PeerConnection", "AuthenticationError",
           "RendezvousRefusedError", "CCSError", "RelayError"]


class CCSError(FastpunchError):
    """The CCS closed the connection with an error, or it was lost. ``code`` is stable."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{reason} ({code})")
        self.code = code


class AuthenticationError(CCSError, PermissionError):
    """The CCS refused this device's credentials (or could not prove its own)."""


class RendezvousRefusedError(CCSError):
    """The CCS refused a rendezvous: not-authorized, peer-offline, self, peer-gone."""


class RelayError(CCSError):
    """The relay refused this side: unknown-token, relay-busy, quota, peer-timeout, ..."""


@dataclass
class PeerConnection:
    """A connected TCP socket to a peer (direct or relayed) with the report of
    how it got there, the CCS-issued session key and this side's role."""
    sock: socket.socket
    peer: str
    path: str                     # "direct" or "relay"
    strategy: str
    role: str
    key: bytes
    report: "object"
    #: the liveness settings on ``sock`` (None: keepalive turned off). A
    #: dead path surfaces as ETIMEDOUT on the socket, as liveness.PathLost
    #: from the secure channel.
    keepalive: Optional[Keepalive] = None
    #: the event loop of the Device that made it (for resumable())
    loop: Optional[asyncio.AbstractEventLoop] = None
    device: Optional["Device"] = None
    #: relay-first (connect(relay_first=True)): the punch still going on
    #: behind this relayed connection, an asyncio.Task on ``loop`` that
    #: gives the direct PeerConnection. Only resumable() moves to it; the
    #: other uses (secure(), the socket itself) give it up.
    upgrade: Optional[asyncio.Future] = None

    def _drop_upgrade(self) -> None:
        """Give the pending direct path up (cancelled, or closed if made)."""
        task, self.upgrade = self.upgrade, None
        if task is None or self.loop is None:
            return

        def drop() -> None:
            task.cancel()
            task.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None
                                   else t.result().close())
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(drop)

    def secure(self):
        """The secure channel over this connection (blocking socket API)."""
        from fastpunch.channel import SecureSocket

        self._drop_upgrade()
        self.sock.setblocking(True)
        return SecureSocket(self.sock, self.role, self.key, keepalive=self.keepalive)

    async def secure_streams(self):
        """The secure channel as asyncio (reader, writer)."""
        from fastpunch.channel import secure_streams

        self._drop_upgrade()
        self.sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=self.sock)
        return await secure_streams(reader, writer, self.role, self.key,
                                    keepalive=self.keepalive)

    def resumable(self, *, strategies=None, **kw):
        """A resumable session over this connection (blocking socket API,
        fastpunch.session.ResumableSocket): when its transport dies it gets a
        new one through the CCS (a fresh punch, or the relay) and goes on,
        every byte once and in order. Both sides must call it. The Device
        must stay logged in, its event loop running in another thread, for
        as long as the session lives. ``strategies``: what the new
        rendezvous may use (both sides alike, as for connect());
        ``kw``: ResumableSocket's options. A relay-first connection moves
        to the direct path when the punch behind it brings one (the path
        history says when), and the relay is let go."""
        from fastpunch.session import PeerRoute, ResumableSocket, Upgrade

        if self.device is None or self.loop is None:
            raise CCSError("no-device", "this connection has no device to resume through")
        loop = self.loop
        task, self.upgrade = self.upgrade, None
        if task is not None:
            async def direct():
                return await task
            kw.setdefault("upgrade", Upgrade(asyncio.run_coroutine_threadsafe(direct(), loop)))
        route = PeerRoute(self.device, self.peer, dial=self.role == "initiator",
                          submit=lambda coro: asyncio.run_coroutine_threadsafe(coro, loop),
                          strategies=strategies)
        self.sock.setblocking(True)
        kw.setdefault("keepalive", self.keepalive)
        # the CCS connection may have died with the path: finding that out
        # (its keepalive), logging in again, a rendezvous and a punch
        kw.setdefault("resume_timeout", 90.0)
        return ResumableSocket(self.sock, self.role, self.key, reconnect=route,
                               path=f"{self.path} ({self.strategy})", own_reconnect=True, **kw)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and drop what the strategy keeps for the flow's
        lifetime (spoof's host rewrite)."""
        from fastpunch.punch.base import release

        self._drop_upgrade()
        self.sock.close()
        release(self.sock)


@dataclass
class Offer:
    """Another device asks to connect to us. With ``Device(standing=True)``
    the CCS may already have answered it with the info we announced ahead
    (``ready`` is then set, with that ``info`` and ``local`` port);
    ``Device.accept()`` handles both kinds."""
    peer: str
    request: int
    _device: "Device"
    ready: Optional[wire.RendezvousReady] = None
    info: Optional[NextInfo] = None
    gathered: object = None          # the netcheck.Gathered the standing info came from

    async def answer(self, info: NextInfo, timeout: float = 30.0) -> wire.RendezvousReady:
        if self.ready is not None:
            raise CCSError("already-answered", "the CCS answered this offer with the info "
                                               "announced ahead (standing); use accept()")
        return await self._device._exchange(
            self._device._answers, self.request,
            wire.RendezvousAnswer(request=self.request, **info.fields()), timeout)


def _relay_first_mode(value: Union[bool, str]) -> RelayFirst:
    if value is True or value is False:
        return RelayFirst.YES if value else RelayFirst.NO
    try:
        return RelayFirst(value)
    except ValueError:
        raise ValueError(f"relay_first must be True, False or one of "
                         f"{', '.join(k.value for k in RelayFirst)}: {value!r}") from None


class _Gone(asyncio.Event):
    """Set when the CCS says the peer left a rendezvous; ``code`` says how:
    "peer-abandoned" (it gave its punch up: a relay-first peer is still on
    the relay) or "peer-gone" (it left the CCS)."""

    code: Optional[str] = None

    def left(self, code: str) -> None:
        self.code = code
        self.set()


def _address(ccs: Union[str, tuple]) -> tuple:
    if isinstance(ccs, str):
        host, sep, port = ccs.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"a CCS address is HOST:PORT, not {ccs!r}")
        return host.strip("[]"), int(port)
    return tuple(ccs)


HAPPY_EYEBALLS_DELAY = 0.25   # RFC 8305's recommended connection attempt delay
CLOSE_TIMEOUT = 5.0           # seconds close() waits for a task to stop, or for the CCS's close_notify


def _eyeballs() -> dict:
    """The happy-eyeballs option for this loop's create_connection, where
    it has one (asyncio's does; uvloop's tries the resolver's addresses in
    turn, IPv6 first by RFC 6724's order)."""
    import inspect

    loop = asyncio.get_running_loop()
    try:
        params = inspect.signature(loop.create_connection).parameters
    except (TypeError, ValueError):
        return {}
    return {"happy_eyeballs_delay": HAPPY_EYEBALLS_DELAY} \
        if "happy_eyeballs_delay" in params else {}


class Device:
    def __init__(self, ccs: Union[str, tuple, Sequence], name: str, key: bytes, *, ca_file: str,
                 server_hostname: Optional[str] = None, reconnect: bool = True,
                 backoff: Optional[Backoff] = None, connect_timeout: float = 10.0,
                 nat: str = "auto", standing: bool = False,
                 protocol: int = wire.VERSION,
                 tracer: Optional[Callable] = None,
                 keepalive: Union[None, bool, int, Keepalive] = None) -> None:
        single = isinstance(ccs, str) or (isinstance(ccs, tuple) and len(ccs) == 2
                                          and isinstance(ccs[1], int))
        self.addresses = [_address(ccs)] if single else [_address(c) for c in ccs]
        if not self.addresses:
            raise ValueError("give at least one CCS address")
        from fastpunch.netcheck.gatherer import Gatherer

        self.name, self.key, self.ca_file = name, key, ca_file
        self.server_hostname = server_hostname
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.protocol = protocol                      # CCS protocol version to speak
        # liveness of the streams we hand out: None follows the CCS's advertised
        # period, a number of seconds or a Keepalive overrides it, False turns it off
        liveness.resolve(keepalive)                   # a bad value fails here, not later
        self._keepalive = keepalive
        self.advertised_keepalive: Optional[int] = None
        # called with every punch event as it happens (proto.punch's typed events)
        self.tracer = tracer
        self.gatherer = Gatherer(nat, name=name)      # candidates, natcheck, capability
        # announce next-connection info ahead of offers (devices that accept())
        self.standing = standing
        self._standing: Optional[tuple] = None        # (info, gathered) the CCS holds
        self._tasks: set = set()                      # background: announcing, abandoning
        self._sessions: dict = {}                     # rendezvous session -> asyncio.Event
        self._left_early: dict = {}                   # session -> code: the peer left before we began
        self.probe_port: Optional[int] = None
        self.probe_port2: Optional[int] = None
        self.probe_token: Optional[bytes] = None      # what our probes carry (protocol 5)
        self.ccs_alt_addr: Optional[str] = None       # the CCS's address in the other family
        self.public_addr: Optional[tuple] = None      # what the CCS sees (reflexive)
        self.ccs: Optional[tuple] = None              # the node we are connected to
        self.ccs_ip = ""                              # its address (resolved)
        self.node: Optional[str] = None
        self.connections = 0                          # successful logins so far
        self._machine: Optional[Connection] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._supervisor: Optional[asyncio.Task] = None
        self._heartbeat: Optional[asyncio.Task] = None
        self._requests: dict[int, asyncio.Future] = {}     # our RendezvousRequests
        self._answers: dict[int, asyncio.Future] = {}      # our answers to offers
        self._offers: asyncio.Queue = asyncio.Queue()
        self._ids = itertools.count(1)
        self._up = asyncio.Event()
        self._closing = False
        self._fatal: Optional[BaseException] = None
        self._next_addr = 0

    @property
    def keepalive(self) -> Optional[Keepalive]:
        """What the next stream gets: the application's setting, else the
        period the CCS advertised at login, else liveness.DEFAULT."""
        return liveness.resolve(self._keepalive, self.advertised_keepalive)

    @keepalive.setter
    def keepalive(self, value: Union[None, bool, int, Keepalive]) -> None:
        liveness.resolve(value)
        self._keepalive = value

    @property
    def nat(self) -> str:
        """The NAT guess: "auto" (natcheck finds out) or the kind given."""
        return self.gatherer.nat

    @nat.setter
    def nat(self, value: str) -> None:
        from fastpunch.netcheck.gatherer import report_for_guess

        g = self.gatherer
        g.nat = value
        g.report = None if value == "auto" else report_for_guess(value)
        g.forget_prepared()                  # gathered on the old guess
        if value == "auto" and self.connected and g._ccs is not None:
            self._gather_for_session()

    @property
    def natcheck_result(self) -> Optional[dict]:
        report = self.gatherer.report
        return report.as_dict() if report is not None else None

    async def __aenter__(self) -> "Device":
        await self.login()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- connection --------------------------------------------------------------------
    async def login(self) -> None:
        """Log in to the CCS once (errors raise), then keep the connection up."""
        reader = await self._login_any()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(reader))

    async def _login_any(self) -> asyncio.StreamReader:
        last: Optional[BaseException] = None
        for _ in range(len(self.addresses)):
            addr = self.addresses[self._next_addr % len(self.addresses)]
            version = self.protocol
            while True:
                try:
                    return await self._login(addr, version)
                except AuthenticationError:
                    raise
                except CCSError as exc:
                    if exc.code == "version-refused" and version > 1:
                        # the version the CCS answered in is the newest it speaks
                        spoken = getattr(exc.__cause__, "version", None)
                        version = spoken if spoken in wire.VERSIONS and spoken < version \
                            else version - 1
                        log.warning("%s: %s; speaking protocol version %d to %s:%d",
                                    self.name, exc, version, *addr)
                        continue
                    last = exc
                except (OSError, asyncio.TimeoutError) as exc:
                    last = exc
                break
            self._next_addr += 1
        raise CCSError("unreachable", f"no CCS answered ({str(last) or type(last).__name__})") \
            from last

    async def _login(self, addr: tuple, version: int) -> asyncio.StreamReader:
        from fastpunch.credentials import client_context

        host, port = addr
        # a name with both A and AAAA records: RFC 8305's race, IPv6 first,
        # IPv4 250 ms later if IPv6 has not connected by then
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=client_context(self.ca_file),
            server_hostname=self.server_hostname or host, **_eyeballs()), self.connect_timeout)
        try:
            m = self._machine = Connection(Role.CLIENT, version)
            writer.write(m.hello(self.name, self.key, os.urandom))
            while True:
                msg = await asyncio.wait_for(self._read(reader), self.connect_timeout)
                if isinstance(msg, wire.Challenge):
                    writer.write(m.respond())
                elif isinstance(msg, wire.AuthOk):
                    break
                elif isinstance(msg, wire.Error):
                    raise AuthenticationError(msg.code, msg.reason)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self.public_addr, self.heartbeat, self.node = (msg.addr, msg.port), msg.heartbeat, msg.node
        self.probe_port, self.probe_port2 = msg.probe_port, msg.probe_port2
        # (a token of another size would make every probe, and so every gathering, fail)
        self.probe_token = msg.probe_token if msg.probe_token is not None and \
            len(msg.probe_token) == wire.PROBE_TOKEN else None
        self.ccs_alt_addr = msg.alt_addr
        self.advertised_keepalive = None
        if msg.keepalive is not None:
            try:
                self.advertised_keepalive = Keepalive(msg.keepalive).period
            except ValueError as exc:
                log.warning("%s: the CCS advertises a keepalive period of %d s (%s): "
                            "using the default", self.name, msg.keepalive, exc)
        self._supervise_control(writer)
        self.ccs = addr
        self.ccs_ip = unmap(writer.get_extra_info("peername")[0])
        self.connections += 1
        self.backoff.reset()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats())
        self._up.set()
        self._drop_standing()                          # a new session holds none yet
        self._gather_for_session()
        if self.standing:
            self._spawn(self._announce())
        return reader

    def _our_public(self, gathered) -> str:
        """Our IPv4 address as the CCS sees it (what the peer is told: the
        CCS's Ready names the peer's IPv4 address where it has one): the
        login's when it was over IPv4, else our IPv4 reflexive candidate's,
        else the login's (an IPv6-only device)."""
        if ":" not in self.public_addr[0]:
            return self.public_addr[0]
        srflx = getattr(gathered, "srflx", None)
        return srflx[0] if srflx and ":" not in srflx[0] else self.public_addr[0]

    def _gather_for_session(self) -> None:
        self.gatherer.logged_in(self.ccs_ip, self.probe_port, self.probe_port2,
                                token=self.probe_token, alt_addr=self.ccs_alt_addr)

    async def _read(self, reader: asyncio.StreamReader):
        while True:
            try:
                msg = self._machine.next_event()
            except RemoteProtocolError as exc:
                if getattr(exc, "code", "") == "server-auth-failed":
                    raise AuthenticationError(exc.code, str(exc)) from exc
                raise CCSError(getattr(exc, "code", "protocol-error"), str(exc)) from exc
            if msg is CLOSED:
                raise CCSError("closed", "the CCS closed the connection")
            if msg is not NEED_DATA:
                return msg
            self._machine.receive_data(await reader.read(65536))

    async def _supervise(self, reader: asyncio.StreamReader) -> None:
        while True:
            reason = await self._serve(reader)
            self._down(reason)
            if self._closing or not self.reconnect or isinstance(reason, AuthenticationError):
                self._fatal = reason
                self._offers.put_nowait(reason)
                return
            while True:
                await asyncio.sleep(self.backoff.next_delay())
                if self._closing:
                    return
                self._next_addr += 1
                try:
                    reader = await self._login_any()
                except AuthenticationError as exc:
                    self._fatal = exc
                    self._offers.put_nowait(exc)
                    return
                except CCSError:
                    if self._closing:       # close()'s cancellation, turned into the login's error
                        return
                    continue
                if self._closing:           # logged in though close() cancelled us (a lost
                    return                  # cancellation): close() takes this session down
                break

    async def _serve(self, reader: asyncio.StreamReader) -> BaseException:
        try:
            while True:
                msg = await self._read(reader)
                if isinstance(msg, wire.RendezvousOffer):
                    self._offers.put_nowait(Offer(msg.peer, msg.request, self))
                elif isinstance(msg, wire.RendezvousReady) and msg.role == "responder" \
                        and msg.request == STANDING:
                    self._standing_used(msg)
                elif isinstance(msg, wire.RendezvousReady):
                    table = self._requests if msg.role == "initiator" else self._answers
                    self._resolve(table, msg.request, msg)
                elif isinstance(msg, wire.RendezvousRefused):
                    # refusals answer our requests, or an offer whose asker left
                    if not self._resolve(self._requests, msg.request, msg) and \
                            not self._resolve(self._answers, msg.request, msg) and \
                            msg.request == STANDING and self._standing is not None:
                        self._drop_standing()           # used up by a failed rendezvous
                        self._spawn(self._announce())
                elif isinstance(msg, wire.PeerLeft):
                    log.info("%s: %s left rendezvous %d: %s", self.name, msg.peer,
                             msg.session, msg.reason)
                    gone = self._sessions.get(msg.session)
                    if gone is not None:
                        gone.left(msg.code)
                    else:
                        # it may come right behind its Ready, in the same read,
                        # before the punch of that Ready has begun
                        self._left_early[msg.session] = msg.code
                        while len(self._left_early) > 64:
                            self._left_early.pop(next(iter(self._left_early)))
                elif isinstance(msg, wire.Error):
                    # the CCS refused this device's credentials, or an operator
                    # removed, disabled or re-keyed it: logging in again cannot help
                    cls = AuthenticationError if msg.code in FINAL_CODES else CCSError
                    return cls(msg.code, msg.reason)
        except CCSError as exc:
            return exc
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            return CCSError("disconnected", f"connection to the CCS lost: {exc}")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self) -> None:
        """Tell the CCS our next-connection info ahead of any offer (one at
        a time: a fresh one only after the last was used). Not behind a
        sequential NAPT, whose predicted port goes stale with any other
        traffic."""
        if self._standing is not None or self._closing:
            return
        try:
            # what natcheck finds (a port mapping, the mapping kind) belongs
            # in the announcement: wait for it (the CCS offers meanwhile, one
            # round trip slower); not announced again later, as one in flight
            # might answer an offer meanwhile
            await self.gatherer.settled()
            if self._standing is not None or self._closing or not self.connected:
                return
            info, gathered = await self.next_info(punch=True)
            if info.mapping == "sequential":
                await self.gatherer.release(gathered)
                return
            self._standing = (info, gathered)
            self._send(wire.RendezvousAnswer(request=STANDING, **info.fields()))
        except (CCSError, OSError, RuntimeError) as exc:   # re-announced at the next login
            if self._standing is not None:
                await self.gatherer.release(self._standing[1])
            self._standing = None
            log.info("%s: next-connection info not announced: %s", self.name, exc)

    def _drop_standing(self) -> None:
        """Forget the standing info the CCS no longer holds, and let its
        port go (reservation, RST guard, gateway mapping)."""
        if self._standing is not None:
            self._spawn(self.gatherer.release(self._standing[1]))
            self._standing = None

    def _standing_used(self, ready: wire.RendezvousReady) -> None:
        """The CCS answered an offer with our standing info: hand accept()
        an offer already answered, and announce the next info."""
        if self._standing is None:
            log.warning("%s: a rendezvous for standing info we do not hold", self.name)
            return
        (info, gathered), self._standing = self._standing, None
        self._offers.put_nowait(Offer(ready.peer, STANDING, self, ready, info, gathered))
        # (gathering the next one runs beside the punch this Ready starts;
        # what it does on the loop thread takes well under a millisecond)
        self._spawn(self._announce())

    @staticmethod
    def _resolve(table: dict, request: int, msg) -> bool:
        fut = table.pop(request, None)
        if fut is None or fut.done():
            return False
        fut.set_result(msg)
        return True

    def _down(self, reason: BaseException) -> None:
        self._up.clear()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._writer is not None:
            self._writer.close()
        lost = CCSError("disconnected", f"the CCS connection dropped: {reason}")
        for table in (self._requests, self._answers):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(lost)
            table.clear()

    async def _heartbeats(self) -> None:
        for seq in itertools.count(1):
            await asyncio.sleep(self.heartbeat)
            try:
                self._send(wire.Heartbeat(seq & 0xFFFFFFFF))
            except CCSError:
                return

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, timeout: Optional[float] = None) -> None:
        await asyncio.wait_for(self._up.wait(), timeout)

    def _send(self, msg: wire.Message) -> None:
        if self._fatal is not None:
            raise self._fatal
        if not self._up.is_set():
            raise CCSError("disconnected", "not connected to the CCS (reconnecting)")
        self._writer.write(self._machine.send(msg))

    async def _exchange(self, table: dict, request: int, msg: wire.Message, timeout: float):
        fut = asyncio.get_running_loop().create_future()
        table[request] = fut
        try:
            self._send(msg)
            result = await asyncio.wait_for(fut, timeout)
        finally:
            table.pop(request, None)
        if isinstance(result, wire.RendezvousRefused):
            raise RendezvousRefusedError(result.code, result.reason)
        return result

    # -- the API -----------------------------------------------------------------------
    async def rendezvous(self, peer: str, info: NextInfo, timeout: float = 35.0, *,
                         relay_first: Union[bool, str] = False) -> wire.RendezvousReady:
        """Ask the CCS to arrange a connection with ``peer`` (which may connect
        later); returns its info, the session key, the plan and the start time.
        ``relay_first``: True (or "yes") asks for a relay-first rendezvous,
        "auto" for one where the CCS expects a slow punch (its Ready says
        whether it is one: both sides' protocol must have it)."""
        mode = _relay_first_mode(relay_first)
        request = next(self._ids) & 0xFFFFFFFF
        return await self._exchange(
            self._requests, request,
            wire.RendezvousRequest(request=request, peer=peer, **info.fields(),
                                   relay_first=None if mode is RelayFirst.NO else mode.value),
            timeout)

    async def incoming(self) -> AsyncIterator[Offer]:
        while True:
            item = await self._offers.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def relay(self, ready: wire.RendezvousReady, timeout: float = 35.0) -> socket.socket:
        """Join the CCS relay for this rendezvous; returns a connected,
        non-blocking socket once the peer has joined too, with this
        device's keepalive (``self.keepalive``) set on it."""
        from fastpunch.ccs.relay import JOINED, MAGIC, relay_status_error

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in ready.relay_addr else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (ready.relay_addr, ready.relay_port)),
                                   timeout)
            await loop.sock_sendall(sock, MAGIC + ready.relay_token)
            status = await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)
        except BaseException:
            sock.close()
            raise
        if status != bytes([JOINED]):
            sock.close()
            code, reason = relay_status_error(status[0]) if status else \
                ("relay-closed", "the relay closed the connection")
            raise RelayError(code, reason)
        return self._kept_alive(sock)

    def _supervise_control(self, writer: asyncio.StreamWriter) -> None:
        """Keepalive on the CCS connection itself, whatever the streams get:
        a gateway that rebooted under it (every flow forgotten) must turn
        into a reconnect within seconds, not TCP's quarter of an hour of
        retransmits, or nothing can resume through the CCS."""
        sock = writer.get_extra_info("socket")
        if sock is None:
            return
        try:
            liveness.apply(sock, self.keepalive or liveness.DEFAULT)
        except liveness.KeepaliveError as exc:
            log.warning("%s: no keepalive on the CCS connection: %s", self.name, exc)

    def _kept_alive(self, sock: socket.socket) -> socket.socket:
        """sock with this device's keepalive set (closed if the kernel refuses it)."""
        try:
            liveness.apply(sock, self.keepalive)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- what the network is (fastpunch.netcheck) --------------------------------------
    async def whoami(self, local_port: int = 0) -> tuple:
        """(address, port) the CCS sees for a fresh TCP connection from
        ``local_port`` (0: any): one probe of this device's NAT mapping."""
        from fastpunch.netcheck import probes

        if not self.probe_port:
            raise CCSError("no-probe", "this CCS node answers no address probes")
        try:
            return await probes.whoami(self.ccs_ip, self.probe_port, local_port)
        except probes.ProbeError as exc:
            raise CCSError(exc.code, str(exc)) from exc

    async def filtering(self) -> str:
        """How our gateway treats an unsolicited SYN (netcheck.probes.filtering)."""
        from fastpunch.netcheck import probes

        if not self.probe_port:
            return "unknown"
        return (await probes.filtering(self.ccs_ip, self.probe_port)).value

    async def natcheck(self, probes: int = 3) -> dict:
        """What this device's gateway does (fastpunch.netcheck.natcheck), now."""
        if not self.probe_port:
            raise CCSError("no-probe", "this CCS node answers no address probes")
        return (await self.gatherer.natcheck_now(probes)).as_dict()

    async def ready(self, timeout: Optional[float] = None) -> Optional[dict]:
        """Wait until what gathering does in the background after a login is
        done (natcheck, the next port's candidates) and return natcheck's
        report. ``connect()`` never waits for it; a device may, to have its
        first connection planned on the evidence (a camera before it
        announces itself, the matrix before its trials)."""
        await asyncio.wait_for(self.gatherer.settled(), timeout)
        return self.natcheck_result

    async def next_info(self, *, punch: bool = False) -> tuple:
        """(next-connection info to announce, the netcheck.Gathered it
        describes: the punch port and its candidates). Release the port
        with ``await dev.gatherer.release(gathered)`` when it is not used.
        ``punch``: a punch of ours will use it (it is guarded against our
        kernel's RSTs from now on)."""
        g = self.gatherer
        gathered = await g.take(guard=punch)
        report = g.report
        from fastpunch.netcheck.route import mss_toward

        info = NextInfo(port=gathered.port, isn=g.isn(), mss=mss_toward(self.ccs_ip),
                        nat=(report.nat.value if report is not None else "unknown"),
                        crafted=g.crafted().crafted,
                        candidates=gathered.candidates,
                        mapping=report.mapping.value if report is not None else "unknown",
                        filtering=report.filtering.value if report is not None else "unknown",
                        filtering6=g.filtering6.value if gathered.v6 else None)
        return info, gathered

    # -- direct connections (fastpunch.punch) -----------------------------------------
    async def connect(self, peer: str, *, strategies=None, timeout: float = 35.0,
                      relay_after: Optional[float] = None,
                      relay_first: Union[bool, str] = False) -> PeerConnection:
        """A connected socket to ``peer``: direct when the networks allow it,
        through the CCS relay otherwise. ``strategies`` restricts the plan
        (both sides must restrict it alike). ``relay_first``: return as soon
        as the relay is joined (one CCS round trip and the relay's join), the
        punch going on behind it; the connection's resumable() session moves
        to the direct path when it is made (the peer's accept() follows the
        CCS's word, nothing to set there). ``relay_first="auto"``: only where
        the CCS expects the punch to be slow or to fail (proto.plan.
        relay_first_helps), the choice for a viewer opening a camera with a
        session. Used with secure() or the bare socket, the connection stays
        on the relay: relay-first is for resumable() sessions."""
        began = time.time()
        info, gathered = await self.next_info(punch=True)
        try:
            ready = await self.rendezvous(peer, info, timeout, relay_first=relay_first)
        except BaseException:
            await self.gatherer.release(gathered)
            raise
        return await self._punch(ready, info, gathered, began, strategies, relay_after)

    async def accept(self, *, strategies=None, relay_after: Optional[float] = None,
                     peer: Optional[str] = None) -> PeerConnection:
        """Wait for a peer's connect() (only ``peer``'s, if given: offers from
        others are left unanswered) and complete it. With ``standing=True``
        an offer the CCS already answered from our announced info may come
        first; filtering it out by ``peer`` leaves that peer to its relay."""
        async for offer in self.incoming():
            if peer is not None and offer.peer != peer:
                if offer.ready is not None:        # answered ahead: that peer is punching
                    self._abandon(offer.ready, CCSError("not-accepted",
                                                        f"{self.name} accepts {peer} only"))
                    self._spawn(self.gatherer.release(offer.gathered))
                continue
            began = time.time()
            if offer.ready is not None:                # answered ahead (standing)
                return await self._punch(offer.ready, offer.info, offer.gathered, began,
                                         strategies, relay_after)
            info, gathered = await self.next_info(punch=True)
            try:
                ready = await offer.answer(info)
            except BaseException:
                await self.gatherer.release(gathered)
                raise
            return await self._punch(ready, info, gathered, began, strategies, relay_after)
        raise CCSError("closed", "the device is closed")

    async def _punch(self, ready, info: NextInfo, gathered, began: float, strategies,
                     relay_after) -> PeerConnection:
        from fastpunch.punch.rendezvous import punch_ready

        gone = _Gone()
        if ready.session is not None:
            self._sessions[ready.session] = gone
            if ready.session in self._left_early:
                gone.left(self._left_early.pop(ready.session))
        if ready.relay_first:
            return await self._relay_first(ready, info, gathered, began, strategies, gone)
        try:
            sock, report = await punch_ready(
                ready, info, gathered, our_public=self._our_public(gathered), ccs_ip=self.ccs_ip,
                relay=lambda: self.relay(ready), strategies=strategies,
                relay_after=relay_after, cancel=gone, began=began, tracer=self.tracer)
        except BaseException as exc:
            self._abandon(ready, exc)
            raise
        finally:
            self._sessions.pop(ready.session, None)
            gathered.release()                   # the port's reservation, at once
            self._spawn(self.gatherer.release(gathered))
        if report.path != "relay":             # relay() set it on a relayed one
            try:
                self._kept_alive(sock)
            except BaseException as exc:
                self._abandon(ready, exc)
                raise
        return PeerConnection(sock, ready.peer, report.path, report.strategy, ready.role,
                              ready.key, report, self.keepalive,
                              loop=asyncio.get_running_loop(), device=self)

    async def _relay_first(self, ready, info: NextInfo, gathered, began: float, strategies,
                           gone: asyncio.Event) -> PeerConnection:
        """The relay at once, the direct plan behind it (its result is the
        connection's ``upgrade``). Both sides come here (the CCS said so to
        both), so both take the relay if both join it, and the direct path
        only as an upgrade: never one side on each. If the relay fails, the
        direct punch is the connection."""
        from fastpunch.punch.base import Report
        from fastpunch.punch.rendezvous import punch_ready

        loop = asyncio.get_running_loop()
        direct = [s for s in (strategies or ready.plan) if s != "relay"]

        async def punch() -> PeerConnection:
            try:
                if not direct:
                    raise CCSError("no-direct", "no direct strategy in the plan")
                sock, report = await punch_ready(
                    ready, info, gathered, our_public=self._our_public(gathered),
                    ccs_ip=self.ccs_ip,
                    relay=None, strategies=direct, cancel=gone, began=began,
                    tracer=self.tracer)
                self._kept_alive(sock)
            except BaseException as exc:
                self._abandon(ready, exc)
                raise
            finally:
                self._sessions.pop(ready.session, None)
                gathered.release()
                self._spawn(self.gatherer.release(gathered))
            return PeerConnection(sock, ready.peer, report.path, report.strategy, ready.role,
                                  ready.key, report, self.keepalive, loop=loop, device=self)

        punching = loop.create_task(punch())
        joining = loop.create_task(self.relay(ready))
        left = loop.create_task(gone.wait())
        try:
            await asyncio.wait({joining, left}, return_when=asyncio.FIRST_COMPLETED)
            if not joining.done() and gone.code == "peer-abandoned":
                # the peer gave its punch up (so ours stops too), not the
                # relay: it joins (relay()'s own timeout bounds the wait)
                await asyncio.wait({joining})
        except asyncio.CancelledError:
            for task in (punching, joining):
                task.cancel()
            await asyncio.gather(punching, joining, return_exceptions=True)
            raise
        finally:
            left.cancel()
        if not joining.done():      # the peer left: nobody comes to the relay (nor the punch)
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
            return await punching   # raises its peer-gone
        failure = joining.exception()
        if failure is not None:     # the relay refused or failed: the direct path is all
            log.info("%s: relay-first: the relay failed (%s); waiting for the direct path",
                     self.name, failure)
            conn = await punching
            conn.report.history.insert(0, (0.0, f"relay-first: the relay failed: {failure}"))
            return conn
        sock = joining.result()
        report = Report(ready.peer, path="relay", strategy="relay", seconds=time.time() - began)
        report.history.append((report.seconds, "relay-first: relay joined, punching behind it"))
        self._tasks.add(punching)            # closing the device cancels it
        punching.add_done_callback(self._tasks.discard)
        punching.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return PeerConnection(sock, ready.peer, "relay", "relay", ready.role, ready.key, report,
                              self.keepalive, loop=loop, device=self, upgrade=punching)

    def _abandon(self, ready, exc: BaseException) -> None:
        """Tell the CCS we gave this rendezvous up, so it tells the peer
        (which then stops within a second instead of running its plan out)."""
        if ready.session is None or getattr(exc, "reason", "") == "peer-gone":
            return
        code = "cancelled" if isinstance(exc, asyncio.CancelledError) else \
            getattr(exc, "reason", None) or getattr(exc, "code", None) or "failed"
        try:
            self._send(wire.Abandon(ready.session, wire.fit(str(code), wire.CODE),
                                    wire.fit(str(exc)) or code))
        except (CCSError, ValueError, OSError):
            pass                                # the peer learns it from our session ending

    async def close(self) -> None:
        self._closing = True
        if not await _loop.stop(self._supervisor, timeout=CLOSE_TIMEOUT):
            log.warning("%s: the CCS session did not stop within %g s of close()",
                        self.name, CLOSE_TIMEOUT)
        # (after the supervisor: its last login may have started another)
        await _loop.stop(self._heartbeat, timeout=CLOSE_TIMEOUT)
        self._down(CCSError("closed", "closed by the device"))
        # an incoming()/accept() still waiting ends now, not never
        self._offers.put_nowait(CCSError("closed", "the device is closed"))
        if self._standing is not None:
            await self.gatherer.release(self._standing[1])
            self._standing = None
        await self.gatherer.close()
        await _loop.stop(*self._tasks, timeout=CLOSE_TIMEOUT)
        if self._writer is not None:
            try:
                # the CCS answers our close_notify at once; if it does not, do
                # not sit out the loop's SSL shutdown timeout (uvloop's: 30 s)
                await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                self._writer.transport.abort()
            except (ConnectionError, OSError):
                pass
