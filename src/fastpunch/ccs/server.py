"""The CCS server: TLS device connections (each a DeviceSession,
fastpunch.ccs.session), authentication, presence,
reflexive addresses, rendezvous (across nodes through the registry), relay
tickets and metrics. asyncio (uvloop in production) around the sans-IO
machine of fastpunch.proto.connection.

A rendezvous, A asking for B, as node-to-node ops (the same code path when
both devices sit on this node; the registry carries them otherwise):

    A's node ("origin")                      B's node
    request: ACL, Pending, locate(B) ---offer--->  RendezvousOffer(oid) to B
                                     <--answer---  B's RendezvousAnswer(oid)
    key, plan, start time, relay tickets
    RendezvousReady to A             ---ready--->  RendezvousReady(oid) to B

A device may announce its next-connection info ahead of any offer (a
RendezvousAnswer with request 0, "standing" info): then B's node answers the
next offer for it at once and B learns of the rendezvous from its Ready
(request 0), one CCS round trip sooner. Each standing info serves one offer;
the device announces a fresh one after.

If B is connected nowhere, the origin parks the request; when B comes online
(on any node: an "online" broadcast) the offer goes out; after
``rendezvous_timeout`` A is refused with "peer-offline".
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastpunch import _loop, liveness
from fastpunch._addr import family, source_key, unmap
from fastpunch.ccs.budget import Budgets, Gate
from fastpunch.ccs.events import event
from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.lifecycle import Watcher
from fastpunch.ccs.registry import MemoryRegistry
from fastpunch.ccs.relay import Relay, listen
from fastpunch.ccs.session import DeviceSession
from fastpunch.proto import wire
from fastpunch.proto import candidates as cands
from fastpunch.proto.kinds import RelayFirst
from fastpunch.proto.plan import plan as make_plan
from fastpunch.proto.plan import relay_first_helps
from fastpunch.proto.wire import STANDING

log = logging.getLogger("fastpunch.ccs")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
START_RTT_SHARE = 0.5  # of the farther device's round trip: its Ready's way there
START_SETUP_MS = 5     # and time to set up (sockets, nftables) once it is there
SPOOF_ASSIST_SECONDS = 20.0     # covers every slot of a plan (planner.BUDGET)
MAX_SPOOF_ASSISTS = 256         # at once; past that spoof goes unassisted (plans order it late)
SEEN_PORTS = 4                  # per family, a device's last token-probe ports kept
ACTIVE_SECONDS = 60.0           # a rendezvous is watched for its sides leaving this long
                                # (every slot of a plan, and the relay's join timeout)


@dataclass
class Pending:
    """A rendezvous on its origin node (where A is)."""
    id: int
    a: str
    a_request: int
    a_info: wire.NextInfo
    b: str
    started: float
    session: Optional["DeviceSession"] = None   # A's connection that asked (not a later one)
    timer: Optional[asyncio.TimerHandle] = None
    relay_first: RelayFirst = RelayFirst.NO     # what A asked (version 4)


@dataclass
class Offer:
    """A rendezvous offered to B (on B's node), until B answers it."""
    origin: str
    pid: int
    a: str
    b: str
    expires: float
    session: "DeviceSession"        # the connection it went to (not a later one of B's)


@dataclass
class Metrics:
    auth_failures: int = 0
    rendezvous_ok: int = 0
    rendezvous_refused: dict = field(default_factory=dict)
    latency_buckets: list = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    protocol_errors: int = 0

    def refused(self, code: str) -> None:
        self.rendezvous_refused[code] = self.rendezvous_refused.get(code, 0) + 1

    def observe(self, seconds: float) -> None:
        self.rendezvous_ok += 1
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1


class CCSServer:
    def __init__(self, keystore: KeyStore, ssl_context, *, registry=None,
                 relay: Optional[Relay] = None, public_addr: Optional[str] = None,
                 public_addr6: Optional[str] = None,
                 heartbeat: int = 15, rendezvous_timeout: float = 30.0,
                 auth_timeout: float = 10.0, start_delay_ms: int = 250,
                 random: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.time,
                 cluster_key: Optional[bytes] = None, spoof_assist: bool = True,
                 budgets: Optional[Budgets] = None, watch_keystore: bool = True,
                 keepalive: Optional[int] = None) -> None:
        self.keystore = keystore
        self.ssl_context = ssl_context
        self.registry = registry if registry is not None else MemoryRegistry()
        if self.registry.shared and (cluster_key is None or len(cluster_key) != 32):
            raise ValueError("several nodes need a 32-byte cluster key: session keys cross "
                             "the registry sealed with it")
        self._seal = None
        if cluster_key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._seal = AESGCM(cluster_key)
        self.node = self.registry.node
        self.relay = relay if relay is not None else Relay(log=event)
        # where devices reach this node's relay and probes, per family (start()
        # fills a family from the listener's own address when it is not a wildcard)
        self.public_addr, self.public_addr6 = public_addr, public_addr6
        self.public: dict = {}
        self._probe_tokens: dict = {}          # probe token -> DeviceSession
        self.relay.on_whoami = self._whoami_seen
        self.relay_port = 0
        self.heartbeat = heartbeat
        # the keepalive period devices are told to keep their peer streams
        # alive with (AuthOk, protocol 3), also on this node's relay legs;
        # None: the relay's own setting (liveness.DEFAULT unless the Relay
        # given says otherwise), advertised as it is
        if keepalive is not None:
            self.relay.keepalive = liveness.Keepalive(keepalive)
        self.keepalive = self.relay.keepalive.period if self.relay.keepalive else None
        self.rendezvous_timeout = rendezvous_timeout
        self.auth_timeout = auth_timeout
        self.start_delay_ms = start_delay_ms
        self.random = random
        self.clock = clock
        self.sessions: dict[str, DeviceSession] = {}
        self.pending: dict[int, Pending] = {}             # origin side
        # B side: oid -> Offer. Offer ids are random (a device guessing
        # another's cannot), checked against their owner before anything
        # changes, and dropped after rendezvous_timeout if never answered.
        self.offers: dict[int, Offer] = {}
        self._offer_expiry: collections.deque = collections.deque()   # (expires, oid)
        self.budgets = budgets if budgets is not None else Budgets()
        self.gate = Gate(self.budgets.preauth_per_source, self.budgets.preauth_total)
        self._listener: Optional[socket.socket] = None
        self._accepting: Optional[asyncio.Task] = None
        self._incoming = itertools.count(1)
        self.waiting: dict[str, list[int]] = {}           # offline peer -> pending ids
        self.metrics = Metrics()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self.spoof_assist = spoof_assist
        self._assists: set = set()                 # RST-suppression tables for spoof plans
        # rendezvous whose sides are punching: session -> {device here: (peer, its node)}
        self.active: dict = {}
        # device here -> its sessions in ``active``: a device leaving finds
        # its own without scanning every rendezvous of the last minute (at
        # 2,000 rendezvous/s that scan was 120,000 entries per disconnect)
        self._active_of: dict = {}
        self._active_expiry: collections.deque = collections.deque()
        self.probe_port2 = 0
        # follows the key store's audit log: disable/remove/rekey/deny take effect at once
        self.watch_keystore = watch_keystore
        self._watcher: Optional[Watcher] = None

    @property
    def connected(self) -> int:
        return len(self.sessions)

    @property
    def serving(self) -> bool:
        """The device listener is open and its accept loop running."""
        return self._listener is not None and self._listener.fileno() >= 0 and \
            self._accepting is not None and not self._accepting.done()

    async def start(self, host: str = "127.0.0.1", port: int = 0, relay_port: Optional[int] = 0,
                    probe_port: Optional[int] = 0):
        """Listen for devices (TLS) and, unless ``relay_port`` is None, for
        relay connections (which also answer address probes), and unless
        ``probe_port`` is None a second port answering address probes
        (natcheck tells a mapping that depends on the destination port by
        it). Returns the device listener's (host, port)."""
        loop = asyncio.get_running_loop()
        await self.registry.start(self.handle, lambda name: name in self.sessions)
        self._listener = listen(host, port, backlog=4096)
        self._accepting = loop.create_task(self._accept_loop())
        bound = self._listener.getsockname()[:2]
        self._housekeeping = loop.create_task(self._housekeep())
        for addr in (self.public_addr, self.public_addr6):
            if addr:
                self.public.setdefault(family(addr), unmap(addr))
        here = unmap(bound[0])
        if here not in ("0.0.0.0", "::"):
            self.public.setdefault(family(here), here)
        elif not self.public:
            self.public[family(here)] = here
        if self.public_addr is None:
            self.public_addr = self.public_for(4) or here
        if self._listener.family == socket.AF_INET6 and here == "::" and \
                self.public_for(4, exact=True) is None:
            event("config-warning", reason="listening on [::] with no public_addr: IPv4 "
                                           "devices would be given no relay address of "
                                           "their family")
        if self._listener.family == socket.AF_INET and 6 in self.public:
            # devices would probe and announce IPv6 toward a node that never hears it
            event("config-warning", reason=f"public_addr6 {self.public[6]} given, but this "
                                           f"node listens on IPv4 only ({bound[0]}): listen "
                                           "on [::] to serve IPv6")
            del self.public[6]
        if relay_port is not None:
            self.relay_port = await self.relay.start(host, relay_port)
            if probe_port is not None:
                self.probe_port2 = await self.relay.start_probe(host, probe_port)
        event("listening", node=self.node, addr=bound, relay_port=self.relay_port,
              probe_port=self.probe_port2)
        if self.watch_keystore:
            self._watcher = Watcher(self.keystore, self)
            self._watcher.start()
        return bound

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        await _loop.cancel(self._accepting, getattr(self, "_housekeeping", None))
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            for session in list(self.sessions.values()):
                session.transport.abort()
            for key in list(self.gate._all):      # handshakes and logins under way
                self.gate._evict(key)
        for pending in list(self.pending.values()):
            self._finish(pending)
        for task in list(self._tasks):
            task.cancel()
        for table in list(self._assists):
            self._unassist(table)
        await self.relay.close()
        await self.registry.close()

    # -- accepting: TLS handshakes and logins are bounded in time and number ------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._listener)
            except OSError as exc:          # EMFILE, ENOBUFS...: say so, go on
                event("accept-error", reason=str(exc))
                await asyncio.sleep(0.05)
                continue
            key = next(self._incoming)
            handed = []          # [True] once the socket is the TLS transport's to close
            task = loop.create_task(self._handshake(conn, key, handed))

            def cut(conn=conn, task=task, handed=handed) -> None:
                task.cancel()
                if not handed:           # cut before its task ran: the socket is ours
                    conn.close()
            self.gate.admit(key, source_key(addr[0]), cut)

    async def _handshake(self, conn: socket.socket, key: int, handed: list) -> None:
        """TLS on an accepted socket within ``handshake_timeout``; the
        session then has ``auth_timeout`` to log in. Until it has, it is in
        the gate, which cuts the oldest such connection of a source (or of
        all) past its cap. From the call on, the socket is the transport's:
        asyncio closes it on a failure or a cancellation (closing it here as
        well would free its number while the transport's shutdown still
        watches it, and the next accepted socket would inherit that)."""
        loop = asyncio.get_running_loop()
        handed.append(True)
        try:
            await loop.connect_accepted_socket(
                lambda: DeviceSession(self, key), conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.budgets.handshake_timeout, ssl_shutdown_timeout=2.0)
        except asyncio.CancelledError:
            self.gate.leave(key)
        except Exception as exc:          # ssl.SSLError, timeouts, resets: logged
            self.gate.leave(key)
            event("handshake-failed", reason=str(exc) or type(exc).__name__)

    async def _housekeep(self) -> None:
        """Drop what nobody will come back for: offers never answered."""
        while True:
            await asyncio.sleep(1.0)
            self._expire_offers(time.monotonic())

    def _expire_offers(self, now: float) -> None:
        while self._offer_expiry and self._offer_expiry[0][0] <= now:
            _, oid = self._offer_expiry.popleft()
            offer = self.offers.get(oid)
            if offer is not None and offer.expires <= now:
                self._drop_offer(oid, expired=True)

    def _drop_offer(self, oid: int, expired: bool = False) -> Optional[Offer]:
        offer = self.offers.pop(oid, None)
        if offer is None:
            return None
        b = offer.session
        b.offers_from[offer.a] -= 1
        if not b.offers_from[offer.a]:
            del b.offers_from[offer.a]
        b.offers_pending -= 1
        if expired:
            b.expired.append(oid)
        return offer

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ccs task failed", exc_info=task.exception())

    # -- presence ----------------------------------------------------------------------
    def online(self, session: "DeviceSession") -> None:
        old = self.sessions.get(session.name)
        if old is not None and old is not session:
            old.close("replaced", "the device connected again")
        self.sessions[session.name] = session
        event("online", device=session.name, addr=session.peer, node=self.node)
        self.spawn(self._announce(session.name))

    async def _announce(self, name: str) -> None:
        await self.registry.online(name)
        if self.registry.shared:
            await self.registry.broadcast({"op": "online", "name": name, "node": self.node})
        else:
            await self._peer_online(name, self.node)

    def public_for(self, fam: int, exact: bool = False) -> Optional[str]:
        """This node's address in family ``fam`` (4 or 6); without one, the
        other family's unless ``exact``."""
        addr = self.public.get(fam)
        if addr is None and not exact:
            addr = next(iter(self.public.values()), None)
        return addr

    def relay_addr_for(self, fam: int, version: int) -> str:
        """The relay address to give a device that logged in over ``fam``
        and speaks ``version``: its own family's, else the other family's
        only where the device's protocol carries it (an IPv6 one would make
        the encoder refuse the whole Ready for a version-4 device)."""
        addr = self.public_for(fam, exact=True)
        if addr is None:
            other = self.public_for(10 - fam, exact=True)
            if other is not None and (family(other) == 4 or version >= wire.IP_SINCE):
                addr = other
        return addr if addr is not None else self.public_addr or "0.0.0.0"

    def alt_addr_for(self, fam: int) -> Optional[str]:
        """AuthOk's ``alt_addr``: the node's address in the other family,
        never a wildcard (a [::] listener with no --public-addr6)."""
        addr = self.public_for(10 - fam, exact=True)
        return None if addr in (None, "0.0.0.0", "::") else addr

    def issue_probe_token(self, session: "DeviceSession") -> bytes:
        """A fresh probe token for ``session`` (AuthOk, protocol 5)."""
        if session.probe_token is not None:
            self._probe_tokens.pop(session.probe_token, None)
        token = self.random(wire.PROBE_TOKEN)
        self._probe_tokens[token] = session
        return token

    def _whoami_seen(self, token: bytes, ip: str, port: int = 0) -> None:
        """A "who am I" probe came from ``ip``:``port`` with a device's
        token: the device, by a TCP connection of its own (no spoofed source
        completes one), is at ``ip`` in that family and punches from that
        port (its gathering probes from the very port). Its login's family
        keeps the login's address."""
        session = self._probe_tokens.get(token)
        if session is None or session.transport is None or session.transport.is_closing():
            return
        fam = family(ip)
        if port:
            ports = session.seen_ports.setdefault(fam, collections.deque(maxlen=SEEN_PORTS))
            if port not in ports:
                ports.append(port)
        if fam != family(session.peer[0]) and session.seen.get(fam) != ip:
            session.seen[fam] = ip
            event("seen", device=session.name, addr=ip)

    def offline(self, session: "DeviceSession") -> None:
        if session.probe_token is not None:
            self._probe_tokens.pop(session.probe_token, None)
        name = session.name
        if self.sessions.get(name) is not session:
            return
        del self.sessions[name]
        event("offline", device=name, node=self.node)
        self.spawn(self.registry.offline(name))
        self.spawn(self._left(name, "peer-offline", f"{name} disconnected from the CCS"))

    # -- rendezvous whose sides are punching --------------------------------------------
    def _track(self, session: int, device: str, peer: str, peer_node: str) -> None:
        now = time.monotonic()
        while self._active_expiry and self._active_expiry[0][0] < now:
            _, old = self._active_expiry.popleft()
            for gone in list(self.active.get(old, ())):
                self._untrack(old, gone)
        self.active.setdefault(session, {})[device] = (peer, peer_node)
        self._active_of.setdefault(device, set()).add(session)
        self._active_expiry.append((now + ACTIVE_SECONDS, session))

    def _untrack(self, session: int, device: str):
        """Forget ``device``'s side of ``session``: its (peer, peer's node), or None."""
        sides = self.active.get(session)
        if not sides or device not in sides:
            return None
        side = sides.pop(device)
        if not sides:
            del self.active[session]
        mine = self._active_of.get(device)
        if mine is not None:
            mine.discard(session)
            if not mine:
                del self._active_of[device]
        return side

    async def _left(self, device: str, code: str, reason: str,
                    session: Optional[int] = None) -> None:
        """``device`` (of this node) is gone from its rendezvous (all, or
        ``session``): tell each peer, wherever it is, so it stops punching
        and does not wait at the relay."""
        for sid in ([session] if session is not None else list(self._active_of.get(device, ()))):
            side = self._untrack(sid, device)
            if side is None:
                continue
            peer, peer_node = side
            event("peer-left", session=sid, device=device, peer=peer, code=code)
            try:          # one peer's node failing must not leave the others untold
                await self.deliver(peer_node, {"op": "peer-left", "session": sid, "to": peer,
                                               "peer": device, "code": code, "reason": reason})
            except Exception as exc:
                event("peer-left-error", session=sid, peer=peer, reason=repr(exc))

    def _peer_left(self, msg: dict) -> None:
        if self._untrack(msg["session"], msg["to"]) is None:
            return
        session = self.sessions.get(msg["to"])
        if session is not None:
            session.write(wire.PeerLeft(msg["session"], wire.fit(msg["peer"], wire.NAME),
                                        wire.fit(msg["code"], wire.CODE), wire.fit(msg["reason"])))

    async def abandon(self, session: "DeviceSession", msg: wire.Abandon) -> None:
        """A device gave a rendezvous up; only its own (ids are checked
        against their owner before anything changes)."""
        sides = self.active.get(msg.session)
        if not sides or session.name not in sides:
            return
        await self._left(session.name, "peer-abandoned", f"{session.name} gave up: "
                                                          f"{msg.code}: {msg.reason}",
                         msg.session)

    # -- node-to-node ops ---------------------------------------------------------------
    async def deliver(self, node: str, msg: dict) -> bool:
        if node == self.node:
            await self.handle(msg)
            return True
        return await self.registry.send(node, msg)

    async def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "offer":
            session = self.sessions.get(msg["b"])
            if session is None:
                await self.deliver(msg["origin"], {"op": "gone", "pid": msg["pid"], "name": msg["b"]})
                return
            if session.standing is not None:
                # B told us its next-connection info ahead of time: answer for
                # it now, one CCS round trip sooner; its Ready says request 0
                info, session.standing = session.standing, None
                await self.deliver(msg["origin"], {
                    "op": "answer", "pid": msg["pid"], "oid": STANDING, "b": msg["b"],
                    "node": self.node, "addr": session.peer[0], "rtt": session.rtt,
                    "seen": _seen_json(session), "ports": _ports_json(session),
                    "version": session.machine.version,
                    "info": info.to_json()})
                return
            budgets = self.budgets
            if session.offers_pending >= budgets.offers_pending or \
                    session.offers_from.get(msg["a"], 0) >= budgets.offers_per_pair:
                # B has enough unanswered offers (from A, or from everyone):
                # A hears so at once, and B's other peers are not crowded out
                await self.deliver(msg["origin"], {
                    "op": "busy", "pid": msg["pid"],
                    "reason": f"{msg['b']} has {session.offers_pending} offers unanswered"})
                return
            oid = secrets.randbits(32)
            while not oid or oid in self.offers:
                oid = secrets.randbits(32)
            expires = time.monotonic() + self.rendezvous_timeout
            self.offers[oid] = Offer(msg["origin"], msg["pid"], msg["a"], msg["b"], expires,
                                     session)
            self._offer_expiry.append((expires, oid))
            session.offers_pending += 1
            session.offers_from[msg["a"]] = session.offers_from.get(msg["a"], 0) + 1
            session.write(wire.RendezvousOffer(oid, msg["a"]))
        elif op == "answer":
            await self._complete(msg)
        elif op == "ready":
            session = self.sessions.get(msg["b"])
            sid = msg["fields"].get("session")
            if session is None and sid is not None:
                # B left between its answer and its Ready: A, already Ready,
                # must not punch on and wait at the relay for nobody
                await self.deliver(msg["origin"], {
                    "op": "peer-left", "session": sid, "to": msg["fields"]["peer"],
                    "peer": msg["b"], "code": "peer-gone",
                    "reason": f"{msg['b']} left before its Ready"})
            if session is not None:
                fields = dict(msg["fields"])
                fields["key"] = self._open_key(fields["key"], msg["b"])
                fields["relay_token"] = bytes.fromhex(fields["relay_token"])
                fields["plan"] = tuple(fields["plan"])
                info = wire.NextInfo.from_json(fields.pop("info"))
                if fields.get("session") is not None:
                    self._track(fields["session"], msg["b"], fields["peer"], msg["origin"])
                session.write(wire.RendezvousReady(**fields, **info.fields()))
        elif op == "refuse":
            session = self.sessions.get(msg["b"])
            if session is not None:
                self._refuse(session, msg["oid"], msg["code"], msg["reason"])
        elif op == "busy":
            pending = self.pending.get(msg["pid"])
            if pending is not None:
                self._finish(pending)
                a = self._asker(pending)
                if a is not None:
                    self._refuse(a, pending.a_request, msg.get("code", "peer-busy"),
                                 msg["reason"])
        elif op == "gone":
            pending = self.pending.get(msg["pid"])
            if pending is not None and msg.get("again"):
                # B's old connection went, a newer one of B's is on that node: offer there
                await self._offer(pending, msg["again"])
            elif pending is not None:      # B left before answering: wait for it again
                self.waiting.setdefault(pending.b, []).append(pending.id)
        elif op == "online":
            await self._peer_online(msg["name"], msg["node"])
        elif op == "peer-left":
            self._peer_left(msg)
        else:
            event("registry-unknown-op", op=op)

    async def _peer_online(self, name: str, node: str) -> None:
        for pid in self.waiting.pop(name, []):
            pending = self.pending.get(pid)
            if pending is not None:
                await self._offer(pending, node)

    async def _offer(self, pending: Pending, node: str) -> None:
        sent = await self.deliver(node, {"op": "offer", "origin": self.node, "pid": pending.id,
                                         "a": pending.a, "b": pending.b})
        if not sent and pending.id in self.pending:    # (not if it ended while we sent)
            self.waiting.setdefault(pending.b, []).append(pending.id)

    def _asker(self, pending: Pending) -> Optional["DeviceSession"]:
        """The connection that asked for ``pending``, if it is still A's."""
        a = pending.session
        return a if a is not None and self.sessions.get(pending.a) is a else None

    # -- rendezvous ----------------------------------------------------------------------
    def _refuse(self, session, request: int, code: str, reason: str) -> None:
        self.metrics.refused(code)
        event("rendezvous-refused", device=session.name, request=request, code=code, reason=reason)
        session.write(wire.RendezvousRefused(request, wire.fit(code, wire.CODE), wire.fit(reason)))

    def _finish(self, pending: Pending) -> None:
        if self.pending.pop(pending.id, None) is not None and pending.session is not None:
            pending.session.in_flight -= 1
        if pending.timer is not None:
            pending.timer.cancel()
        waiting = self.waiting.get(pending.b)
        if waiting and pending.id in waiting:
            waiting.remove(pending.id)
            if not waiting:
                del self.waiting[pending.b]

    async def request(self, session: "DeviceSession", msg: wire.RendezvousRequest) -> None:
        if msg.peer == session.name:
            return self._refuse(session, msg.request, "self", "a device cannot rendezvous with itself")
        if not self.keystore.may_reach(session.name, msg.peer):
            return self._refuse(session, msg.request, "not-authorized",
                                f"{session.name} may not reach {msg.peer}")
        if not 0 < msg.port < 65536:
            return self._refuse(session, msg.request, "bad-info",
                                f"port {msg.port} is not a port a peer can aim at")
        try:
            relay_first = RelayFirst(msg.relay_first or "no")
        except ValueError:
            return self._refuse(session, msg.request, "bad-info",
                                f"relay_first {msg.relay_first!r} is not one of "
                                f"{', '.join(k.value for k in RelayFirst)}")
        if session.in_flight >= self.budgets.rendezvous_in_flight:
            return self._refuse(session, msg.request, "too-many-rendezvous",
                                f"{session.name} has {session.in_flight} rendezvous under way "
                                f"(at most {self.budgets.rendezvous_in_flight})")
        pending = Pending(next(self._ids), session.name, msg.request, wire.next_info_of(msg),
                          msg.peer, time.monotonic(), session,
                          relay_first=relay_first)
        self.pending[pending.id] = pending
        session.in_flight += 1
        pending.timer = asyncio.get_running_loop().call_later(
            self.rendezvous_timeout, self._timeout, pending.id)
        node = self.node if msg.peer in self.sessions else await self.registry.locate(msg.peer)
        if pending.id not in self.pending:           # A left (or was cut) while we looked
            return
        if node is None:
            self.waiting.setdefault(msg.peer, []).append(pending.id)
            event("rendezvous-waiting", device=session.name, peer=msg.peer)
        else:
            await self._offer(pending, node)

    def _timeout(self, pid: int) -> None:
        pending = self.pending.get(pid)
        if pending is None:
            return
        self._finish(pending)
        a = self._asker(pending)
        if a is not None:
            self._refuse(a, pending.a_request, "peer-offline",
                         f"{pending.b} did not answer within {self.rendezvous_timeout:g} s")

    async def answer(self, session: "DeviceSession", msg: wire.RendezvousAnswer) -> None:
        if msg.request == STANDING:         # info for the next offer, ahead of time
            if not 0 < msg.port < 65536:
                return session.close("bad-info", f"port {msg.port} is not a port a peer "
                                                 "can aim at")
            session.standing = wire.next_info_of(msg)
            return
        offer = self.offers.get(msg.request)
        if offer is None or offer.session is not session:   # the owner first: nothing changes
            if msg.request in session.expired:           # ours, answered too late
                event("late-answer", device=session.name, request=msg.request)
                return
            session.close("unknown-request", f"no rendezvous {msg.request} is offered to you")
            return
        self._drop_offer(msg.request)
        if not 0 < msg.port < 65536:
            event("bad-answer", device=session.name, request=msg.request, port=msg.port)
            await self.deliver(offer.origin, {
                "op": "busy", "pid": offer.pid, "code": "peer-bad-info",
                "reason": f"{offer.b} announced port {msg.port}, which no peer can aim at"})
            return
        await self.deliver(offer.origin, {"op": "answer", "pid": offer.pid, "oid": msg.request,
                                          "b": offer.b, "node": self.node,
                                          "addr": session.peer[0], "rtt": session.rtt,
                                          "seen": _seen_json(session),
                                          "ports": _ports_json(session),
                                          "version": session.machine.version,
                                          "info": wire.next_info_of(msg).to_json()})

    # -- device lifecycle (the key store's watcher calls these) -------------------------
    def revoke(self, name: str, code: str, reason: str) -> None:
        """``name`` was removed, disabled or re-keyed: cut its session here
        (with an Error saying why), void its relay tickets and cut its
        relays, drop the rendezvous it asked for or was offered, and tell
        the peers it was punching with. Idempotent."""
        event("revoked", device=name, code=code, reason=reason, node=self.node)
        self.relay.revoke(name)
        for pending in [p for p in self.pending.values() if p.a == name or p.b == name]:
            self._finish(pending)
            if pending.b == name:
                a = self._asker(pending)
                if a is not None:
                    self._refuse(a, pending.a_request, code, f"{name}: {reason}")
        session = self.sessions.get(name)
        if session is not None:
            session.close(code, reason)      # offline() follows: offers, presence
        self.spawn(self._left(name, code, reason))

    def deny(self, a: str, b: str) -> None:
        """``a`` and ``b`` may no longer meet: what is under way between
        them stops (requests are checked against the ACL as they come)."""
        event("denied", a=a, b=b, node=self.node)
        pair = {a, b}
        self.relay.revoke_pair(a, b)
        for pending in [p for p in self.pending.values() if {p.a, p.b} == pair]:
            self._finish(pending)
            session = self._asker(pending)
            if session is not None:
                self._refuse(session, pending.a_request, "not-authorized",
                             f"{pending.a} may no longer reach {pending.b}")
        for oid, offer in list(self.offers.items()):
            if {offer.a, offer.b} == pair:
                self._drop_offer(oid, expired=True)    # B's answer to it is then not a crime
                self.spawn(self.deliver(offer.origin, {
                    "op": "busy", "pid": offer.pid, "code": "not-authorized",
                    "reason": f"{offer.a} may no longer reach {offer.b}"}))
        for sid, sides in list(self.active.items()):
            for device, (peer, _) in list(sides.items()):
                if {device, peer} == pair:
                    self.spawn(self._left(device, "not-authorized",
                                          f"{device} and {peer} may no longer meet", sid))

    def _seal_key(self, key: bytes, device: str) -> str:
        """A session key for another node: AES-GCM under the cluster key,
        bound to the device it is for (in the clear only on one node)."""
        if self._seal is None:
            return key.hex()
        nonce = self.random(12)
        return (nonce + self._seal.encrypt(nonce, key, device.encode())).hex()

    def _open_key(self, text: str, device: str) -> bytes:
        blob = bytes.fromhex(text)
        if self._seal is None:
            return blob
        return self._seal.decrypt(blob[:12], blob[12:], device.encode())

    def _assist_spoof(self, sides, starts_in: float) -> None:
        """The ``spoof`` strategy's first SYNs go from each device to this
        address at the other's port, to open their own firewalls. They
        should expire on the way; where this node is near enough to receive
        them, its kernel would answer each with a RST that closes the very
        entry the SYN opened. Drop those RSTs for the plan's length (needs
        CAP_NET_ADMIN and nftables here; without them spoof works only where
        the SYNs expire first)."""
        from fastpunch import netfilter

        if not self.spoof_assist:
            return
        if len(self._assists) >= MAX_SPOOF_ASSISTS:     # a table each, kept for a plan's length
            event("spoof-assist-busy", tables=len(self._assists))
            return
        (a_addr, a_port), (b_addr, b_port) = sides
        try:
            table = netfilter.suppress_rsts([
                netfilter.RstSuppression(b_port, a_addr, a_port, exempt_mark=None),
                netfilter.RstSuppression(a_port, b_addr, b_port, exempt_mark=None)])
            table.apply()
        except Exception as exc:        # no privilege, no nftables: say so once
            self.spoof_assist = False
            event("spoof-assist-off", reason=str(exc))
            return
        self._assists.add(table)
        asyncio.get_running_loop().call_later(max(0.0, starts_in) + SPOOF_ASSIST_SECONDS,
                                              self._unassist, table)

    def _unassist(self, table) -> None:
        if table in self._assists:
            self._assists.discard(table)
            try:
                table.remove()
            except Exception as exc:
                event("spoof-assist-error", reason=str(exc))

    def _own_addresses(self) -> set:
        """Addresses of the CCS itself, which no candidate may carry."""
        own = set(self.public.values())
        if self.public_addr:
            own.add(self.public_addr)
        if self._listener is not None:
            addr = unmap(self._listener.getsockname()[0])
            if addr not in ("0.0.0.0", "::"):
                own.add(addr)
        return own

    def _screen(self, a: str, a_addr: str, a_seen: dict, a_info: wire.NextInfo, b: str,
                b_addr: str, b_seen: dict, b_info: wire.NextInfo,
                a_ports: Optional[dict] = None, b_ports: Optional[dict] = None) -> tuple:
        """Both sides' info as the other may see it, and whether they share
        a LAN: candidates aimed at anyone but the device itself dropped
        (``candidates.sanitize``), and LAN addresses given to the peer only
        when they can serve it (the two behind one public address, or on one
        LAN by their prefixes): a LAN address is none of a stranger's
        business (a global IPv6 address is not a LAN address)."""
        out = []
        kept = {}
        for name, addr, seen, ports, info in ((a, a_addr, a_seen, a_ports, a_info),
                                              (b, b_addr, b_seen, b_ports, b_info)):
            good, dropped = cands.sanitize(info.candidates or (), addr, self._own_addresses(),
                                           seen=seen.values(), ports=ports)
            for c, why in dropped:
                event("candidate-dropped", device=name, candidate=str(c), why=why)
            kept[name] = good
        # one gateway: the same public IPv4 address (IPv6 has no shared one)
        lan = a_seen.get(4, a_addr) == b_seen.get(4, b_addr) or \
            cands.same_lan(kept[a], kept[b])
        for name, info in ((a, a_info), (b, b_info)):
            if info.candidates is None:
                out.append(info)
                continue
            # (a global IPv6 host address is public, not a LAN's)
            c = kept[name] if lan else tuple(x for x in kept[name]
                                             if x.kind is not cands.CandidateKind.HOST
                                             or cands.public_v6(x.addr))
            out.append(wire.NextInfo(**{**info.fields(), "candidates": c}))
        has_host = any(c.kind is cands.CandidateKind.HOST for c in kept[a]) and \
            any(c.kind is cands.CandidateKind.HOST for c in kept[b])
        return out[0], out[1], lan and has_host

    def start_delay(self, *rtts) -> int:
        """Milliseconds from now to the common start: enough for the Ready
        to reach the farther device (half its round trip, measured during
        its login) and for both to set up; at most ``start_delay_ms``."""
        known = [r for r in rtts if r is not None]
        if not known:
            return self.start_delay_ms
        return int(min(self.start_delay_ms,
                       max(START_SETUP_MS, max(known) * 1000 * START_RTT_SHARE + START_SETUP_MS)))

    async def _complete(self, msg: dict) -> None:
        pending = self.pending.get(msg["pid"])
        a = self._asker(pending) if pending is not None else None
        if a is None:
            await self.deliver(msg["node"], {"op": "refuse", "b": msg["b"], "oid": msg["oid"],
                                             "code": "peer-gone",
                                             "reason": "the requesting device left"})
            if pending is not None:
                self._finish(pending)
            return
        self._finish(pending)
        b_info = wire.NextInfo.from_json(msg["info"])
        b_addr, b_version = msg["addr"], msg.get("version", 1)
        b_seen = _seen_of(msg.get("seen"), b_addr)
        fam_a, fam_b = family(a.peer[0]), family(b_addr)
        # each side is told the other's IPv4 address where there is one (what
        # every IPv4 strategy aims at, and compares with its own: one gateway),
        # else its address in the receiver's family, else its login's
        to_a = b_seen.get(4) or b_seen.get(fam_a, b_addr)
        to_b = a.seen.get(4) or a.seen.get(fam_b, a.peer[0])
        if (family(to_a) == 6 and a.machine.version < wire.IP_SINCE) or \
                (family(to_b) == 6 and b_version < wire.IP_SINCE):
            why = (f"{pending.a} and {pending.b} share no address family the older "
                   f"one's protocol version carries")
            self._refuse(a, pending.a_request, "no-common-family", why)
            await self.deliver(msg["node"], {"op": "refuse", "b": pending.b, "oid": msg["oid"],
                                             "code": "no-common-family", "reason": why})
            return
        a_info, b_info, lan = self._screen(pending.a, a.peer[0], a.seen, pending.a_info,
                                           pending.b, b_addr, b_seen, b_info,
                                           a.seen_ports, _ports_of(msg.get("ports")))
        key = self.random(32)
        legacy = a.machine.version < 2 or msg.get("version", 1) < 2
        v6 = cands.v6_path(a_info.candidates, b_info.candidates)
        steps = make_plan(a_info, b_info, legacy=legacy, lan=lan, v6=v6)
        session_id = int.from_bytes(self.random(8), "big") or 1
        start_at = int(self.clock() * 1000) + self.start_delay(a.rtt, msg.get("rtt"))
        if "spoof" in steps and fam_a == fam_b == 4:
            self._assist_spoof(((a.peer[0], pending.a_info.port), (b_addr, b_info.port)),
                               start_at / 1000 - self.clock())
        token_a, token_b = self.relay.issue(pending.a, pending.b)
        # relay-first only when B's protocol has it too (an older B would
        # punch its plan out and join the relay last, A waiting there)
        asked = pending.relay_first
        relay_first = msg.get("version", 1) >= 4 and (
            asked is RelayFirst.YES or
            (asked is RelayFirst.AUTO and relay_first_helps(a_info, b_info, lan=lan, v6=v6)))
        common = dict(key=key, plan=steps, start_at=start_at,
                      relay_port=self.relay_port, session=session_id,
                      relay_first=True if relay_first else None)
        self._track(session_id, pending.a, pending.b, msg["node"])
        # (local_addr is the device's own word, passed on unchecked: an
        # IPv6 one must not reach a device whose protocol cannot carry it)
        if a.machine.version < wire.IP_SINCE and b_info.local_addr and ":" in b_info.local_addr:
            b_info = wire.NextInfo(**{**b_info.fields(), "local_addr": None})
        if b_version < wire.IP_SINCE and a_info.local_addr and ":" in a_info.local_addr:
            a_info = wire.NextInfo(**{**a_info.fields(), "local_addr": None})
        a.write(wire.RendezvousReady(request=pending.a_request, peer=pending.b, addr=to_a,
                                     role="initiator", relay_token=token_a,
                                     relay_addr=self.relay_addr_for(fam_a, a.machine.version),
                                     **common, **b_info.fields()))
        b_fields = dict(request=msg["oid"], peer=pending.a, addr=to_b, role="responder",
                        relay_token=token_b.hex(),
                        relay_addr=self.relay_addr_for(fam_b, b_version), **common,
                        info=a_info.to_json())
        b_fields["key"] = self._seal_key(key, pending.b)
        await self.deliver(msg["node"], {"op": "ready", "b": pending.b, "fields": b_fields,
                                         "origin": self.node})
        elapsed = time.monotonic() - pending.started
        self.metrics.observe(elapsed)
        event("rendezvous", a=pending.a, b=pending.b, plan=steps, seconds=round(elapsed, 6))


def _seen_json(session: "DeviceSession") -> dict:
    """A session's per-family addresses for a message between nodes."""
    return {str(fam): addr for fam, addr in session.seen.items()}


def _ports_json(session: "DeviceSession") -> dict:
    return {str(fam): list(ports) for fam, ports in session.seen_ports.items()}


def _ports_of(data) -> dict:
    """The per-family probe ports of a peer on another node, checked."""
    out: dict = {}
    if isinstance(data, dict):
        for fam, ports in data.items():
            if fam in ("4", "6") and isinstance(ports, list):
                out[int(fam)] = [p for p in ports[:SEEN_PORTS]
                                 if isinstance(p, int) and 0 < p < 65536]
    return out


def _seen_of(data, login_addr: str) -> dict:
    """The per-family addresses of a peer on another node (``_seen_json``),
    checked: only addresses, each in its own family; its login address
    whatever the message says."""
    out = {}
    if isinstance(data, dict):
        for addr in data.values():
            try:
                out[family(addr)] = unmap(addr)
            except (TypeError, ValueError):
                continue
    out[family(login_addr)] = login_addr
    return out


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the production loop), else asyncio's own
    (logged: a CCS node should have it)."""
    from fastpunch import _loop

    loop = _loop.new_event_loop()
    if not type(loop).__module__.startswith("uvloop"):
        event("loop", uvloop=False)
    return loop
