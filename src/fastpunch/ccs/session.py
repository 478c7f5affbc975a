"""One device's connection to the CCS: bytes in and out of its
server-side Connection machine (fastpunch.proto.connection), within the
device's budgets (fastpunch.ccs.budget); what it asks for is the server's
to do (fastpunch.ccs.server)."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Optional

from fastpunch._addr import family, unmap
from fastpunch.ccs.budget import Bucket
from fastpunch.ccs.events import event
from fastpunch.ccs.lifecycle import REFUSALS, stale
from fastpunch.errors import RemoteProtocolError
from fastpunch.proto import wire
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, ProtocolViolation, Role, State

if TYPE_CHECKING:
    from fastpunch.ccs.server import CCSServer

__all__ = ["DeviceSession"]


class DeviceSession(asyncio.Protocol):
    """Thin glue: bytes in and out of one server-side Connection machine,
    within the device's budgets: messages a second (a token bucket),
    bytes queued to it (reading stops while its transport is paused, and a
    device that lets more pile up is cut), rendezvous and offers under way."""

    __slots__ = ("server", "machine", "name", "peer", "transport", "_deadline", "rtt",
                 "_challenged", "standing", "key", "bucket", "in_flight", "offers_pending",
                 "offers_from", "expired", "generation", "seen", "seen_ports",
                 "probe_token")

    def __init__(self, server: CCSServer, key: int = 0) -> None:
        self.server = server
        self.key = key                      # in the server's gate until logged in
        self.bucket: Optional[Bucket] = None
        self.in_flight = 0                  # rendezvous it asked for, unanswered
        self.offers_pending = 0             # offers to it, unanswered
        self.offers_from: dict = {}         # the same, per asking device
        self.expired: collections.deque = collections.deque(maxlen=64)   # offers it let lapse
        self.generation = 0
        self.machine = Connection(Role.SERVER)
        self.name: Optional[str] = None
        self.peer: tuple = ("0.0.0.0", 0)
        self.transport: Optional[asyncio.Transport] = None
        self._deadline: Optional[asyncio.TimerHandle] = None
        self.rtt: Optional[float] = None          # Challenge -> AuthResponse, seconds
        self._challenged = 0.0
        self.standing: Optional[wire.NextInfo] = None   # announced ahead, for the next offer
        # where the CCS has seen this device, per family: its login's address,
        # and what its token-carrying "who am I" probes came from (protocol 5)
        self.seen: dict = {}
        # per family, the last few source ports of its token probes: the ports
        # it punches from (its IPv6 neighbours' addresses pass only on these)
        self.seen_ports: dict = {}
        self.probe_token: Optional[bytes] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        ip, port = transport.get_extra_info("peername")[:2]
        self.peer = (unmap(ip), port)
        budgets = self.server.budgets
        transport.set_write_buffer_limits(high=min(64 * 1024, budgets.write_buffer))
        self.bucket = Bucket(budgets.messages_per_second, budgets.message_burst,
                             time.monotonic())
        if self.key not in self.server.gate:        # cut while its handshake finished
            transport.abort()
            return
        self.server.gate.update(self.key, lambda: self.close("login-crowded",
                                                             "too many connections waiting "
                                                             "to log in from this address"))
        self._arm(self.server.auth_timeout, "auth-timeout")

    def pause_writing(self) -> None:
        """The device does not read what we send: stop reading what it
        sends (its requests are what would make us write more)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _arm(self, seconds: float, code: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(
            seconds, self.close, code, f"nothing heard for {seconds:g} s")

    def write(self, msg: wire.Message) -> None:
        """Send ``msg`` if the device can hear it: a version-1 device is not
        told what version 2 added (PeerLeft)."""
        if self.transport is not None and not self.transport.is_closing() \
                and self.machine.state is State.READY and msg.SINCE <= self.machine.version:
            if self.transport.get_write_buffer_size() > self.server.budgets.write_buffer:
                return self.close("slow-reader", f"more than {self.server.budgets.write_buffer} "
                                                 "bytes waiting for the device to read them")
            self.transport.write(self.machine.send(msg))

    def close(self, code: str, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(self.machine.error(code, reason))   # every close says why
        event("closed", device=self.name or self.machine.name, addr=self.peer, code=code,
              reason=reason)
        self.transport.close()
        # a device that does not read would hold the flush (and its buffers)
        # forever; one that never logged in gets only a moment
        grace = 2.0 if self.name is not None else 0.25
        asyncio.get_running_loop().call_later(grace, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.machine.receive_data(data)
        while True:
            try:
                msg = self.machine.next_event()
            except ProtocolViolation as exc:
                if exc.code == "auth-failed":
                    self.server.metrics.auth_failures += 1
                    event("auth-failed", device=self.machine.name, addr=self.peer)
                else:
                    self.server.metrics.protocol_errors += 1
                return self.close(exc.code, str(exc))
            except RemoteProtocolError as exc:
                self.server.metrics.protocol_errors += 1
                return self.close(getattr(exc, "code", "protocol-error"), str(exc))
            if msg is NEED_DATA or msg is CLOSED:
                return
            if not self.bucket.take(time.monotonic()):
                budgets = self.server.budgets
                return self.close("rate-limited",
                                  f"more than {budgets.messages_per_second:g} messages a second "
                                  f"(bursts of {budgets.message_burst})")
            self._dispatch(msg)
            if self.transport.is_closing():
                return

    def _dispatch(self, msg: wire.Message) -> None:
        srv = self.server
        if isinstance(msg, wire.Hello):
            # (an unknown name costs what a known one does: keystore.lookup, Connection)
            record = srv.keystore.lookup(msg.name)
            self.generation = record.generation if record is not None else None
            self.transport.write(self.machine.challenge(record.key if record is not None else None,
                                                        srv.random))
            self._challenged = time.monotonic()
        elif isinstance(msg, wire.AuthResponse):        # verified by the machine
            why = stale(srv.keystore, self.machine.name, self.generation)
            if why is not None:         # disabled (or removed, re-keyed since its Hello)
                return self.close(why, REFUSALS[why])
            self.rtt = time.monotonic() - self._challenged
            self.name = self.machine.name
            fam = family(self.peer[0])
            if fam == 6 and self.machine.version < wire.IP_SINCE:
                return self.close("protocol-too-old", f"a login over IPv6 needs protocol "
                                                      f"version {wire.IP_SINCE} or later")
            self.seen = {fam: self.peer[0]}
            if self.machine.version >= wire.IP_SINCE:
                self.probe_token = srv.issue_probe_token(self)
            self.transport.write(self.machine.accept(
                self.peer[0], self.peer[1], srv.heartbeat, srv.node, srv.relay_port or None,
                srv.probe_port2 or None, srv.keepalive, probe_token=self.probe_token,
                alt_addr=srv.alt_addr_for(fam)))
            self._arm(3 * srv.heartbeat, "dead-peer")
            srv.gate.leave(self.key)
            srv.online(self)
        elif isinstance(msg, wire.Heartbeat):
            self._arm(3 * srv.heartbeat, "dead-peer")
            self.write(wire.HeartbeatAck(msg.seq))
        elif isinstance(msg, wire.RendezvousRequest):
            srv.spawn(srv.request(self, msg))
        elif isinstance(msg, wire.RendezvousAnswer):
            srv.spawn(srv.answer(self, msg))
        elif isinstance(msg, wire.Abandon):
            srv.spawn(srv.abandon(self, msg))

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        srv = self.server
        srv.gate.leave(self.key)
        if self.in_flight:             # what this connection asked for ends with it
            for pending in [p for p in srv.pending.values() if p.session is self]:
                srv._finish(pending)
        if self.offers_pending:        # offers it will never answer: their origins wait again,
            newer = srv.sessions.get(self.name)     # or offer at once to B's newer connection
            again = srv.node if newer is not None and newer is not self else None
            for oid in [oid for oid, offer in srv.offers.items() if offer.session is self]:
                offer = srv._drop_offer(oid)
                srv.spawn(srv.deliver(offer.origin, {"op": "gone", "pid": offer.pid,
                                                     "name": offer.b, "again": again}))
        if self.name is not None:
            self.server.offline(self)
