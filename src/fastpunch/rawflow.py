"""One crafted TCP flow over raw sockets, driven by the engine's FlowTracker.

This is the engine end to end: segments built in C, sent through an
IP_HDRINCL socket, the peer's segments received behind a BPF filter scoped
to the flow's 4-tuple, checksums verified, sequence numbers tracked per
RFC 9293. It is synchronous and small on purpose: the live tests and the
engine demo use it, and the punching strategies build on the same pieces.

The local kernel knows nothing of the flow and would answer the peer with
RSTs; callers wrap it in :func:`fastpunch.netfilter.suppress_rsts` (see
:meth:`RawFlow.rst_suppression`).
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field
from typing import Optional

from fastpunch import netfilter
from fastpunch._engine import (
    ENGINE_MARK,
    FlowEvent,
    FlowState,
    FlowTracker,
    RawReceiver,
    RawSender,
    Reply,
    Segment,
    TCPOptions,
    build,
    parse,
)
from fastpunch.errors import FastpunchError, MalformedPacket

__all__ = ["RawFlow", "FlowStats", "HandshakeFailed"]

LATE_LIMIT = 1 << 20      # bytes late_data takes at most (a peer's first flight is ~15 KB)


class HandshakeFailed(FastpunchError, TimeoutError):
    """The crafted handshake did not complete (timeout or reset)."""


@dataclass
class FlowStats:
    sent: int = 0
    received: int = 0
    malformed: int = 0
    foreign: int = 0              # SYNs/SYN-ACKs with another ISN than the announced
    events: list = field(default_factory=list)  # (seconds since start, what)


class RawFlow:
    """A TCP flow from ``local`` to ``peer`` whose every segment we craft."""

    # Complete on the peer's SYN (see complete): set by connect(early=True).
    early = False

    def __init__(self, local_ip: str, local_port: int, peer_ip: str, peer_port: int, *,
                 iss: Optional[int] = None, mss: int = 1460, wscale: Optional[int] = 7,
                 sack_permitted: bool = True, timestamps: bool = True,
                 rcv_wnd: int = 64240, peer_isn: Optional[int] = None) -> None:
        self.local = (local_ip, local_port)
        self.peer = (peer_ip, peer_port)
        self.iss = int.from_bytes(os.urandom(4), "big") if iss is None else iss
        self.mss, self.wscale, self.sack_permitted = mss, wscale, sack_permitted
        self.timestamps = timestamps
        self.peer_isn = peer_isn      # announced by the peer: SYNs with another are not its
        self.ts_ok = False          # both SYNs carried timestamps
        self.ts_recent = 0          # newest TSval from the peer
        self.peer_options: Optional[TCPOptions] = None
        self.tracker = FlowTracker(self.iss, rcv_wnd, wscale)
        self._rcv_wnd = rcv_wnd
        self.stats = FlowStats()
        self._t0 = time.monotonic()
        self._ip_id = 0
        self.tx = RawSender(mark=ENGINE_MARK)
        try:
            self.rx = RawReceiver(src=peer_ip, dst=local_ip, sport=peer_port, dport=local_port)
        except BaseException:
            self.tx.close()
            raise
        self._received = bytearray()
        self._left: list = []          # segments behind the completing one (see _opening)
        self.peer_confirmed = False    # a segment of the peer acked our SYN (see confirm)

    # -- helpers ---------------------------------------------------------------
    def rst_suppression(self) -> netfilter.ScopedTable:
        """The scoped nftables table that silences the local kernel for this flow."""
        return netfilter.suppress_rsts(
            [netfilter.RstSuppression(self.local[1], self.peer[0], self.peer[1])])

    def _note(self, what: str) -> None:
        self.stats.events.append((round(time.monotonic() - self._t0, 6), what))

    def _tsval(self) -> int:
        return int(time.monotonic() * 1000) & 0xFFFFFFFF

    def _options(self, syn: bool) -> Optional[TCPOptions]:
        if syn:
            return TCPOptions(
                mss=self.mss, wscale=self.wscale, sack_permitted=self.sack_permitted,
                timestamp=(self._tsval(), self.ts_recent) if self.timestamps else None)
        if self.ts_ok:
            return TCPOptions(timestamp=(self._tsval(), self.ts_recent))
        return None

    def _send(self, r: Reply, payload: bytes = b"", ttl: int = 64,
              to: Optional[tuple] = None) -> None:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        dst, dport = self.peer if to is None else to
        datagram = build(self.local[0], dst, self.local[1], dport,
                         seq=r.seq, ack=r.ack, flags=r.flags, window=r.window,
                         options=self._options(bool(r.flags & 0x2)), payload=payload,
                         ip_id=self._ip_id, ttl=ttl)
        self.tx.send(datagram)
        self.stats.sent += 1

    def _wait(self, deadline: float, poll: bool = False) -> list[Segment]:
        remaining = 0.0 if poll else deadline - time.monotonic()
        if remaining <= 0 and not poll:
            return []
        ready, _, _ = select.select([self.rx], [], [], remaining)
        if not ready:
            return []
        segments = []
        for datagram in self.rx.recv_many():
            try:
                segments.append(parse(datagram))
            except MalformedPacket as exc:
                self.stats.malformed += 1
                self._note(f"malformed: {exc.reason}")
        return segments

    def complete(self) -> bool:
        """The handshake is done as far as this side needs: ESTABLISHED, or,
        with ``early``, the peer's SYN with its announced ISN came in and our
        SYN-ACK went back (SYN_RECEIVED). Both ISNs came through the CCS, so
        that SYN tells us everything a SYN-ACK would: the peer is there, its
        gateway has opened a mapping toward us, ours let the SYN in, and the
        numbers of both directions. Whether the peer got anything of ours is
        what :meth:`confirm` watches for after the hand-off."""
        state = self.tracker.state
        if state == FlowState.ESTABLISHED:
            return True
        return (self.early and state == FlowState.SYN_RECEIVED and self.peer_isn is not None
                and self.tracker.rcv_nxt == (self.peer_isn + 1) & 0xFFFFFFFF)

    def _opening(self, segments: list):
        """The segments of a batch up to the one that completes the
        handshake. Those after it (the peer's first data, often right behind
        its ACK) are neither acked nor counted: they are kept for
        :meth:`late_data`, which the hand-off calls to queue their bytes in
        the kernel socket ahead of the rest. (Acked here, their bytes were
        lost to the stream, the socket starting after them; seen as 1 spoof
        check in 10 failing.)"""
        for seg in segments:
            if self.complete():
                self._note(f"left [{seg.flags_str}] seq={seg.seq} len={seg.payload_length} "
                           "for the kernel socket")
                self._left.append(seg)
                continue
            yield seg

    def late_data(self, limit: int = LATE_LIMIT) -> bytes:
        """The peer's in-order bytes from our receive point on that came
        after the segment completing the handshake and before the kernel
        socket exists: kept by :meth:`_opening`, or waiting on the receive
        socket now. The kernel had no socket for them and dropped them
        (its RST suppressed); without this the peer resends them when its
        retransmission timer fires (203 ms to 1 s in the lab).
        :func:`fastpunch.handoff.repair_socket` calls it just before the
        socket joins the flow. Also notes whether any of them acked our SYN
        (:meth:`confirm` then has nothing to wait for)."""
        segments, self._left = self._left, []
        while batch := self._wait(0.0, poll=True):
            segments += batch
        expected, out = self.tracker.rcv_nxt, bytearray()
        progress = True
        while progress and len(out) < limit:
            progress = False
            for seg in segments:
                n = seg.payload_length
                if not n or seg.flags & 0x6:             # SYN or RST: not stream data
                    continue
                offset = (expected - seg.seq) & 0xFFFFFFFF
                if offset < n:                           # covers `expected`
                    take = seg.payload[offset:offset + limit - len(out)]
                    out += take
                    expected = (expected + len(take)) & 0xFFFFFFFF
                    progress = True
        for seg in segments:
            if self._acks_our_syn(seg):
                self.peer_confirmed = True
        if out:
            self._note(f"took {len(out)} bytes that came during the hand-off")
        return bytes(out)

    def _acks_our_syn(self, seg: Segment) -> bool:
        acked = (seg.ack - self.iss - 1) & 0xFFFFFFFF
        return bool(seg.flags & 0x10) and not seg.flags & 0x4 and acked < 0x80000000

    def _input(self, seg: Segment) -> FlowEvent:
        self.stats.received += 1
        if self.peer_isn is not None and seg.flags & 0x2 and seg.seq != self.peer_isn:
            # not the peer's crafted flow: typically the kernel socket of its
            # previous strategy, still in its slot when our SYN arrived, which
            # answered with a SYN-ACK of its own ISN (or anyone else's)
            self.stats.foreign += 1
            self._note(f"ignored [{seg.flags_str}] seq={seg.seq}: not the announced ISN "
                       f"{self.peer_isn}")
            return FlowEvent.IGNORED
        if seg.flags & 0x2:  # the peer's SYN or SYN-ACK: learn its options
            self.peer_options = seg.options
            self.ts_ok = self.timestamps and seg.options.timestamp is not None
        if self.ts_ok and seg.options.timestamp is not None:
            self.ts_recent = seg.options.timestamp[0]
        before, was = self.tracker.rcv_nxt, self.tracker.state
        event, reply = self.tracker.input(seg)
        self._note(f"recv [{seg.flags_str}] seq={seg.seq} ack={seg.ack} len={seg.payload_length}"
                   f" -> {event.name}")
        advanced = (self.tracker.rcv_nxt - before) & 0xFFFFFFFF
        if seg.payload_length and advanced >= seg.payload_length:
            self._received += seg.payload
        if reply is not None:
            self._send(reply)
        if was == FlowState.SYN_SENT and self.tracker.state == FlowState.SYN_RECEIVED \
                and self.complete():
            # complete on the peer's SYN: an ACK right behind our SYN-ACK
            # takes our gateway's entry from SYN_RECV (60 s before it
            # expires) to ESTABLISHED even if the peer's SYN-ACK never comes
            # (the far gateway lets it through in any handshake state; a peer
            # still in SYN-SENT ignores it, one in SYN-RECEIVED completes)
            self._send(self.tracker.ack())
            self._note("complete on the peer's SYN (its announced ISN): sent SYN-ACK, ACK")
        return event

    # -- the flow --------------------------------------------------------------
    def connect(self, timeout: float = 5.0, resend_every: float = 0.25,
                survive_rst: bool = False, first_ttl: int = 0,
                first_gap: float = 0.03, first_to: Optional[tuple] = None,
                early: bool = False) -> float:
        """Active open: send SYN (resent every ``resend_every`` s) until the
        handshake completes. Returns the seconds it took. With
        ``survive_rst`` a RST during the handshake (a far NAT answering our
        SYN before the peer's own SYN opened it) starts the open over
        instead of failing it. With ``first_ttl`` the first SYN carries that
        TTL: enough to leave through our own NAT (opening its mapping), too
        little to reach the far one (which might answer it with a RST); the
        first full SYN follows ``first_gap`` seconds later. ``first_to``
        sends that first SYN to another (address, port) than the peer (the
        ``spoof`` strategy opens its firewall toward the CCS's address).
        With ``early`` (and ``peer_isn`` known) the open is complete once the
        peer's SYN has been answered (see :meth:`complete`): half a round
        trip sooner than waiting for its SYN-ACK."""
        self.early = early and self.peer_isn is not None
        start = time.monotonic()
        deadline = start + timeout
        syn = self.tracker.syn_sent()
        where = "" if first_to is None else f" to {first_to[0]}:{first_to[1]}"

        def opener(why: str) -> None:
            self._send(syn, ttl=first_ttl, to=first_to)
            self._note(f"sent SYN{where} with TTL {first_ttl} ({why})")

        if first_ttl:
            opener("opens our mapping only")
            next_resend = start + first_gap
        else:
            self._send(syn)
            self._note("sent SYN")
            next_resend = start + resend_every
        full_sent = not first_ttl
        while not self.complete():
            now = time.monotonic()
            if now >= deadline:
                raise HandshakeFailed(
                    f"no handshake with {self.peer[0]}:{self.peer[1]} within {timeout} s "
                    f"(state {self.tracker.state.name}, sent {self.stats.sent}, "
                    f"received {self.stats.received})")
            if now >= next_resend and self.tracker.state == FlowState.SYN_SENT:
                self.resend_syn("resent SYN" if full_sent else "sent SYN")
                full_sent = True
                next_resend = now + resend_every
            elif now >= next_resend and self.tracker.state == FlowState.SYN_RECEIVED:
                # simultaneous open: our SYN-ACK (or the peer's answer) was lost
                self._send(Reply(0x12, self.iss, self.tracker.rcv_nxt,
                                 self.tracker.ack().window))
                self._note("resent SYN-ACK")
                next_resend = now + resend_every
            for seg in self._opening(self._wait(min(deadline, next_resend))):
                if self._input(seg) == FlowEvent.RESET:
                    if not survive_rst:
                        raise HandshakeFailed(f"{self.peer[0]}:{self.peer[1]} reset the flow")
                    self.restart()
                    if first_ttl:
                        # the RST closed our mapping too: reopen it at once,
                        # before the peer's next SYN gets here and finds it
                        # closed (its gateway would answer with a RST in turn)
                        opener("reopens our mapping")
                    next_resend = time.monotonic() + resend_every / 2
                    break
        return time.monotonic() - start

    def confirm(self, timeout: float, resend_every: float = 0.25) -> bool:
        """After a hand-off on the peer's SYN alone (``early``): wait until
        the peer shows it has our SYN too, i.e. any segment of its acking our
        ISN + 1 (its SYN-ACK, or its kernel's ACK or data), resending our SYN
        every ``resend_every`` s meanwhile. The kernel socket owns the flow
        by now; these segments are only watched, not fed to the tracker.

        Why a SYN: if our SYN-ACK was lost and our SYN had reached the far
        gateway before the peer's own SYN left, the peer is still in
        SYN-SENT. Our gateway passes a repeated SYN of ours in any state
        (conntrack ignores, but forwards, it), and the far gateway takes it
        as the simultaneous-open SYN it never saw, so the peer answers and
        completes. A SYN-ACK would pass the far gateway but not ours: once
        our ACK (sent right behind our SYN-ACK) or any data has gone,
        conntrack takes a SYN-ACK of ours as INVALID and lets it out
        untranslated (LAB-NOTES 2). A bare ACK passes
        both, but leaves the far gateway without any SYN or SYN-ACK of ours,
        and then nothing the peer sends is valid to it.
        Returns True once confirmed, False at the timeout."""
        if self.peer_confirmed:
            self._note("the peer confirmed during the hand-off")
            return True
        deadline = time.monotonic() + timeout
        next_resend = time.monotonic() + resend_every
        while True:
            now = time.monotonic()
            if now >= deadline:
                self._note(f"the peer did not confirm within {timeout:.2f} s")
                return False
            if now >= next_resend:
                self.resend_syn()
                next_resend = now + resend_every
            for seg in self._wait(min(deadline, next_resend)):
                if self._acks_our_syn(seg):
                    self._note(f"the peer confirmed: [{seg.flags_str}] ack={seg.ack}")
                    if seg.flags & 0x2:
                        # its SYN-ACK: ACK it, as the handshake would (after a
                        # resent SYN of ours, our gateway went back to SYN_RECV
                        # on it; and our kernel socket, if it was not there yet
                        # when the SYN-ACK came, did not answer it). The
                        # tracker, fed nothing since the hand-off, still holds
                        # ISN + 1 both ways.
                        self._send(self.tracker.ack())
                        self._note("sent ACK")
                    return True

    def pump(self) -> list:
        """Feed every segment waiting on the receive socket to the tracker
        (answering as it says); returns their events. Never blocks."""
        events = []
        for seg in self._opening(self._wait(time.monotonic() + 1e-9, poll=True)):
            events.append(self._input(seg))
        return events

    def resend_syn(self, note: str = "resent SYN") -> None:
        self._send(Reply(0x2, self.iss, 0, self.tracker.ack().window))
        self._note(note)

    def restart(self) -> None:
        """Back to SYN_SENT after a RST (see connect's survive_rst)."""
        self._note("RST during the open: starting over")
        self.tracker = FlowTracker(self.iss, self._rcv_wnd, self.wscale)
        self.tracker.syn_sent()

    def answer_assumed(self, peer_isn: int, peer_options: TCPOptions, timeout: float = 5.0,
                       resend_every: float = 0.25) -> float:
        """Passive side of the "nat" method: act as if the peer's SYN (ISN
        ``peer_isn``, options as announced) had arrived, send the SYN-ACK
        (resent every ``resend_every`` s) until the peer's ACK completes the
        handshake. Returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        self.peer_options = peer_options
        self.ts_ok = self.timestamps and peer_options.timestamp is not None
        synack = self.tracker.assume_syn(peer_isn, 65535, peer_options.wscale)
        self._send(synack)
        self._note("sent SYN-ACK (assumed SYN)")
        next_resend = start + resend_every
        while self.tracker.state != FlowState.ESTABLISHED:
            now = time.monotonic()
            if now >= deadline:
                raise HandshakeFailed(
                    f"no ACK from {self.peer[0]}:{self.peer[1]} within {timeout:g} s "
                    f"(sent {self.stats.sent}, received {self.stats.received})")
            if now >= next_resend:
                self._send(synack)
                self._note("resent SYN-ACK")
                next_resend = now + resend_every
            for seg in self._opening(self._wait(min(deadline, next_resend))):
                if self._input(seg) == FlowEvent.RESET:
                    raise HandshakeFailed(f"{self.peer[0]}:{self.peer[1]} reset the flow")
        return time.monotonic() - start

    def send(self, data: bytes) -> None:
        """Send data in MSS-sized segments (no retransmission: lab use)."""
        peer_mss = self.peer_options.mss if self.peer_options and self.peer_options.mss else 536
        # MSS counts data only; options carried on every segment come out of it
        limit = min(self.mss, peer_mss) - (12 if self.ts_ok else 0)
        for off in range(0, len(data), limit):
            chunk = data[off:off + limit]
            self._send(self.tracker.send(len(chunk)), chunk)

    def receive(self, size: int, timeout: float = 5.0) -> bytes:
        """Collect ``size`` bytes of in-order data from the peer (acking them)."""
        deadline = time.monotonic() + timeout
        while len(self._received) < size:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"received {len(self._received)} of {size} bytes")
            for seg in self._wait(deadline):
                if self._input(seg) == FlowEvent.RESET:
                    raise ConnectionResetError("the peer reset the flow")
        data = bytes(self._received[:size])
        del self._received[:size]
        return data

    def wait_acked(self, timeout: float = 5.0) -> None:
        """Wait until the peer has acknowledged everything we sent."""
        deadline = time.monotonic() + timeout
        while self.tracker.snd_una != self.tracker.snd_nxt:
            if time.monotonic() >= deadline:
                raise TimeoutError("peer did not acknowledge our data")
            for seg in self._wait(deadline):
                self._input(seg)

    def handoff_state(self):
        """The established flow's state for :func:`fastpunch.handoff.repair_socket`:
        the numbers and the options both SYNs agreed on."""
        from fastpunch.handoff import FlowState as Repair

        if not self.complete():
            raise HandshakeFailed(f"cannot hand off a flow in state {self.tracker.state.name}")
        peer = self.peer_options
        scaled = bool(self.tracker.wscale_ok)
        return Repair(
            local=self.local, peer=self.peer, snd_nxt=self.tracker.snd_nxt,
            rcv_nxt=self.tracker.rcv_nxt, mss=(peer.mss if peer and peer.mss else 536),
            snd_wscale=self.tracker.snd_wscale if scaled else None,
            rcv_wscale=self.tracker.rcv_wscale if scaled else None,
            sack=bool(self.sack_permitted and peer is not None and peer.sack_permitted),
            timestamps=self.ts_ok, snd_wnd=max(self.tracker.snd_wnd, 1),
            rcv_wnd=self.tracker.rcv_wnd, tsval=self._tsval(), received=bytes(self._received))

    def abort(self) -> None:
        """Reset the flow at the peer (RST with our next sequence number)."""
        if self.tracker.state == FlowState.ESTABLISHED:
            self._send(Reply(0x4, self.tracker.snd_nxt, 0, 0))
            self._note("sent RST")

    def close(self) -> None:
        self.tx.close()
        self.rx.close()

    def __enter__(self) -> "RawFlow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
