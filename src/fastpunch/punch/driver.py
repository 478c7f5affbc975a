"""The one I/O loop of a crafted punch: it feeds the punch machine
(``fastpunch.proto.punch``) and does what it says.

* one nftables table, made before anything can arrive, keeps the local
  kernel from resetting any flow of the attempt (``netfilter.suppress_rsts``);
* one raw receive socket whose BPF filter takes the segments of every flow
  (our punch port toward any peer address, spray's sources), read with
  ``loop.add_reader``: each datagram parsed in C and handed to
  ``machine.receive(segment, now)``;
* one raw send socket (SO_MARK, so the table lets our own RSTs pass); a
  ``SendBatch`` is built in one C call and sent with sendmmsg;
* one timer, always at ``machine.next_timer``.

When a flow completes it is handed to the kernel (TCP_REPAIR) in the same
turn of the loop, with the peer's bytes that came meanwhile; the table goes
(the kernel socket owns the winner; the peer's segments on every other
flow now draw our kernel's RSTs, which tell the peer to stop). A flow
completed on the peer's SYN goes on being confirmed in the background
until the slot ends. No thread, no select loop of its own; every crafted
strategy runs here.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import random
import socket
import time
from typing import Callable, Optional, Sequence

from fastpunch import _features, netfilter
from fastpunch._engine import ENGINE_MARK, RawReceiver, RawSender, SegmentBatch, TCPOptions, \
    build, parse
from fastpunch.errors import MalformedPacket
from fastpunch.handoff import repair_socket
from fastpunch.proto.punch import (
    Failure, Limits, MachineState, Mode, PairPlan, PunchMachine, SendBatch, SprayPlan,
    TcpOptionsOffer,
)
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed

__all__ = ["Race", "Engine", "require_privileges"]

log = logging.getLogger("fastpunch.punch")
BATCH = 512                   # SYNs one sendmmsg carries (spray rounds)


def require_privileges() -> None:
    """Raw sockets (CAP_NET_RAW), nftables, SO_MARK and TCP_REPAIR
    (CAP_NET_ADMIN), and a kernel that offers each (KernelFeatureMissing,
    before libnftables could exit the process): ``_features``."""
    _features.require_crafted()


class Race:
    """One crafted attempt: the flows of one or more strategies in one
    machine, run until a flow is handed off or the slot ends."""

    def __init__(self, ctx: PunchContext, end: float, attempt: Attempt, *, nominator: bool,
                 limits: Limits = Limits(), confirm: bool = True,
                 cancel: Optional[asyncio.Event] = None) -> None:
        self.ctx, self.end, self.attempt = ctx, end, attempt
        self.cancel = cancel
        peer = ctx.peer
        self.machine = PunchMachine(
            iss=ctx.iss, peer_isn=ctx.peer_isn, nominator=nominator, deadline=end,
            confirm_until=end if confirm else time.time(),
            offer=TcpOptionsOffer(ctx.ours.wscale, ctx.ours.sack_permitted, ctx.ours.timestamps),
            peer_offer=TCPOptions(mss=peer.mss, wscale=peer.wscale,
                                  sack_permitted=peer.sack_permitted,
                                  timestamp=(0, 0) if peer.timestamps else None),
            limits=limits,
            peer_addrs={peer.public} | {c.addr for c in peer.reachable_at()},
            random=random.SystemRandom().randint, tracer=ctx.tracer)
        self.pairs: list = []
        self.sprays: list = []
        # called when a flow completes, before its hand-off: extra segments
        # to send (spoof settles its own firewall's entry)
        self.on_complete: Optional[Callable[[PunchMachine], list]] = None
        self._t0 = time.time()

    def add(self, pairs: Sequence[PairPlan] = (), sprays: Sequence[SprayPlan] = ()) -> None:
        for p in pairs:
            self.machine.add(p)
            self.pairs.append(p)
        for s in sprays:
            self.machine.add_spray(s)
            self.sprays.append(s)

    # -- what the kernel is told ---------------------------------------------------------
    def _rst_rules(self) -> list:
        """Our kernel's RSTs dropped toward the peer: from each punch port to
        any port of every address of the peer (peer-reflexive flows come
        from ports nobody announced), and from each spray source. (The punch
        port guarded since gathering needs none.)"""
        rules = []
        peer_addrs = sorted({p.remote[0] for p in self.pairs} | self.machine.peer_addrs)
        ports = {p.local[1] for p in self.pairs} | \
            {s.local_port for s in self.sprays if s.probe_ports}
        if self.ctx.guarded:
            ports.discard(self.ctx.local_port)
        for port in sorted(ports):
            rules += [netfilter.RstSuppression(port, addr) for addr in peer_addrs]
        for s in self.sprays:
            rules += [netfilter.RstSuppression(p, s.remote_ip, s.remote_port) for p in s.sources]
        return rules

    def _families(self) -> list:
        """The IP families of the attempt's flows and sprays."""
        fams = {6 if ":" in p.local[0] else 4 for p in self.pairs}
        fams |= {6 if ":" in s.remote_ip else 4 for s in self.sprays}
        return sorted(fams)

    def _matches(self) -> list:
        matches = [(None, None, 0, port) for port in
                   sorted({p.local[1] for p in self.pairs} |
                          {s.local_port for s in self.sprays if s.probe_ports})]
        matches += [(s.remote_ip, None, s.remote_port, 0) for s in self.sprays if s.sources]
        if not matches:
            raise PunchFailed("no-pairs", "no candidate pair to try")
        if len(matches) > 16:
            raise PunchFailed("too-many-ports", f"{len(matches)} local ports in one attempt")
        return matches

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> socket.socket:
        """The handed-off kernel socket of the winning flow; PunchFailed with
        the machine's reason otherwise."""
        require_privileges()
        if not self.pairs and not self.sprays:
            raise PunchFailed("no-pairs", "no candidate pair to try")
        loop = asyncio.get_running_loop()
        matches = self._matches()
        # the table before the receive socket: a peer SYN that came before the
        # table was answered with a RST by our kernel, and the peer may start
        # over from another port; in this order the machine never sees one
        rules = self._rst_rules()
        table = netfilter.suppress_rsts(rules) if rules else None
        if table is not None:
            from fastpunch.netcheck.gather import _sweep

            _sweep(netfilter)          # tables of crashed fastpunch processes, in this netns
        done: asyncio.Future = loop.create_future()
        io: Optional[_RaceIO] = None
        background = False
        if table is not None:
            table.apply()
        try:
            families = self._families()
            tx = _open_senders(families)
            rxs: list = []
            try:
                for fam in families:
                    rxs.append(RawReceiver(matches=[m for m in matches if _fits(m, fam)],
                                           capacity=256, family=fam))
            except BaseException:
                for rx in rxs:
                    rx.close()
                tx.close()
                raise
            io = _RaceIO(self, rxs, tx, done, [table] if table is not None else [])
            io.bind(loop)
            cancelled = None
            if self.cancel is not None:
                cancelled = loop.create_task(self.cancel.wait())
                cancelled.add_done_callback(
                    lambda t: t.cancelled() or io.stop("the peer left"))
            try:
                sock = await done
            finally:
                if cancelled is not None:
                    cancelled.cancel()
            background = io.confirming()
            return sock
        finally:
            self._record()
            if io is not None and not background:
                io.close()
            if table is not None:
                _remove_all([table])

    def _record(self) -> None:
        m, a = self.machine, self.attempt
        a.sent, a.seen = m.sent + m.spray_sent, m.seen
        a.pairs = m.pairs
        a.trace = m.events
        a.events = [(round(e.t - self._t0, 4), e.text()) for e in m.events]
        if m.outcome is not None:
            p = m.outcome.pair
            a.winner = f"{p.kind} {p.local[0]}:{p.local[1]} -> {p.remote[0]}:{p.remote[1]}"


class _Senders:
    """One raw send socket per IP family a machine's flows use, as one:
    each datagram goes out of its own family's (the version nibble of its
    first byte says which)."""

    def __init__(self, by_family: dict) -> None:
        self.by = by_family

    def _of(self, version: int):
        tx = self.by.get(version)
        if tx is None:
            raise OSError(f"no IPv{version} send socket in this attempt")
        return tx

    def send(self, datagram: bytes) -> None:
        self._of(datagram[0] >> 4).send(datagram)

    def send_batch(self, batch, start: int, count: int, version: int = 4) -> None:
        self._of(version).send_batch(batch, start, count)

    def close(self) -> None:
        for tx in self.by.values():
            tx.close()


def _open_senders(families) -> _Senders:
    out: dict = {}
    try:
        for fam in sorted(families):
            out[fam] = RawSender(mark=ENGINE_MARK, family=fam)
    except BaseException:
        _Senders(out).close()
        raise
    return _Senders(out)


class _IO:
    """The sockets, the reader and the timer around one machine: whatever
    is received goes to ``machine.receive``, whatever it returns is sent,
    the timer always sits at ``machine.next_timer``; ``changed()`` is called
    after each turn. Bound to one event loop at a time (``bind``/``unbind``),
    so a synchronous caller may drive it with ``asyncio.run`` call by call.
    ``rx``: one receive socket or a list of them (one per IP family)."""

    def __init__(self, machine: PunchMachine, rx, tx, changed: Callable[[], None],
                 fault: Optional[Callable[[BaseException], None]] = None) -> None:
        self.m = machine
        self.rxs = list(rx) if isinstance(rx, (list, tuple)) else [rx]
        self.tx = tx
        self.changed = changed
        self.fault = fault
        self.loop = None
        self.timer = None
        self.batch = None
        self.ip_id = 0
        self.closed = False

    def bind(self, loop) -> None:
        self.loop = loop
        for rx in self.rxs:
            loop.add_reader(rx.fileno(), self.readable, rx)
        self.wake()

    def unbind(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.loop is not None and not self.closed:
            for rx in self.rxs:
                try:
                    self.loop.remove_reader(rx.fileno())
                except (ValueError, OSError):
                    pass
        self.loop = None

    # -- sending ---------------------------------------------------------------------------
    def send(self, out: list) -> None:
        for s in out:
            try:
                if isinstance(s, SendBatch):
                    self._batch(s)
                else:
                    self.ip_id = (self.ip_id + 1) & 0xFFFF
                    self.tx.send(build(s.src, s.dst, s.sport, s.dport, seq=s.seq, ack=s.ack,
                                       flags=s.flags, window=s.window, options=s.options,
                                       payload=s.payload or None, ttl=s.ttl,
                                       ip_id=0 if ":" in s.dst else self.ip_id))
            except OSError as exc:
                # a full socket buffer or a route that is gone: that segment
                # is lost, as on the wire; the machine's pacing resends
                log.debug("raw send to %s failed: %s", getattr(s, "dst", "?"), exc)

    def _batch(self, b: SendBatch) -> None:
        if self.batch is None:
            self.batch = SegmentBatch(BATCH, 128)
        vary = b.sports or b.dports
        for at in range(0, len(vary), BATCH):
            chunk = array.array("H", vary[at:at + BATCH])
            n = self.batch.fill(len(chunk), b.src, b.dst, b.sport, b.dport, seq=b.seq,
                                flags=b.flags, window=b.window, options=b.options,
                                **({"sports": chunk} if b.sports else {"dports": chunk}))
            self.tx.send_batch(self.batch, 0, n, 6 if ":" in b.src else 4)

    # -- receiving and timers ------------------------------------------------------------
    def parsed(self) -> list:
        """Every segment waiting on the receive socket, parsed (malformed
        ones counted and dropped)."""
        out = []
        for rx in self.rxs:
            try:
                while datagrams := rx.recv_many():
                    for d in datagrams:
                        try:
                            out.append(parse(d))
                        except MalformedPacket:
                            self.m.ignored += 1
            except OSError as exc:
                log.debug("raw receive failed: %s", exc)
        return out

    def readable(self, rx=None) -> None:
        self._guarded(lambda: self._readable(rx if rx is not None else self.rxs[0]))

    def wake(self) -> None:
        self.timer = None
        self._guarded(self._wake)

    def _guarded(self, turn: Callable[[], None]) -> None:
        """One turn of the loop; an exception in it (a bug, a segment the
        builder refuses) ends the attempt through ``fault``, which settles
        whoever waits, instead of dying in the event loop's handler and
        leaving them waiting for good."""
        try:
            turn()
        except Exception as exc:
            if self.fault is None:
                raise
            log.exception("punch loop failed")
            self.m.fault(time.time(), f"{type(exc).__name__}: {exc}")
            self.fault(exc)

    def _readable(self, rx) -> None:
        try:
            datagrams = rx.recv_many()
        except OSError as exc:
            log.debug("raw receive failed: %s", exc)
            return
        for datagram in datagrams:
            try:
                seg = parse(datagram)
            except MalformedPacket:
                self.m.ignored += 1
                continue
            # (once a flow is complete, the machine keeps the rest of the
            # batch for the hand-off's late bytes)
            self.send(self.m.receive(seg, time.time()))
        self.changed()
        self.arm()

    def _wake(self) -> None:
        if self.closed or self.loop is None:
            return
        self.send(self.m.advance(time.time()))
        self.changed()
        self.arm()

    def arm(self) -> None:
        if self.loop is None or self.closed:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        t = self.m.next_timer
        if t is not None:
            self.timer = self.loop.call_later(max(0.0, t - time.time()), self.wake)

    def close(self) -> None:
        if self.closed:
            return
        self.unbind()
        self.closed = True
        for rx in self.rxs:
            rx.close()
        self.tx.close()


def _fits(match: tuple, family: int) -> bool:
    """Whether a receive clause (src, dst, sport, dport) belongs to a
    receiver of ``family``: one with no address to either."""
    addrs = [a for a in match[:2] if a is not None]
    return not addrs or all((":" in a) == (family == 6) for a in addrs)


def _remove_all(tables: list) -> None:
    """Remove every table; one that fails is logged (the sweep of stale
    tables takes it later) and does not keep the others, or the result."""
    for t in tables:
        try:
            t.remove()
        except Exception as exc:
            log.warning("RST table not removed: %s", exc)


class _RaceIO:
    """A Race's loop: settles its future, hands off, confirms."""

    def __init__(self, race: Race, rx, tx, done: asyncio.Future, tables: list) -> None:
        self.race, self.m, self.done, self.tables = race, race.machine, done, tables
        self.io = _IO(race.machine, rx, tx, self.changed, self.fault)
        self.handed = False

    def bind(self, loop) -> None:
        self.io.bind(loop)

    def changed(self) -> None:
        m = self.m
        if m.state is MachineState.COMPLETE and not self.handed:
            self.hand_off()
        if m.state is MachineState.FAILED and not self.done.done():
            self.done.set_exception(PunchFailed(m.failure.value, m.reason))
        if m.state is MachineState.DONE and self.handed:
            self.close()

    def fault(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(PunchFailed(Failure.FAULT.value,
                                                f"the punch loop failed: {exc!r}"))
        self.close()

    def stop(self, why: str) -> None:
        if self.io.closed:
            return
        self.m.stop(time.time(), why)
        self.changed()

    def hand_off(self) -> None:
        m, race = self.m, self.race
        self.handed = True
        if race.on_complete is not None:
            self.io.send(race.on_complete(m))
        try:
            sock = repair_socket(m.handoff(time.time()),
                                 late=lambda: m.late_data(self.io.parsed()))
        except BaseException as exc:
            m.handoff_failed(time.time(), f"hand-off failed: {exc}")
            if not self.done.done():
                self.done.set_exception(exc)
            return
        m.handed_off(time.time())
        if not self.done.done():
            self.done.set_result(sock)
        else:                      # nobody waits any more (cancelled): drop it
            sock.close()
        # the kernel socket owns the winner now; the table goes, so the peer's
        # segments on every other flow draw our kernel's RSTs
        _remove_all(self.tables)

    def confirming(self) -> bool:
        """Whether the loop goes on without the caller (CONFIRMING)."""
        return not self.io.closed and self.m.state is MachineState.CONFIRMING

    def close(self) -> None:
        if self.io.closed:
            return
        self.io.close()
        _remove_all(self.tables)
        self.race._record()


class Engine:
    """One crafted flow that is never handed off: the engine end to end
    against a real TCP stack (the live tests, ``fastpunch demo --engine``),
    over IPv4 or, with IPv6 addresses, IPv6.
    Segments built in C, sent through an IP_HDRINCL socket, the peer's
    received behind a BPF filter on the 4-tuple, sequence numbers tracked by
    the punch machine's flow (``keep=True``). Each call runs the loop until
    its condition holds; a synchronous caller may ``asyncio.run`` each.

    The local kernel knows nothing of the flow and would answer the peer
    with RSTs: wrap it in ``rst_suppression()``."""

    def __init__(self, local: tuple, peer: tuple, *, iss: Optional[int] = None,
                 peer_isn: Optional[int] = None, mss: Optional[int] = None,
                 wscale: Optional[int] = 7,
                 sack_permitted: bool = True, timestamps: bool = True,
                 rcv_wnd: int = 64240, limits: Limits = Limits(), keep: bool = True) -> None:
        """``keep`` False: the flow is for a hand-off (``handoff_state``,
        ``late_data``), not for data of the engine's own."""
        self.local, self.peer = tuple(local), tuple(peer)
        six = ":" in self.local[0]
        if six != (":" in self.peer[0]):
            raise ValueError(f"local {self.local[0]} and peer {self.peer[0]} are of two families")
        self.keep = keep
        self.iss = int.from_bytes(os.urandom(4), "big") if iss is None else iss
        # (a 1500-byte link's: IPv6's header is 20 bytes longer than IPv4's)
        self.mss = mss if mss is not None else (1440 if six else 1460)
        self._opts = TcpOptionsOffer(wscale, sack_permitted, timestamps, rcv_wnd)
        self._peer_isn = peer_isn
        self._limits = limits
        self.machine: Optional[PunchMachine] = None
        self.tx = _open_senders([6 if six else 4])
        try:
            self.rx = RawReceiver(src=peer[0], dst=local[0], sport=peer[1], dport=local[1])
        except BaseException:
            self.tx.close()
            raise
        self._io: Optional[_IO] = None
        self._cond: Optional[tuple] = None

    def rst_suppression(self) -> netfilter.ScopedTable:
        return netfilter.suppress_rsts(
            [netfilter.RstSuppression(self.local[1], self.peer[0], self.peer[1])])

    def _start(self, mode: Mode, peer_isn: Optional[int], peer_offer, timeout: float) -> None:
        self.machine = PunchMachine(iss=self.iss, peer_isn=peer_isn, nominator=True,
                                    deadline=time.time() + timeout, offer=self._opts,
                                    peer_offer=peer_offer, limits=self._limits, prflx=False,
                                    keep=self.keep)
        self.machine.add(PairPlan(self.local, self.peer, "engine", "engine", mode=mode,
                                  start=time.time(), mss=self.mss))
        self._io = _IO(self.machine, self.rx, self.tx, self._changed)

    def _changed(self) -> None:
        if self._cond is None:
            return
        pred, fut = self._cond
        if fut.done():
            return
        if self.machine.state is MachineState.FAILED:
            fut.set_exception(PunchFailed(self.machine.failure.value, self.machine.reason))
        elif self.machine.reset:
            fut.set_exception(ConnectionResetError("the peer reset the flow"))
        elif pred():
            fut.set_result(None)

    async def _until(self, pred, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cond = (pred, fut)
        self._io.bind(loop)
        try:
            self._changed()
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(what) from None
        finally:
            self._cond = None
            self._io.unbind()

    async def open(self, timeout: float = 5.0) -> float:
        """Active open (SYN, resent with the machine's pacing) until
        ESTABLISHED; the seconds it took."""
        t0 = time.time()
        self._start(Mode.OPEN, self._peer_isn, None, timeout)
        await self._until(lambda: self.machine.state is MachineState.COMPLETE, timeout + 1,
                          f"no handshake with {self.peer[0]}:{self.peer[1]}")
        return time.time() - t0

    async def answer(self, peer_isn: int, peer_options: TCPOptions,
                     timeout: float = 5.0) -> float:
        """Passive open of a SYN already seen (the nat method's answer):
        SYN-ACK until the peer's ACK."""
        t0 = time.time()
        self._start(Mode.ANSWER, peer_isn, peer_options, timeout)
        await self._until(lambda: self.machine.state is MachineState.COMPLETE, timeout + 1,
                          f"no ACK from {self.peer[0]}:{self.peer[1]}")
        return time.time() - t0

    def send(self, data: bytes) -> None:
        """Data segments, at once (no retransmission: lab and test use)."""
        self._io.send(self.machine.send_data(data, time.time()))

    async def receive(self, size: int, timeout: float = 5.0) -> bytes:
        await self._until(lambda: self.machine.pending_data >= size, timeout,
                          f"received {self.machine.pending_data} of {size} bytes")
        return self.machine.take_data(size)

    async def wait_acked(self, timeout: float = 5.0) -> None:
        await self._until(lambda: self.machine.all_acked, timeout,
                          "the peer did not acknowledge our data")

    def abort(self) -> None:
        """Reset the flow at the peer (RST with our next sequence number)."""
        self._io.send(self.machine.abort(time.time()))

    @property
    def peer_options(self) -> Optional[TCPOptions]:
        return self.machine.winner.peer_options

    @property
    def timestamps(self) -> bool:
        return self.machine.winner.ts_ok

    @property
    def irs(self) -> int:
        return self.machine.winner.tracker.irs

    def handoff_state(self):
        return self.machine.handoff(time.time())

    def late_data(self) -> bytes:
        return self.machine.late_data(self._io.parsed())

    @property
    def stats(self):
        return self.machine.pairs[0] if self.machine is not None else None

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
        else:
            self.rx.close()
            self.tx.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
