"""The CCS relay: when nothing direct works, the CCS joins the two devices'
relay connections and moves their bytes with splice(2), socket -> pipe ->
socket inside the kernel, never through Python buffers.

Admission is by single-use tokens issued with a rendezvous (over the
authenticated TLS control connection), one per side:

    device -> relay   "FPR1" token[32]
    relay  -> device  status[1]     0 = joined (the peer is there), else a refusal

    device -> relay   "FPW1" pad[32]
    relay  -> device  ipv4[4] port[2]   the address and port this connection came from

    device -> relay   "FPF1" pad[32]
    relay  -> device  verdict[1]   the relay connect()s from another port of its
                      own address to the address and port this connection came
                      from: "O" it was let in, "R" answered with RST, "D" no
                      answer (dropped), "B" busy (too many probes at once)

A device that arrives first waits (bounded) for its peer. The relay port is
plain TCP on purpose: the stream is end to end encrypted with the session
key (which the relay never learns), and splice cannot see through TLS. A
stolen token can at worst take the slot; the secure channel's key
confirmation then fails and the devices retry.

Quotas: a global cap on concurrent relays, a per-device cap on concurrent
relays, and a per-device byte quota; a relay that exhausts its quota is
cut (both sockets shut down) and logged. Connections that have not said
who they are yet are capped per source address (the oldest cut past it),
filtering probes per source address and in all. Every way out of a join
(a side reset while it waits, a status that cannot be sent, the peer's
timeout, a revocation) releases the slot and both sockets.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastpunch import _loop, liveness
from fastpunch.ccs.budget import Gate
from fastpunch.liveness import Keepalive
from fastpunch._addr import source_key, unmap
from fastpunch.proto.probe import FILTERING, TOKEN, WHOAMI, reply_of

MAGIC = b"FPR1"
FILTER_PROBE_SECONDS = 1.0  # at most: a SYN unanswered this long was dropped
FILTER_PROBE_MIN = 0.25     # at least, whatever the round trip
MAX_FILTER_PROBES = 64    # at once; each holds two sockets for up to a second
PROBES_PER_SOURCE = 4     # of those, from one source address
HELLOS_PER_SOURCE = 64    # relay connections yet to send their hello, per source address
HELLOS_TOTAL = 4096
HELLO_SECONDS = 10.0
HELLO_BYTES = len(MAGIC) + 32
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031

JOINED, UNKNOWN_TOKEN, BUSY, DEVICE_BUSY, QUOTA, PEER_TIMEOUT, BAD_HELLO, PEER_GONE, \
    REVOKED = range(9)
STATUS_TEXT = {
    UNKNOWN_TOKEN: ("unknown-token", "the relay token is unknown, used or expired"),
    BUSY: ("relay-busy", "the CCS carries its maximum number of relays"),
    DEVICE_BUSY: ("device-busy", "this device has its maximum number of relays open"),
    QUOTA: ("quota", "this device has used its relay byte quota"),
    PEER_TIMEOUT: ("peer-timeout", "the peer did not join the relay in time"),
    BAD_HELLO: ("bad-hello", "the relay hello is malformed"),
    PEER_GONE: ("peer-gone", "the peer's relay connection closed before the join"),
    REVOKED: ("revoked", "this relay was cut by the CCS (a device was removed or denied)"),
}


@dataclass
class _Ticket:
    pair: int
    side: int
    device: str
    expires: float
    devices: tuple = ()            # both sides it was issued for


@dataclass
class _Pair:
    id: int
    devices: tuple
    socks: list = field(default_factory=lambda: [None, None])
    joined: Optional[asyncio.Future] = None
    bytes: int = 0
    running: bool = False           # both joined, the pumps own the sockets
    issued: tuple = ()              # the two devices the tickets were issued for
    unwatch: Callable[[], None] = lambda: None    # stop watching the waiting side


class Relay:
    def __init__(self, *, max_relays: int = 256, per_device: int = 4,
                 quota_bytes: Optional[int] = None, join_timeout: float = 30.0,
                 token_ttl: float = 120.0, log: Callable[..., None] = lambda kind, **kw: None,
                 random: Callable[[int], bytes] = os.urandom,
                 probes_per_source: int = PROBES_PER_SOURCE,
                 hellos_per_source: int = HELLOS_PER_SOURCE,
                 keepalive: Optional[Keepalive] = liveness.DEFAULT) -> None:
        self.max_relays, self.per_device, self.quota_bytes = max_relays, per_device, quota_bytes
        # on both legs of every relay: an idle relayed stream keeps its NAT
        # entries, and a leg whose device vanished ends the pair (its pump
        # gets ETIMEDOUT and shuts the other leg) instead of holding a slot
        self.keepalive = keepalive
        self.join_timeout, self.token_ttl = join_timeout, token_ttl
        self.log, self.random = log, random
        self.tickets: dict[bytes, _Ticket] = {}
        self._expiry: collections.deque = collections.deque()    # (expires, token), in order
        self.pairs: dict[int, _Pair] = {}
        self.active: dict[str, int] = {}         # device -> relays open
        self.used: dict[str, int] = {}           # device -> bytes relayed (quota)
        self.bytes_total = 0
        self.relays_total = 0
        self._lock = threading.Lock()
        self._next = 0
        self._listener: Optional[socket.socket] = None
        self._task: Optional[asyncio.Task] = None
        self._probe_listener: Optional[socket.socket] = None
        self._probe_task: Optional[asyncio.Task] = None
        self._threads: set[threading.Thread] = set()
        self._filter_probes = 0
        self.probes_per_source = probes_per_source
        self._probes_from: dict[str, int] = {}
        # (token, address, port): a "who am I" probe carried a device's probe token
        self.on_whoami: Optional[Callable[[bytes, str, int], None]] = None
        self._hellos = Gate(hellos_per_source, HELLOS_TOTAL)
        self._hello_keys = 0
        self._admits: set[asyncio.Task] = set()
        self._gone: dict[int, float] = {}        # pair -> until: a side left before the join

    # -- tickets (called by the control plane) ------------------------------------------
    def issue(self, a: str, b: str) -> tuple[bytes, bytes]:
        now = time.monotonic()
        # tickets expire in issue order (one TTL): drop the old ones from the
        # front, not by scanning them all on every rendezvous (the hot path)
        while self._expiry and self._expiry[0][0] < now:
            self.tickets.pop(self._expiry.popleft()[1], None)
        for pid, until in list(self._gone.items()):      # in insertion order: oldest first
            if until >= now:
                break
            del self._gone[pid]
        self._next += 1
        tokens = self.random(32), self.random(32)
        for side, (tok, dev) in enumerate(zip(tokens, (a, b))):
            self.tickets[tok] = _Ticket(self._next, side, dev, now + self.token_ttl, (a, b))
            self._expiry.append((now + self.token_ttl, tok))
        return tokens

    # -- serving --------------------------------------------------------------------------
    async def start(self, host: str, port: int = 0) -> int:
        self._listener = listen(host, port)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(self._listener))
        return self._listener.getsockname()[1]

    async def start_probe(self, host: str, port: int = 0) -> int:
        """A second port that answers "who am I" probes only: from one local
        port, a device probes both, and sees whether its gateway gives that
        port one external port for every destination or a new one each."""
        self._probe_listener = listen(host, port)
        self._probe_task = asyncio.get_running_loop().create_task(
            self._accept_loop(self._probe_listener, probes_only=True))
        return self._probe_listener.getsockname()[1]

    async def close(self) -> None:
        await _loop.cancel(self._task, self._probe_task)
        for listener in (self._listener, self._probe_listener):
            if listener is not None:
                listener.close()
        admits = list(self._admits)
        for task in admits:          # hellos, probes, sides waiting for their peer
            task.cancel()
        if admits:
            await asyncio.gather(*admits, return_exceptions=True)
        for pair in list(self.pairs.values()):
            for s in pair.socks:
                if s is not None:
                    _shutdown(s)
        for t in list(self._threads):
            t.join(timeout=5)

    async def _accept_loop(self, listener: socket.socket, probes_only: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:          # EMFILE...: say so, go on
                self.log("relay-accept-error", reason=str(exc))
                await asyncio.sleep(0.05)
                continue
            self._hello_keys += 1
            key = self._hello_keys
            task = loop.create_task(self._admit(conn, probes_only, key))
            self._admits.add(task)
            task.add_done_callback(self._admits.discard)
            self._hellos.admit(key, source_key(addr[0]), task.cancel)

    # -- revocation (a device removed, disabled or re-keyed; a pair denied) -----------
    def revoke(self, device: str) -> None:
        """Void ``device``'s tickets and cut every relay it is in."""
        self._void(lambda devices: device in devices)

    def revoke_pair(self, a: str, b: str) -> None:
        self._void(lambda devices: set(devices) == {a, b})

    def _void(self, match: Callable[[tuple], bool]) -> None:
        for tok, ticket in list(self.tickets.items()):
            if match(ticket.devices):
                del self.tickets[tok]
        for pair in list(self.pairs.values()):
            if not match(pair.issued):
                continue
            self.log("relay-revoked", pair=pair.id, devices=pair.issued)
            if pair.running:
                for sock in pair.socks:
                    if sock is not None:
                        _shutdown(sock)          # the pumps see EOF and release the pair
            elif pair.joined is not None and not pair.joined.done():
                pair.joined.set_result(REVOKED)  # the waiting side is told and released

    async def _admit(self, conn: socket.socket, probes_only: bool, key: int) -> None:
        try:
            await self._admit_one(conn, probes_only, key)
        except asyncio.CancelledError:
            conn.close()            # (cut, or the relay closing): the socket goes with it
            raise
        finally:
            self._hellos.leave(key)

    async def _admit_one(self, conn: socket.socket, probes_only: bool, key: int) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            hello = await asyncio.wait_for(_recv_exactly(loop, conn, HELLO_BYTES), HELLO_SECONDS)
        except (asyncio.TimeoutError, OSError):
            conn.close()        # silent (cut for a newer one from its address: _admit)
            return
        finally:
            self._hellos.leave(key)
        if len(hello) == HELLO_BYTES and hello.startswith(WHOAMI):
            return self._whoami(conn, hello[len(WHOAMI):len(WHOAMI) + TOKEN])
        if probes_only:
            return self._refuse(conn, BAD_HELLO, None)
        if len(hello) == HELLO_BYTES and hello.startswith(FILTERING):
            return await self._filtering(conn)
        if len(hello) != HELLO_BYTES or not hello.startswith(MAGIC):
            return self._refuse(conn, BAD_HELLO, None)
        ticket = self.tickets.pop(hello[len(MAGIC):], None)
        if ticket is None or ticket.expires < time.monotonic():
            return self._refuse(conn, UNKNOWN_TOKEN, None)
        if ticket.pair in self._gone:
            return self._refuse(conn, PEER_GONE, ticket.device)
        pair = self.pairs.get(ticket.pair)
        if pair is None:
            if len(self.pairs) >= self.max_relays:
                return self._refuse(conn, BUSY, ticket.device)
            pair = _Pair(ticket.pair, (None, None), issued=ticket.devices)
        refusal = None
        with self._lock:
            if self.active.get(ticket.device, 0) >= self.per_device:
                refusal = DEVICE_BUSY
            elif self.quota_bytes is not None and \
                    self.used.get(ticket.device, 0) >= self.quota_bytes:
                refusal = QUOTA
            else:
                self.active[ticket.device] = self.active.get(ticket.device, 0) + 1
        if refusal is not None:
            if pair.joined is not None and not pair.joined.done():
                pair.joined.set_result(PEER_GONE)     # the side waiting for it: released too
            return self._refuse(conn, refusal, ticket.device)
        devices = list(pair.devices)
        devices[ticket.side] = ticket.device
        pair.devices = tuple(devices)
        self.pairs[pair.id] = pair
        pair.socks[ticket.side] = conn
        if pair.socks[1 - ticket.side] is None:
            return await self._wait_for_peer(pair, ticket, conn)
        pair.joined.set_result(JOINED)
        self._start(pair, 1 - ticket.side)

    async def _wait_for_peer(self, pair: _Pair, ticket: _Ticket, conn: socket.socket) -> None:
        """The first side waits for the second, and is watched meanwhile: a
        device sends nothing before it is told it joined, so a byte, an EOF
        or a reset from it means it is gone, and its slot is freed at once."""
        loop = asyncio.get_running_loop()
        pair.joined = loop.create_future()
        watch = loop.create_future()
        fd = conn.fileno()
        # readable = a byte, an EOF or an error; peeked at, never read
        loop.add_reader(fd, lambda: watch.done() or watch.set_result(None))
        watching = [True]

        def unwatch() -> None:      # once: later, the fd number may be another socket's
            if watching:
                watching.clear()
                loop.remove_reader(fd)
        pair.unwatch = unwatch
        status = None
        left = False                        # this side is the one gone
        try:
            done, _ = await asyncio.wait({pair.joined, watch}, timeout=self.join_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if pair.joined in done:         # joined, or its peer refused/revoked: told so
                status = pair.joined.result()
                if status == JOINED:
                    return                  # the second side starts the pumps
            elif watch in done:
                status, left = PEER_GONE, True
            else:
                status = PEER_TIMEOUT
        except asyncio.CancelledError:
            status = REVOKED
            raise
        finally:
            pair.unwatch()
            watch.cancel()
            if status != JOINED:
                if pair.joined is not None and not pair.joined.done():
                    pair.joined.set_result(status)
                pair.socks[ticket.side] = None
                self._release(ticket.device)
                self.pairs.pop(pair.id, None)
                self._gone[pair.id] = time.monotonic() + self.token_ttl
                if left:
                    self.log("relay-left", pair=pair.id, device=ticket.device)
                    conn.close()
                else:
                    self._refuse(conn, status, ticket.device)

    def _start(self, pair: _Pair, waiter: int) -> None:
        """Both sides are here: tell each, the one that waited first, then
        pump. If the waiter cannot be told (reset since it joined), the
        newcomer hears "peer-gone"; if the newcomer cannot, the waiter's
        connection is closed. Either way nothing is left held."""
        pair.unwatch()
        order = (waiter, 1 - waiter)
        told = 0
        for side in order:
            try:
                pair.socks[side].send(bytes([JOINED]))   # one byte, an empty send buffer
                told += 1
            except OSError:
                break
        if told < 2:
            if told == 0:
                try:
                    pair.socks[order[1]].send(bytes([PEER_GONE]))
                except OSError:
                    pass
            for sock in pair.socks:
                sock.close()
            for dev in pair.devices:
                self._release(dev)
            self.pairs.pop(pair.id, None)
            self.log("relay-aborted", pair=pair.id, devices=pair.devices,
                     reason="a side closed before it could be told it joined")
            return
        pair.running = True
        for sock in pair.socks:
            sock.setblocking(True)
            # forward what was read at once: the sender coalesced it already,
            # and Nagle would hold a second small piece a whole round trip of
            # the outgoing leg (~40 ms in the lab) behind the first
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                liveness.apply(sock, self.keepalive)
            except liveness.KeepaliveError as exc:     # the relay works without it
                self.log("relay-keepalive-refused", pair=pair.id, reason=str(exc))
        self.relays_total += 1
        self.log("relay-joined", pair=pair.id, devices=pair.devices)
        done = threading.Event()
        threads = [threading.Thread(target=self._pump, args=(pair, i, done), daemon=True,
                                    name=f"relay-{pair.id}-{i}") for i in (0, 1)]
        for t in threads:
            self._threads.add(t)
            t.start()

    def _whoami(self, conn: socket.socket, token: bytes = b"") -> None:
        """The reflexive address of this very connection (what STUN does):
        a device's natcheck compares it with its local port. It reveals
        nothing but the asker's own address, so it needs no token; one that
        carries a device's probe token (``on_whoami``) also tells the CCS,
        from a connection the device made itself, where that device is in
        this family (the candidates it may announce in it: ccs.server)."""
        try:
            ip, port = conn.getpeername()[:2]
            ip = unmap(ip)
            conn.send(reply_of(ip, port))
        except OSError:
            conn.close()
            return
        conn.close()
        if any(token) and self.on_whoami is not None:
            self.on_whoami(bytes(token), ip, port)

    async def _filtering(self, conn: socket.socket) -> None:
        """How the asker's gateway treats an unsolicited SYN to the mapping
        this very connection opened, from another port of the same address:
        natcheck's filtering probe (drop, RST, or let in). It only ever
        connects back to the asker's own proven address and port, so it
        needs no token; concurrent probes are capped, per source address
        (so one address cannot take every slot) and in all."""
        loop = asyncio.get_running_loop()
        verdict = b"B"
        try:
            source = source_key(conn.getpeername()[0])
        except OSError:
            conn.close()
            return
        mine = self._probes_from.get(source, 0)
        if self._filter_probes < MAX_FILTER_PROBES and mine < self.probes_per_source:
            self._filter_probes += 1
            self._probes_from[source] = mine + 1
            probe = socket.socket(conn.family, socket.SOCK_STREAM)
            try:
                probe.setblocking(False)
                probe.bind((conn.getsockname()[0], 0))
                await asyncio.wait_for(loop.sock_connect(probe, conn.getpeername()[:2]),
                                       filter_probe_seconds(_rtt_seconds(conn)))
                verdict = b"O"
            except ConnectionRefusedError:
                verdict = b"R"
            except (asyncio.TimeoutError, OSError):
                verdict = b"D"
            finally:
                probe.close()
                self._filter_probes -= 1
                left = self._probes_from[source] - 1
                if left:
                    self._probes_from[source] = left
                else:
                    del self._probes_from[source]
        try:
            await loop.sock_sendall(conn, verdict)
        except OSError:
            pass
        conn.close()

    def _refuse(self, conn: socket.socket, status: int, device: Optional[str]) -> None:
        code, reason = STATUS_TEXT[status]
        self.log("relay-refused", device=device, code=code, reason=reason)
        try:
            conn.send(bytes([status]))
        except OSError:
            pass
        conn.close()

    def _release(self, device: Optional[str]) -> None:
        """One relay slot of ``device`` back (from the loop and from pump
        threads: under the lock, like the take in _admit)."""
        with self._lock:
            if device is not None and self.active.get(device):
                self.active[device] -= 1
                if not self.active[device]:
                    del self.active[device]

    # -- the data path (one thread per direction; os.splice drops the GIL) ------------
    def _pump(self, pair: _Pair, side: int, done: threading.Event) -> None:
        src, dst = pair.socks[side], pair.socks[1 - side]
        owner = pair.devices[side]
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            except OSError:
                pass
            sfd, dfd = src.fileno(), dst.fileno()
            while True:
                n = os.splice(sfd, w, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(r, dfd, left, flags=os.SPLICE_F_MOVE)
                with self._lock:
                    pair.bytes += n
                    self.bytes_total += n
                    used = self.used[owner] = self.used.get(owner, 0) + n
                if self.quota_bytes is not None and used >= self.quota_bytes:
                    self.log("relay-quota", pair=pair.id, device=owner, bytes=used)
                    for s in pair.socks:
                        _shutdown(s)
                    break
            try:
                dst.shutdown(socket.SHUT_WR)      # pass the EOF on
            except OSError:
                pass
        except OSError:
            for s in pair.socks:
                _shutdown(s)
        finally:
            os.close(r)
            os.close(w)
            with self._lock:
                last = done.is_set()
                done.set()
            if last:
                for s in pair.socks:
                    s.close()
                for dev in pair.devices:
                    self._release(dev)
                self.pairs.pop(pair.id, None)
                self.log("relay-closed", pair=pair.id, bytes=pair.bytes)
            self._threads.discard(threading.current_thread())


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket (the relay's, the probe port's,
    the CCS's device port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not 0-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host.strip("[]") == "::":
            # both families on one socket whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def filter_probe_seconds(rtt: Optional[float]) -> float:
    """How long the filtering probe waits for an answer to its SYN before
    calling it dropped: an answer (the device's SYN-ACK, its gateway's RST)
    takes one round trip, so four of them, within [FILTER_PROBE_MIN,
    FILTER_PROBE_SECONDS]; the whole second when the round trip is unknown.
    (A device's first connection waits for this verdict, and behind the
    commonest gateways, which drop, it is always the timeout.)"""
    if rtt is None:
        return FILTER_PROBE_SECONDS
    return min(FILTER_PROBE_SECONDS, max(FILTER_PROBE_MIN, 4 * rtt))


def _rtt_seconds(conn: socket.socket) -> Optional[float]:
    """The kernel's smoothed RTT of ``conn`` (TCP_INFO tcpi_rtt), if any."""
    try:
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    rtt_us = int.from_bytes(info[68:72], sys.byteorder)
    return rtt_us / 1e6 if rtt_us else None


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def _recv_exactly(loop, conn: socket.socket, n: int) -> bytes:
    """Exactly n bytes (or fewer at EOF); never more, so no stream byte is lost."""
    data = b""
    while len(data) < n:
        part = await loop.sock_recv(conn, n - len(data))
        if not part:
            break
        data += part
    return data


def relay_status_error(status: int) -> tuple[str, str]:
    return STATUS_TEXT.get(status, ("relay-error", f"relay status {status}"))
