"""The device's side of the CCS: ``async with Device(...) as dev``.

    async with Device("ccs.example:7443", "camera-1", key, ca_file="ca.pem") as dev:
        ready = await dev.rendezvous("viewer-1", NextInfo(port=40000, isn=1234, nat="nat"))
        async for offer in dev.incoming():
            ready = await offer.answer(NextInfo(...))
            sock = await dev.relay(ready)          # when nothing direct works

A thin asyncio layer over fastpunch.proto.connection. The device stays
connected: when the connection drops it reconnects with jittered
exponential backoff, trying each CCS address it was given in turn (several
nodes of one deployment). Requests in flight when the connection drops fail
with ``CCSError("disconnected")``; ``incoming()`` carries on after a
reconnect. A credential the CCS refuses is final (no retry loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence, Union

from fastpunch.errors import FastpunchError, RemoteProtocolError
from fastpunch.proto import wire
from fastpunch.proto.backoff import Backoff
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, Role
from fastpunch.proto.wire import STANDING, NextInfo

log = logging.getLogger("fastpunch.client")

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

    def secure(self):
        """The secure channel over this connection (blocking socket API)."""
        from fastpunch.channel import SecureSocket

        self.sock.setblocking(True)
        return SecureSocket(self.sock, self.role, self.key)

    async def secure_streams(self):
        """The secure channel as asyncio (reader, writer)."""
        from fastpunch.channel import secure_streams

        self.sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=self.sock)
        return await secure_streams(reader, writer, self.role, self.key)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and drop what the strategy keeps for the flow's
        lifetime (spoof's host rewrite)."""
        from fastpunch.punch.base import release

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
    local: int = 0

    async def answer(self, info: NextInfo, timeout: float = 30.0) -> wire.RendezvousReady:
        if self.ready is not None:
            raise CCSError("already-answered", "the CCS answered this offer with the info "
                                               "announced ahead (standing); use accept()")
        return await self._device._exchange(
            self._device._answers, self.request,
            wire.RendezvousAnswer(request=self.request, **info.fields()), timeout)


def _address(ccs: Union[str, tuple]) -> tuple:
    if isinstance(ccs, str):
        host, sep, port = ccs.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"a CCS address is HOST:PORT, not {ccs!r}")
        return host.strip("[]"), int(port)
    return tuple(ccs)


class Device:
    def __init__(self, ccs: Union[str, tuple, Sequence], name: str, key: bytes, *, ca_file: str,
                 server_hostname: Optional[str] = None, reconnect: bool = True,
                 backoff: Optional[Backoff] = None, connect_timeout: float = 10.0,
                 nat: str = "unknown", standing: bool = False) -> None:
        single = isinstance(ccs, str) or (isinstance(ccs, tuple) and len(ccs) == 2
                                          and isinstance(ccs[1], int))
        self.addresses = [_address(ccs)] if single else [_address(c) for c in ccs]
        if not self.addresses:
            raise ValueError("give at least one CCS address")
        self.name, self.key, self.ca_file = name, key, ca_file
        self.server_hostname = server_hostname
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.nat = nat                                # NAT guess sent with its info; "auto": natcheck
        self.natcheck_result: Optional[dict] = None
        self._mappings: dict = {}                     # local port -> portmap.Mapping
        # announce next-connection info ahead of offers (devices that accept())
        self.standing = standing
        self._standing: Optional[tuple] = None        # (info, local port) the CCS holds
        self._natcheck_lock: Optional[asyncio.Lock] = None
        self._tasks: set = set()                      # background: unmapping, announcing
        self.probe_port: Optional[int] = None
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
            try:
                return await self._login(addr)
            except AuthenticationError:
                raise
            except (OSError, CCSError, asyncio.TimeoutError) as exc:
                last = exc
                self._next_addr += 1
        raise CCSError("unreachable", f"no CCS answered ({last})") from last

    async def _login(self, addr: tuple) -> asyncio.StreamReader:
        from fastpunch.ccs.pki import client_context

        host, port = addr
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=client_context(self.ca_file),
            server_hostname=self.server_hostname or host), self.connect_timeout)
        try:
            m = self._machine = Connection(Role.CLIENT)
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
        self.probe_port = msg.probe_port
        self.ccs = addr
        self.ccs_ip = writer.get_extra_info("peername")[0]
        self.connections += 1
        self.backoff.reset()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats())
        self._up.set()
        self._standing = None                          # a new session holds none yet
        if self.standing:
            self._spawn(self._announce())
        return reader

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
                self._next_addr += 1
                try:
                    reader = await self._login_any()
                    break
                except AuthenticationError as exc:
                    self._fatal = exc
                    self._offers.put_nowait(exc)
                    return
                except CCSError:
                    continue

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
                        self._standing = None           # used up by a failed rendezvous
                        self._spawn(self._announce())
                elif isinstance(msg, wire.Error):
                    cls = AuthenticationError if msg.code == "auth-failed" else CCSError
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
        a time: a fresh one only after the last was used). Not for guesses
        whose info goes stale: a sequential NAPT's predicted port, a mapped
        port with a lifetime."""
        if self._standing is not None or self._closing:
            return
        try:
            if await self.nat_guess() in ("napt-sequential", "upnp"):
                return
            info, local = await self.next_info()
            self._standing = (info, local)
            self._send(wire.RendezvousAnswer(request=STANDING, **info.fields()))
        except (CCSError, OSError) as exc:          # re-announced at the next login
            self._standing = None
            log.info("%s: next-connection info not announced: %s", self.name, exc)

    def _standing_used(self, ready: wire.RendezvousReady) -> None:
        """The CCS answered an offer with our standing info: hand accept()
        an offer already answered, and announce the next info."""
        if self._standing is None:
            log.warning("%s: a rendezvous for standing info we do not hold", self.name)
            return
        (info, local), self._standing = self._standing, None
        self._offers.put_nowait(Offer(ready.peer, STANDING, self, ready, info, local))
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
    async def rendezvous(self, peer: str, info: NextInfo,
                         timeout: float = 35.0) -> wire.RendezvousReady:
        """Ask the CCS to arrange a connection with ``peer`` (which may connect
        later); returns its info, the session key, the plan and the start time."""
        request = next(self._ids) & 0xFFFFFFFF
        return await self._exchange(
            self._requests, request,
            wire.RendezvousRequest(request=request, peer=peer, **info.fields()), timeout)

    async def incoming(self) -> AsyncIterator[Offer]:
        while True:
            item = await self._offers.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def relay(self, ready: wire.RendezvousReady, timeout: float = 35.0) -> socket.socket:
        """Join the CCS relay for this rendezvous; returns a connected,
        non-blocking socket once the peer has joined too."""
        from fastpunch.ccs.relay import JOINED, MAGIC, relay_status_error

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
        return sock

    # -- direct connections (the punching layer) --------------------------------------
    async def whoami(self, local_port: int = 0) -> tuple:
        """(address, port) the CCS sees for a fresh TCP connection from
        ``local_port`` (0: any): one probe of this device's NAT mapping."""
        from fastpunch.ccs.relay import WHOAMI

        if not self.probe_port:
            raise CCSError("no-probe", "this CCS node answers no address probes")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        try:
            sock.bind(("0.0.0.0", local_port))
            await asyncio.wait_for(loop.sock_connect(sock, (self.ccs[0], self.probe_port)), 5)
            await loop.sock_sendall(sock, WHOAMI + bytes(32))
            data = b""
            while len(data) < 6:
                part = await asyncio.wait_for(loop.sock_recv(sock, 6 - len(data)), 5)
                if not part:
                    raise CCSError("bad-probe", "the CCS closed the probe early")
                data += part
        finally:
            sock.close()
        return socket.inet_ntoa(data[:4]), int.from_bytes(data[4:], "big")

    async def filtering(self) -> str:
        """How our gateway treats an unsolicited SYN from another port of the
        CCS's address to the mapping a connection of ours just opened:
        "open" (let in: no filter), "drop", "rst" (the gateway resets it), or
        "unknown" (the CCS node does not probe, or is busy). A listener on
        the probed port tells a let-in SYN from a RST of our own kernel."""
        from fastpunch.ccs.relay import FILTER_VERDICTS, FILTERING

        if not self.probe_port:
            return "unknown"
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for s in (sock, listener):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.setblocking(False)
            sock.bind(("0.0.0.0", 0))
            listener.bind(("0.0.0.0", sock.getsockname()[1]))
            listener.listen(1)
            await asyncio.wait_for(loop.sock_connect(sock, (self.ccs[0], self.probe_port)), 5)
            await loop.sock_sendall(sock, FILTERING + bytes(32))
            verdict = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        finally:
            sock.close()
            listener.close()
        answer = FILTER_VERDICTS.get(verdict, "unknown")
        return "unknown" if answer == "busy" else answer

    async def natcheck(self, probes: int = 3) -> dict:
        """Classify this device's NAT mapping (fastpunch.punch.natcheck)."""
        from fastpunch.punch.natcheck import natcheck

        self.natcheck_result = await natcheck(self, probes)
        return self.natcheck_result

    async def nat_guess(self) -> str:
        """The NAT guess this device announces: ``nat`` as given, or with
        "auto" natcheck's verdict (natcheck runs once, on first need)."""
        if self.nat != "auto":
            return self.nat
        if self.natcheck_result is None:
            # one natcheck at a time: the standing announcement and an
            # accept() may both get here first, and interleaved probes would
            # spoil a sequential NAPT's steady step
            if self._natcheck_lock is None:
                self._natcheck_lock = asyncio.Lock()
            async with self._natcheck_lock:
                if self.natcheck_result is None:
                    await self.natcheck()
        return self.natcheck_result["nat"]

    async def next_info(self) -> tuple:
        """(next-connection info to announce, local port to use). Behind a
        sequential NAPT the announced port is the predicted mapping, probed
        just before; everywhere else it is the local port itself."""
        from fastpunch import _caps

        from fastpunch.punch.base import free_port

        guess = await self.nat_guess()
        local = free_port()
        announced = local
        mapping = None
        if guess == "upnp":
            mapping = await self._map(local)
            if mapping is not None:
                announced = mapping.external_port
        elif guess == "napt-sequential":
            _, seen = await self.whoami()
            announced = (seen + self.natcheck_result.get("delta", 1)) & 0xFFFF \
                if self.natcheck_result else (seen + 1) & 0xFFFF
        crafted = not _caps.missing(_caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN)
        info = NextInfo(port=announced, isn=int.from_bytes(os.urandom(4), "big"), nat=guess,
                        crafted=crafted)
        if mapping is not None:
            self._mappings[local] = mapping
        return info, local

    async def _map(self, local: int):
        """Ask the gateway to forward an external port to ``local`` (the
        protocol natcheck found first); None, logged, when it will not."""
        from fastpunch import portmap

        found = (self.natcheck_result or {}).get("portmap")
        order = ((found,) if found else ()) + tuple(p for p in portmap.PROTOCOLS if p != found)
        try:
            return await portmap.map_port("0.0.0.0", local, protocols=order, timeout=0.75)
        except (portmap.PortMapError, OSError) as exc:
            log.warning("%s: no port mapping from the gateway: %s", self.name, exc)
            return None

    def _unmap(self, local: int) -> None:
        """Delete the mapping made for ``local`` (in the background: the
        connection does not wait for it, and it expires anyway)."""
        mapping = self._mappings.pop(local, None)
        if mapping is None:
            return
        from fastpunch import portmap

        async def delete():
            try:
                await portmap.unmap(mapping)
            except (portmap.PortMapError, OSError) as exc:
                log.info("%s: mapping %s not deleted (%s); it expires in %d s", self.name,
                         mapping.external_port, exc, mapping.lifetime)

        self._spawn(delete())

    async def connect(self, peer: str, *, strategies=None, timeout: float = 35.0,
                      relay_after: Optional[float] = None) -> PeerConnection:
        """A connected socket to ``peer``: direct when the networks allow it,
        through the CCS relay otherwise. ``strategies`` restricts the plan
        (both sides must restrict it alike)."""
        began = time.time()
        info, local = await self.next_info()
        try:
            ready = await self.rendezvous(peer, info, timeout)
        except BaseException:
            self._unmap(local)
            raise
        return await self._punch(ready, info, local, began, strategies, relay_after)

    async def accept(self, *, strategies=None, relay_after: Optional[float] = None,
                     peer: Optional[str] = None) -> PeerConnection:
        """Wait for a peer's connect() (only ``peer``'s, if given: offers from
        others are left unanswered) and complete it. With ``standing=True``
        an offer the CCS already answered from our announced info may come
        first; filtering it out by ``peer`` leaves that peer to its relay."""
        async for offer in self.incoming():
            if peer is not None and offer.peer != peer:
                continue
            began = time.time()
            if offer.ready is not None:                # answered ahead (standing)
                return await self._punch(offer.ready, offer.info, offer.local, began,
                                         strategies, relay_after)
            info, local = await self.next_info()
            try:
                ready = await offer.answer(info)
            except BaseException:
                self._unmap(local)
                raise
            return await self._punch(ready, info, local, began, strategies, relay_after)
        raise CCSError("closed", "the device is closed")

    async def _punch(self, ready, info: NextInfo, local_port: int, began: float, strategies,
                     relay_after) -> PeerConnection:
        from fastpunch.punch import planner
        from fastpunch.punch.base import PunchContext, Report, route_source

        ctx = PunchContext(
            role=ready.role, local_ip=route_source(ready.addr), local_port=local_port,
            iss=info.isn, peer_ip=ready.addr, peer_port=ready.port, peer_isn=ready.isn,
            mss=info.mss, wscale=info.wscale, sack_permitted=info.sack_permitted,
            timestamps=info.timestamps, peer_mss=ready.mss, peer_wscale=ready.wscale,
            peer_sack_permitted=ready.sack_permitted, peer_timestamps=ready.timestamps,
            peer_nat=ready.nat, nat=info.nat, ccs_ip=self.ccs_ip,
            mapped_port=info.port if local_port in self._mappings else None)
        report = Report(ready.peer)
        kw = {} if relay_after is None else {"relay_after": relay_after}
        try:
            sock, strategy = await planner.punch(ctx, ready.plan, ready.start_at / 1000, report,
                                                 relay=lambda: self.relay(ready),
                                                 only=strategies, **kw)
        except Exception as exc:          # the caller gets the attempts with the failure
            report.seconds = time.time() - began
            exc.report = report
            raise
        finally:
            self._unmap(local_port)
        report.path = "relay" if strategy == "relay" else "direct"
        report.strategy = strategy
        report.seconds = time.time() - began
        return PeerConnection(sock, ready.peer, report.path, strategy, ready.role, ready.key,
                              report)

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._supervisor, self._heartbeat) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._down(CCSError("closed", "closed by the device"))
        if self._writer is not None:
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
