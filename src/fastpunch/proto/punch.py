"""The punch as one sans-IO machine: every crafted flow of an attempt.

h11's shape: the machine never touches a socket or a clock. The driver
(``fastpunch.punch.driver``) feeds it each received segment and the time,
``receive(segment, now)``, and wakes it at ``next_timer``,
``advance(now)``; both return the segments to send (``Send``, or a
``SendBatch`` that C builds in one call). Randomness is injected. Typed
events (``events``) say what happened, for the report and a tracer.

What it drives (each a *flow*: from one of our ports toward one remote
address and port, sequence numbers tracked by the engine's FlowTracker):

* candidate pairs (``add``): a simultaneous open (SYN out, the peer's SYN
  answered with a SYN-ACK) or the "nat" method's responder (an unsolicited
  SYN-ACK acking the peer's announced ISN), paced per pair, with an
  optional low-TTL first SYN (the *opener*: opens our own mapping, dies
  before the far gateway) and a mirror of every SYN-ACK (``spoof``);
* spray (``add_spray``): SYN batches toward many ports of the peer, or
  from many ports of ours, whose answers become flows as they come;
* peer-reflexive flows: a SYN with the peer's announced ISN from a port
  nobody announced (the peer's NAT chose another than its candidate) is
  answered, and so becomes a flow.

**Who decides.** Several pairs may work at once (a LAN pair and a
hairpinned one); if each side completed a different one, each would hold
half of two connections. So one side *nominates* (ICE's controlling
agent: the initiator, or the random-NAPT side of a spray): it takes the
first flow that shows the peer's segments and answers no other flow
(nothing of it then acks the peer's ISN elsewhere). The other side
completes only the flow its peer acked, i.e. ESTABLISHED, except when it
has exactly one flow (then there is nothing to confuse) and may complete
on the peer's SYN.

**Complete on the peer's SYN** (``PairPlan.early``). Both ISNs came
through the CCS, so the peer's SYN with its announced ISN tells as much as
its SYN-ACK would, half a round trip sooner: answer it with a SYN-ACK and
an ACK (the ACK takes our gateway's entry from SYN_RECV to ESTABLISHED) and
hand the flow off. The peer may not have got our SYN; until a segment of
the peer acks it, the machine resends our SYN (CONFIRMING: a SYN passes
our gateway in any state, and the far one takes it as the simultaneous-open
SYN it missed; docs/punch.md).

**Never a storm.** A RST (from the peer, its gateway, or ours) backs its
pair off: the next SYN waits 0.2, 0.4, 0.8, then 1.6 s; a pair whose
opener the RST undid sends one fresh opener first. Every pair has a hard
cap of segments, and the attempt one in all (``Limits``); the counts are
in ``stats`` and in the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from fastpunch._engine import (
    Flags,
    FlowEvent,
    FlowState as TcpState,
    FlowTracker,
    Reply,
    Segment,
    TCPOptions,
    seq_before,
)

__all__ = ["PunchMachine", "PairPlan", "SprayPlan", "Mode", "Limits", "Send", "SendBatch",
           "Outcome", "MachineState", "Established", "TcpOptionsOffer", "Failure",
           "PairStats", "acks", "late_bytes"]

MIN_GAP = 0.002           # the full SYN at least this long after its opener
MAX_BACKOFF_STEPS = 3     # 0.2 s * 2**3 = 1.6 s between SYNs of a pair that keeps drawing RSTs
MAX_EVENTS = 400          # events kept per attempt (spray's SYNs are counted, not listed)
LATE_LIMIT = 1 << 20      # bytes late_bytes takes at most (a peer's first flight is ~15 KB)


class Mode(enum.Enum):
    OPEN = "open"          # SYN out; the peer's SYN answered with SYN-ACK (simultaneous open)
    ANSWER = "answer"      # the nat method's responder: SYN-ACK to the peer's announced SYN


class MachineState(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"        # a flow is done: hand it off (``handoff``), then ``handed_off``
    CONFIRMING = "confirming"    # handed off on the peer's SYN: watching for its ack of ours
    DONE = "done"
    FAILED = "failed"


class Failure(str, enum.Enum):
    """Why an attempt ended without a connection: stable words for reports."""
    TIMEOUT = "timeout"                  # nothing completed before the deadline
    EXHAUSTED = "exhausted"              # every pair spent its budget (or the attempt its own)
    STOPPED = "stopped"                  # the caller stopped it (the peer left, cancelled)
    NO_PAIRS = "no-pairs"                # nothing to try
    HANDOFF = "handoff-failed"           # a flow completed, its kernel socket could not be made
    FAULT = "error"                      # the driver around the machine failed


@dataclass(frozen=True)
class Limits:
    """Hard caps. A pair's own sends (SYNs, openers, resent SYN-ACKs, the
    confirmation's SYNs) and its answers to what it receives (SYN-ACK, ACK)
    are capped apart, so that a pair that spent its SYNs can still answer
    the peer's SYN when it finally comes."""
    per_pair: int = 24         # segments one pair sends on its own
    total: int = 256           # the same, every pair together (spray's apart)
    replies_per_pair: int = 8  # answers one pair sends
    replies: int = 64          # answers, every pair together
    spray: int = 12_000        # SYNs a spray may send
    flows: int = 64            # flows at most (announced pairs + peer-reflexive + spray hits)
    resend: float = 0.2        # seconds between a pair's SYNs
    nominate_within: float = 1.0   # a nominated flow that has not completed by then is dropped


@dataclass(frozen=True)
class TcpOptionsOffer:
    """What our SYNs carry (the MSS is per pair: from the route toward it)."""
    wscale: Optional[int] = 7
    sack_permitted: bool = True
    timestamps: bool = True
    rcv_wnd: int = 64240


@dataclass(frozen=True)
class PairPlan:
    """One candidate pair to drive: from ``local`` toward ``remote``."""
    local: tuple                       # (our address, our port)
    remote: tuple                      # (the peer's candidate address, port)
    policy: str = "symmetric"          # the strategy that added it (the report says)
    kind: str = ""                     # e.g. "host-host", "srflx-srflx"
    priority: int = 0
    mode: Mode = Mode.OPEN
    start: float = 0.0                 # its first full SYN (or SYN-ACK) no earlier
    opener_ttl: int = 0                # > 0: first a SYN with this TTL, opener_lead before start
    opener_lead: float = 0.0
    opener_to: Optional[tuple] = None  # spoof: the opener goes there instead of remote
    mirror_to: Optional[tuple] = None  # spoof: every SYN-ACK also goes there with opener_ttl
    early: bool = False                # may complete on the peer's SYN (see the module doc)
    mss: int = 1460                    # what our SYN announces: the route's MTU - 40

    @property
    def key(self) -> tuple:
        return (self.local[1], self.remote[0], self.remote[1])


@dataclass(frozen=True)
class SprayPlan:
    """Birthday-style probing (``fastpunch.punch.spray`` says when). One of:

    * ``probe_ports`` > 0: from our one ``local`` port, SYNs toward that many
      fresh random ports of ``remote_ip`` every ``round`` s;
    * ``sources``: SYNs from each of these ports of ours toward
      ``remote_port`` every ``round`` s (new mappings in our random NAT)."""
    local_ip: str
    remote_ip: str
    local_port: int = 0
    remote_port: int = 0
    probe_ports: int = 0
    sources: tuple = ()
    round: float = 0.25
    start: float = 0.0
    mss: int = 1460
    low: int = 1024
    high: int = 65535


@dataclass(frozen=True)
class Send:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: Optional[TCPOptions] = None
    ttl: int = 64
    payload: bytes = b""

    @property
    def flags_str(self) -> str:
        return _flags(self.flags)


@dataclass(frozen=True)
class SendBatch:
    """Many SYNs from one template: ``sports`` or ``dports`` vary."""
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    flags: int
    window: int
    options: Optional[TCPOptions]
    sports: tuple = ()
    dports: tuple = ()

    def __len__(self) -> int:
        return len(self.sports or self.dports)


Output = Union[Send, SendBatch]


@dataclass(frozen=True)
class Established:
    """Everything the kernel needs to take an established flow over
    (``fastpunch.handoff.repair_socket``)."""
    local: tuple            # (ip, port)
    peer: tuple             # (ip, port) as seen from here (after our NAT's translation)
    snd_nxt: int            # our next sequence number (ISS + 1 after the handshake)
    rcv_nxt: int            # the peer's next expected (IRS + 1)
    mss: int                # the peer's MSS (what we may send)
    snd_wscale: Optional[int]     # the peer's window scale (None: not negotiated)
    rcv_wscale: Optional[int]     # ours
    sack: bool
    timestamps: bool
    snd_wnd: int            # the peer's window in bytes (scaled)
    rcv_wnd: int            # our advertised window in bytes
    tsval: int = 0          # our current TSval clock (the kernel continues from it)
    received: bytes = b""   # peer data the engine took (and acked) before the hand-off:
                            # it goes into the socket's receive queue, ahead of the rest
    advmss: int = 0         # the MSS our SYN announced (0: the kernel's own)


@dataclass
class PairStats:
    """One flow's counts, for the report."""
    local: tuple
    remote: tuple
    policy: str
    kind: str
    priority: int
    sent: int = 0               # every segment of the flow, answers included
    replies: int = 0            # of them, answers to a received segment
    received: int = 0
    rsts: int = 0
    outcome: str = ""           # "won", "dead: ...", "lost", "" (still open at the end)

    def __str__(self) -> str:
        return (f"{self.policy:9s} {self.kind:18s} {self.local[0]}:{self.local[1]} -> "
                f"{self.remote[0]}:{self.remote[1]}  sent {self.sent} seen {self.received}"
                f"{f' rst {self.rsts}' if self.rsts else ''}  {self.outcome}").rstrip()


@dataclass(frozen=True)
class Outcome:
    pair: PairStats
    early: bool                 # completed on the peer's SYN
    at: float


# -- events -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    t: float

    def text(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Sent(Event):
    pair: str
    flags: str
    ttl: int = 64
    count: int = 1
    what: str = ""

    def text(self) -> str:
        n = f"{self.count} x " if self.count > 1 else ""
        ttl = f" TTL {self.ttl}" if self.ttl != 64 else ""
        return f"sent {n}[{self.flags}]{ttl} {self.pair}{f' ({self.what})' if self.what else ''}"


@dataclass(frozen=True)
class Received(Event):
    pair: str
    flags: str
    seq: int
    ack: int
    length: int
    verdict: str

    def text(self) -> str:
        return (f"recv [{self.flags}] seq={self.seq} ack={self.ack} len={self.length} "
                f"{self.pair} -> {self.verdict}")


@dataclass(frozen=True)
class Ignored(Event):
    source: str
    flags: str
    why: str

    def text(self) -> str:
        return f"ignored [{self.flags}] from {self.source}: {self.why}"


@dataclass(frozen=True)
class Backoff(Event):
    pair: str
    rsts: int
    next_in: float

    def text(self) -> str:
        return f"RST on {self.pair} (#{self.rsts}): next SYN in {self.next_in * 1000:.0f} ms"


@dataclass(frozen=True)
class PairDead(Event):
    pair: str
    why: str

    def text(self) -> str:
        return f"gave up {self.pair}: {self.why}"


@dataclass(frozen=True)
class NewFlow(Event):
    pair: str
    why: str

    def text(self) -> str:
        return f"new flow {self.pair}: {self.why}"


@dataclass(frozen=True)
class Nominated(Event):
    pair: str

    def text(self) -> str:
        return f"nominated {self.pair}"


@dataclass(frozen=True)
class Completed(Event):
    pair: str
    early: bool

    def text(self) -> str:
        how = "on the peer's SYN (its announced ISN): sent SYN-ACK, ACK" if self.early \
            else "ESTABLISHED"
        return f"complete {self.pair}: {how}"


@dataclass(frozen=True)
class Confirmed(Event):
    pair: str
    by: str

    def text(self) -> str:
        return f"the peer confirmed {self.pair}: {self.by}"


@dataclass(frozen=True)
class LateBytes(Event):
    pair: str
    count: int

    def text(self) -> str:
        return f"took {self.count} bytes that came during the hand-off"


@dataclass(frozen=True)
class Ended(Event):
    state: str
    reason: str = ""

    def text(self) -> str:
        return f"{self.state}{f': {self.reason}' if self.reason else ''}"


def _flags(flags: int) -> str:
    return "".join(c for bit, c in ((Flags.FIN, "F"), (Flags.SYN, "S"), (Flags.RST, "R"),
                                    (Flags.PSH, "P"), (Flags.ACK, "A")) if flags & bit) or "."


def acks(seg: Segment, iss: int) -> bool:
    """The segment acknowledges our SYN (any ACK at or past ISS + 1)."""
    return bool(seg.flags & Flags.ACK) and not seg.flags & Flags.RST and \
        not seq_before(seg.ack, (iss + 1) & 0xFFFFFFFF) and \
        seq_before(seg.ack, (iss + 1 + 0x80000000) & 0xFFFFFFFF)


def late_bytes(segments: Sequence[Segment], rcv_nxt: int, limit: int = LATE_LIMIT) -> bytes:
    """The in-order stream bytes from ``rcv_nxt`` on that ``segments`` hold,
    whatever order they came in (SYNs and RSTs carry no stream data)."""
    expected, out = rcv_nxt, bytearray()
    progress = True
    while progress and len(out) < limit:
        progress = False
        for seg in segments:
            n = seg.payload_length
            if not n or seg.flags & (Flags.SYN | Flags.RST):
                continue
            offset = (expected - seg.seq) & 0xFFFFFFFF
            if offset < n:                       # covers `expected`
                take = seg.payload[offset:offset + limit - len(out)]
                out += take
                expected = (expected + len(take)) & 0xFFFFFFFF
                progress = True
    return bytes(out)


class _Flow:
    """One crafted flow's state (the machine's own; never handed out)."""

    def __init__(self, plan: PairPlan, iss: int, offer: TcpOptionsOffer) -> None:
        self.plan = plan
        self.tracker = FlowTracker(iss, offer.rcv_wnd, offer.wscale)
        self.stats = PairStats(plan.local, plan.remote, plan.policy, plan.kind, plan.priority)
        self.name = f"{plan.local[1]}->{plan.remote[0]}:{plan.remote[1]}"
        self.started = False          # its first full segment has gone
        self.opener_due = plan.opener_ttl > 0
        self.full_at = plan.start     # its next full SYN no earlier (after an opener)
        self.next_at: Optional[float] = plan.start - plan.opener_lead if self.opener_due \
            else plan.start
        self.rsts = 0
        self.opener_ok_at = 0.0       # no opener at once after a RST before this (see _reset)
        self.opener_last = False      # the last segment of its own was an opener
        self.quiet = False            # spent its budget: sends nothing more, still listens
        self.dead = False             # given up: neither sends nor listens
        self.peer_options: Optional[TCPOptions] = None
        self.ts_ok = False
        self.ts_recent = 0
        self.received = bytearray()   # in-order data taken (and acked) by the tracker
        self.left: list = []          # segments after the completing one (late_bytes)

    @property
    def state(self) -> TcpState:
        return self.tracker.state


class PunchMachine:
    """All crafted flows of one attempt. See the module docstring."""

    def __init__(self, *, iss: int, peer_isn: Optional[int], nominator: bool, deadline: float,
                 confirm_until: Optional[float] = None,
                 offer: TcpOptionsOffer = TcpOptionsOffer(),
                 peer_offer: Optional[TCPOptions] = None, limits: Limits = Limits(),
                 peer_addrs: Sequence[str] = (), prflx: bool = True,
                 random: Optional[Callable[[int, int], int]] = None,
                 keep: bool = False, tracer: Optional[Callable] = None) -> None:
        """``peer_isn`` None: a peer whose ISN nobody announced (a kernel
        socket: the engine's live tests); any ISN is taken, and nothing
        completes on a SYN alone. ``keep``: the completed flow is not handed
        off but stays the machine's, for data (``send_data``/``take_data``).
        ``tracer``: called with every event as it happens (go-libp2p's
        holepunch tracer is the model); what it raises is its own business
        and is dropped."""
        self.iss = iss & 0xFFFFFFFF
        self.peer_isn = None if peer_isn is None else peer_isn & 0xFFFFFFFF
        self.keep = keep
        self.tracer = tracer
        self._data = bytearray()
        self._now = 0.0
        self.nominator = nominator
        self.deadline = deadline
        self.confirm_until = deadline if confirm_until is None else confirm_until
        self.offer = offer
        self.peer_offer = peer_offer          # the peer's announced options (nat method)
        self.limits = limits
        self.peer_addrs = set(peer_addrs)
        self.prflx = prflx
        self.randint = random
        self.state = MachineState.RUNNING
        self.failure: Optional[Failure] = None
        self.reason = ""
        self.events: list = []
        self.flows: dict = {}                 # key -> _Flow
        self.pairs: list = []                 # PairStats of every flow, in creation order
        self.sent = 0                         # segments of pairs (spray apart), answers included
        self.replies = 0                      # of them, answers
        self.spray_sent = 0
        self.seen = 0                         # segments received, all flows
        self.ignored = 0
        self.winner: Optional[_Flow] = None   # nominated (nominator) or completed
        self.nominated_at = 0.0
        self.outcome: Optional[Outcome] = None
        self.confirmed = False
        self._sprays: list = []               # [plan, next_at, tried ports or None, sources]
        self._spray_leader_taken = False

    # -- building the attempt ------------------------------------------------------
    def add(self, plan: PairPlan) -> None:
        if self.state is not MachineState.RUNNING:
            raise RuntimeError("pairs are added before the attempt ends")
        if plan.key in self.flows:
            return                            # the same flow from two policies: once
        if len(self.flows) >= self.limits.flows:
            return
        flow = _Flow(plan, self.iss, self.offer)
        self.flows[plan.key] = flow
        self.pairs.append(flow.stats)

    def add_spray(self, plan: SprayPlan) -> None:
        if plan.probe_ports and self.randint is None:
            raise ValueError("a probing spray needs the injected random source")
        if not plan.probe_ports and not plan.sources:
            raise ValueError("a spray probes ports or sends from sources")
        tried = set() if plan.probe_ports else None
        self._sprays.append([plan, plan.start, tried, frozenset(plan.sources)])

    # -- inputs ----------------------------------------------------------------------
    def receive(self, seg: Segment, now: float) -> list:
        """One segment the receiver saw; returns what to send now."""
        self._now = now
        self.seen += 1
        out: list = []
        if self.state in (MachineState.DONE, MachineState.FAILED):
            return out
        if self.state is MachineState.CONFIRMING:
            self._confirming(seg, now, out)
            return out
        key = (seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        if self.state is MachineState.COMPLETE:
            if flow is self.winner and self.keep:
                self._data_input(flow, seg, now, out)
            elif flow is self.winner:
                self.winner.left.append(seg)
            return out
        if flow is None:
            flow = self._new_flow(seg, now)
            if flow is None:
                return out
        self._input(flow, seg, now, out)
        return out

    def advance(self, now: float) -> list:
        """Timers: whatever is due at ``now``."""
        self._now = now
        out: list = []
        if self.state is MachineState.RUNNING:
            if now >= self.deadline:
                self._fail(Failure.TIMEOUT, now, "nothing completed before the deadline")
                return out
            w = self.winner
            if w is not None and now >= self.nominated_at + self.limits.nominate_within:
                self._kill(w, now, "nominated, but it did not complete")
                self.winner = None
            for flow in list(self.flows.values()):
                if not (flow.dead or flow.quiet) and flow.next_at is not None and \
                        flow.next_at <= now:
                    self._due(flow, now, out)
            for spray in self._sprays:
                if spray[1] is not None and spray[1] <= now:
                    self._spray_round(spray, now, out)
            if self._exhausted():
                self._fail(Failure.EXHAUSTED, now, f"every pair spent its budget "
                                                   f"({self.sent} segments, "
                                                   f"{self.spray_sent} spray)")
        elif self.state is MachineState.CONFIRMING:
            w = self.winner
            if now >= self.confirm_until:
                self._note(Ended(now, "done", "the peer did not confirm before the slot ended"))
                self.state = MachineState.DONE
            elif w.next_at is not None and w.next_at <= now:
                self._emit(w, self._syn(w), now, out, what="confirm")
                w.next_at = now + self.limits.resend
        return out

    def stop(self, now: float, reason: str = "stopped") -> None:
        """End the attempt from outside (the peer left, the caller gave up)."""
        if self.state is MachineState.RUNNING:
            self._fail(Failure.STOPPED, now, reason)
        elif self.state is MachineState.CONFIRMING:
            self.state = MachineState.DONE
            self._note(Ended(now, "done", reason))

    def handoff_failed(self, now: float, reason: str) -> None:
        """The driver could not make the kernel socket of the winner
        (COMPLETE): the attempt failed, and the report says so (not "won")."""
        if self.state is not MachineState.COMPLETE:
            return
        self.winner.stats.outcome = "completed, hand-off failed"
        self.outcome = None
        self._fail(Failure.HANDOFF, now, reason)

    def fault(self, now: float, reason: str) -> None:
        """The driver failed (a bug, an unexpected error): the attempt ends
        here, whatever its state, and says why."""
        if self.state in (MachineState.RUNNING, MachineState.COMPLETE):
            self.outcome = None
            self._fail(Failure.FAULT, now, reason)
        elif self.state is MachineState.CONFIRMING:
            self.state = MachineState.DONE
            self._note(Ended(now, "done", reason))

    def handed_off(self, now: float) -> None:
        """The driver made the kernel socket of the winner (COMPLETE): from
        here the kernel owns the flow; the machine only confirms (early)."""
        if self.state is not MachineState.COMPLETE:
            raise RuntimeError(f"handed_off in state {self.state.value}")
        w = self.winner
        for seg in w.left:
            if acks(seg, self.iss):
                self.confirmed = True
        w.left.clear()
        if self.outcome.early and not self.confirmed and now < self.confirm_until:
            self.state = MachineState.CONFIRMING
            w.next_at = now + self.limits.resend
        else:
            if self.outcome.early:
                self._note(Confirmed(now, w.name, "during the hand-off"))
            self.state = MachineState.DONE

    # -- what it knows -----------------------------------------------------------------
    @property
    def next_timer(self) -> Optional[float]:
        if self.state is MachineState.RUNNING:
            times = [f.next_at for f in self.flows.values()
                     if not (f.dead or f.quiet) and f.next_at is not None]
            times += [s[1] for s in self._sprays if s[1] is not None]
            if self.winner is not None:
                times.append(self.nominated_at + self.limits.nominate_within)
            times.append(self.deadline)
            return min(times)
        if self.state is MachineState.CONFIRMING:
            return min(self.confirm_until, self.winner.next_at or self.confirm_until)
        return None

    def handoff(self, now: float) -> Established:
        """The winner's state for the kernel (state COMPLETE)."""
        if self.state is not MachineState.COMPLETE:
            raise RuntimeError(f"no completed flow to hand off (state {self.state.value})")
        w = self.winner
        t = w.tracker
        peer = w.peer_options
        scaled = bool(t.wscale_ok)
        return Established(
            local=w.plan.local, peer=w.plan.remote, snd_nxt=t.snd_nxt, rcv_nxt=t.rcv_nxt,
            mss=(peer.mss if peer is not None and peer.mss else 536),
            snd_wscale=t.snd_wscale if scaled else None,
            rcv_wscale=t.rcv_wscale if scaled else None,
            sack=bool(self.offer.sack_permitted and peer is not None and peer.sack_permitted),
            timestamps=w.ts_ok, snd_wnd=max(t.snd_wnd, 1), rcv_wnd=t.rcv_wnd,
            tsval=self._tsval(now), received=bytes(w.received), advmss=w.plan.mss)

    # -- a kept flow's data (keep=True: the engine without a kernel socket) -------------
    def send_data(self, data: bytes, now: float) -> list:
        """Segments carrying ``data`` on the completed flow, each at most the
        smaller MSS (less the timestamp option when both use it). No
        retransmission: lab and test use."""
        if self.state is not MachineState.COMPLETE or not self.keep:
            raise RuntimeError("data goes on a completed, kept flow")
        w, out = self.winner, []
        peer_mss = w.peer_options.mss if w.peer_options and w.peer_options.mss else 536
        limit = min(w.plan.mss, peer_mss) - (12 if w.ts_ok else 0)
        for off in range(0, len(data), limit):
            chunk = bytes(data[off:off + limit])
            r = w.tracker.send(len(chunk))
            out.append(Send(w.plan.local[0], w.plan.remote[0], w.plan.local[1], w.plan.remote[1],
                            r.seq, r.ack, int(r.flags), r.window, self._options(w, False, now),
                            64, chunk))
            w.stats.sent += 1
        return out

    def take_data(self, n: Optional[int] = None) -> bytes:
        """In-order bytes received on the kept flow (up to ``n``)."""
        n = len(self._data) if n is None else n
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def abort(self, now: float) -> list:
        """A RST with our next sequence number on the kept flow."""
        w = self.winner
        if w is None or w.state is not TcpState.ESTABLISHED:
            return []
        w.stats.sent += 1
        return [Send(w.plan.local[0], w.plan.remote[0], w.plan.local[1], w.plan.remote[1],
                     w.tracker.snd_nxt, 0, int(Flags.RST), 0)]

    @property
    def pending_data(self) -> int:
        return len(self._data)

    @property
    def all_acked(self) -> bool:
        t = self.winner.tracker
        return t.snd_una == t.snd_nxt

    @property
    def reset(self) -> bool:
        """The kept flow was reset by the peer."""
        return self.winner is not None and self.winner.state is TcpState.RESET

    def _data_input(self, flow: _Flow, seg: Segment, now: float, out: list) -> None:
        flow.stats.received += 1
        if flow.ts_ok and seg.options.timestamp is not None:
            flow.ts_recent = seg.options.timestamp[0]
        before = flow.tracker.rcv_nxt
        event, reply = flow.tracker.input(seg)
        advanced = (flow.tracker.rcv_nxt - before) & 0xFFFFFFFF
        if seg.payload_length and advanced >= seg.payload_length:
            self._data += seg.payload
        if reply is not None and event != FlowEvent.RESET:
            # the data phase is not punching: its ACKs are outside the budgets
            out.append(Send(flow.plan.local[0], flow.plan.remote[0], flow.plan.local[1],
                            flow.plan.remote[1], reply.seq, reply.ack, int(reply.flags),
                            reply.window, self._options(flow, False, now)))
            flow.stats.sent += 1

    def settle(self, to: tuple, ttl: int, now: float) -> list:
        """A SYN-ACK and an ACK of the completed flow toward ``to`` with
        ``ttl`` (spoof: our firewall's entry for the flow saw our SYN and the
        peer's SYN or SYN-ACK, SYN_SENT2 or SYN_RECV, where Linux conntrack
        takes a FIN in the reply direction for INVALID and drops the entry
        after 60 s of quiet; these complete its handshake, on the same
        short-lived path as the opener)."""
        if self.state is not MachineState.COMPLETE:
            raise RuntimeError("settle needs a completed flow")
        w, out = self.winner, []
        ack = w.tracker.ack()
        self._emit(w, Reply(Flags.SYN | Flags.ACK, self.iss, ack.ack, ack.window), now, out,
                   ttl=ttl, to=to, what="settles our firewall's entry", count=False)
        self._emit(w, ack, now, out, ttl=ttl, to=to, count=False)
        return out

    def late_data(self, more: Sequence[Segment] = (), limit: int = LATE_LIMIT) -> bytes:
        """The peer's in-order bytes that came after the completing segment
        (kept) and in ``more`` (drained by the driver just before the socket
        joins the flow): the kernel had no socket for them yet and dropped
        them; the hand-off queues them. Also notes whether any of them acked
        our SYN (nothing then to confirm). Only the winner's own segments
        count: the driver drains one socket for every flow, and the peer's
        bytes or SYN-ACK on another pair (same ISNs) are not this stream's."""
        w = self.winner
        w.left.extend(s for s in more if (s.dport, s.src, s.sport) == w.plan.key)
        out = late_bytes(w.left, w.tracker.rcv_nxt, limit)
        if out:
            self._note(LateBytes(self._now, w.name, len(out)))
        return out

    # -- internals -----------------------------------------------------------------------
    def _note(self, event: Event) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        if self.tracer is not None:
            try:
                self.tracer(event)
            except Exception:          # a tracer must not break a punch
                pass

    def _tsval(self, now: float) -> int:
        return int(now * 1000) & 0xFFFFFFFF

    def _options(self, flow: _Flow, syn: bool, now: float) -> Optional[TCPOptions]:
        o = self.offer
        if syn:
            return TCPOptions(mss=flow.plan.mss, wscale=o.wscale, sack_permitted=o.sack_permitted,
                              timestamp=(self._tsval(now), flow.ts_recent) if o.timestamps
                              else None)
        if flow.ts_ok:
            return TCPOptions(timestamp=(self._tsval(now), flow.ts_recent))
        return None

    def _syn(self, flow: _Flow) -> Reply:
        return Reply(Flags.SYN, self.iss, 0, flow.tracker.ack().window)

    def _emit(self, flow: _Flow, r: Reply, now: float, out: list, *, ttl: int = 64,
              to: Optional[tuple] = None, what: str = "", count: bool = True) -> bool:
        """Queue one segment of a flow; False (and nothing queued) when its or
        the attempt's budget is spent (``count``: its own sends, else its
        answers; see Limits)."""
        lim = self.limits
        own = flow.stats.sent - flow.stats.replies
        if count:
            if own >= lim.per_pair or self.sent - self.replies >= lim.total:
                if not flow.quiet:
                    flow.quiet = True
                    why = f"its {lim.per_pair} segments" if own >= lim.per_pair else \
                        f"the attempt's {lim.total}"
                    self._note(PairDead(now, flow.name, f"sent {why}; listening only"))
                flow.next_at = None
                return False
        elif flow.stats.replies >= lim.replies_per_pair or self.replies >= lim.replies:
            self._note(Ignored(now, flow.name, _flags(r.flags), "answer budget spent: not sent"))
            return False
        dst, dport = flow.plan.remote if to is None else to
        syn = bool(r.flags & Flags.SYN)
        out.append(Send(flow.plan.local[0], dst, flow.plan.local[1], dport, r.seq, r.ack,
                        int(r.flags), r.window, self._options(flow, syn, now), ttl))
        flow.stats.sent += 1
        self.sent += 1
        if not count:
            flow.stats.replies += 1
            self.replies += 1
        where = f"to {dst}:{dport}" if to is not None else ""
        self._note(Sent(now, flow.name, _flags(r.flags), ttl,
                        what=", ".join(x for x in (what, where) if x)))
        mirror = flow.plan.mirror_to
        if to is None and mirror is not None and r.flags & (Flags.SYN | Flags.ACK) == \
                Flags.SYN | Flags.ACK:
            # spoof: our SYN-ACK also goes the short way, to our own firewall
            out.append(Send(flow.plan.local[0], mirror[0], flow.plan.local[1], mirror[1],
                            r.seq, r.ack, int(r.flags), r.window,
                            self._options(flow, True, now), flow.plan.opener_ttl or 2))
            flow.stats.sent += 1            # the mirror rides on its SYN-ACK's budget
            self.sent += 1
            if not count:
                flow.stats.replies += 1
                self.replies += 1
        return True

    def _due(self, flow: _Flow, now: float, out: list) -> None:
        p = flow.plan
        if flow.opener_due:
            flow.opener_due = False
            if self._emit(flow, self._opening_syn(flow), now, out, ttl=p.opener_ttl,
                          to=p.opener_to, what="opens our mapping only"):
                flow.opener_last = True
                flow.next_at = max(flow.full_at, now + MIN_GAP)
            return
        flow.opener_last = False
        interval = self.limits.resend * (1 << min(flow.rsts, MAX_BACKOFF_STEPS))
        if p.mode is Mode.ANSWER:
            if flow.state is TcpState.CLOSED:
                if self.peer_isn is None:
                    raise ValueError("the nat method's SYN-ACK needs the peer's ISN")
                r = flow.tracker.assume_syn(self.peer_isn, 65535,
                                            self.peer_offer.wscale if self.peer_offer else None)
                flow.peer_options = self.peer_offer
                flow.ts_ok = self.offer.timestamps and self.peer_offer is not None and \
                    self.peer_offer.timestamp is not None
            else:
                r = Reply(Flags.SYN | Flags.ACK, self.iss, flow.tracker.rcv_nxt,
                          flow.tracker.ack().window)
            if self._emit(flow, r, now, out):
                flow.started = True
                flow.next_at = now + interval
            return
        if flow.state is TcpState.CLOSED:
            flow.tracker.syn_sent()
        sent = True
        if flow.state is TcpState.SYN_SENT:
            sent = self._emit(flow, self._syn(flow), now, out,
                              what="" if not flow.started else "resent")
            flow.started = flow.started or sent
        elif flow.state is TcpState.SYN_RECEIVED and self._may_answer(flow):
            # simultaneous open: our SYN-ACK (or the peer's answer) was lost
            sent = self._emit(flow, Reply(Flags.SYN | Flags.ACK, self.iss, flow.tracker.rcv_nxt,
                                          flow.tracker.ack().window), now, out, what="resent")
        if sent:
            flow.next_at = now + interval

    def _opening_syn(self, flow: _Flow) -> Reply:
        if flow.state is TcpState.CLOSED:
            flow.tracker.syn_sent()
        return self._syn(flow)

    def _may_answer(self, flow: _Flow) -> bool:
        """Whether this flow may ack the peer's ISN: the nominator answers
        only the flow it nominated; the other side answers every flow."""
        if not self.nominator:
            return True
        return self.winner is None or self.winner is flow

    def _single(self) -> bool:
        return len(self.flows) == 1 and not self._sprays

    def _new_flow(self, seg: Segment, now: float) -> Optional[_Flow]:
        """A segment of no flow: a spray's hit, a peer-reflexive SYN, or noise."""
        src = f"{seg.src}:{seg.sport}"
        spray = self._spray_for(seg)
        if spray is not None:
            plan, _, tried, _ = spray
            if seg.flags & Flags.RST:
                return self._ignore(seg, now, src, "a RST is not a hit")
            if not self._peers(seg):
                return self._ignore(seg, now, src, "not the peer's announced ISN")
            if tried is not None and seg.sport not in tried:
                return self._ignore(seg, now, src, "a port we never probed")
            if tried is None and self.nominator and self._spray_leader_taken:
                return None                   # a later hit: the first one is the flow
            if len(self.flows) >= self.limits.flows:
                return self._ignore(seg, now, src, "flow limit reached")
            self._spray_leader_taken = True
            local = (plan.local_ip, seg.dport)
            pair = PairPlan(local, (seg.src, seg.sport), "spray", "spray", 0, Mode.OPEN,
                            now, mss=plan.mss)
            flow = _Flow(pair, self.iss, self.offer)
            flow.tracker.syn_sent()           # its SYN already left in a batch
            flow.started = True
            flow.next_at = now + self.limits.resend
            self.flows[pair.key] = flow
            self.pairs.append(flow.stats)
            self._note(NewFlow(now, flow.name, f"answered [{seg.flags_str}]"))
            return flow
        if not self.prflx:
            return self._ignore(seg, now, src, "no flow")
        if seg.src not in self.peer_addrs or seg.flags & (Flags.SYN | Flags.ACK | Flags.RST) \
                != Flags.SYN or self.peer_isn is None or seg.seq != self.peer_isn:
            return self._ignore(seg, now, src, "no flow")
        local_ports = {f.plan.local[1]: f.plan.local[0] for f in self.flows.values()}
        if seg.dport not in local_ports:
            return self._ignore(seg, now, src, "not our port")
        if self.nominator and self.winner is not None:
            return None                       # nominated another: no answer elsewhere
        if len(self.flows) >= self.limits.flows:
            return self._ignore(seg, now, src, "flow limit reached")
        # the peer's SYN from a port it did not announce, with its ISN: its
        # NAT chose another mapping (an open host sees every one); answering
        # it is the only way to this flow. It belongs to the strategy whose
        # flow on that port drew it (a forced "predict" reports "predict")
        kin = next(f.plan for f in self.flows.values() if f.plan.local[1] == seg.dport)
        pair = PairPlan((local_ports[seg.dport], seg.dport), (seg.src, seg.sport), kin.policy,
                        "prflx", 0, Mode.OPEN, now, mss=kin.mss)
        flow = _Flow(pair, self.iss, self.offer)
        flow.started = True
        self.flows[pair.key] = flow
        self.pairs.append(flow.stats)
        self._note(NewFlow(now, flow.name, "the peer's SYN from an unannounced port"))
        return flow

    def _spray_for(self, seg: Segment):
        for spray in self._sprays:
            plan, _, tried, sources = spray
            if seg.src != plan.remote_ip:
                continue
            if tried is not None and seg.dport == plan.local_port:
                return spray
            if tried is None and seg.sport == plan.remote_port and seg.dport in sources:
                return spray
        return None

    def _peers(self, seg: Segment) -> bool:
        """A SYN or SYN-ACK that is the peer's: its announced ISN."""
        return bool(seg.flags & Flags.SYN) and self.peer_isn is not None and \
            seg.seq == self.peer_isn

    def _ignore(self, seg: Segment, now: float, src: str, why: str) -> None:
        self.ignored += 1
        self._note(Ignored(now, src, seg.flags_str, why))
        return None

    def _kill(self, flow: _Flow, now: float, why: str) -> None:
        if not flow.dead:
            flow.dead = True
            flow.stats.outcome = f"dead: {why}"
            self._note(PairDead(now, flow.name, why))

    def _exhausted(self) -> bool:
        """Nothing can complete any more: every flow given up and every spray
        over. (A flow that only spent its budget still listens: the peer's
        answer to its last SYN may be on the way.)"""
        return self.winner is None and all(f.dead for f in self.flows.values()) and \
            all(s[1] is None for s in self._sprays)

    def _fail(self, failure: Failure, now: float, reason: str) -> None:
        self.state = MachineState.FAILED
        self.failure, self.reason = failure, reason
        for f in self.flows.values():
            if not f.dead and not f.stats.outcome:
                f.stats.outcome = "no answer" if not f.stats.received else f"ended {f.state.name}"
        self._note(Ended(now, failure.value, reason))

    def _input(self, flow: _Flow, seg: Segment, now: float, out: list) -> None:
        flow.stats.received += 1
        if flow.dead:
            return
        name = flow.name
        if seg.flags & Flags.SYN and self.peer_isn is not None and seg.seq != self.peer_isn:
            # not the peer's crafted flow: a kernel socket of its previous
            # strategy answering our SYN with its own ISN, or anyone else's
            self.ignored += 1
            self._note(Ignored(now, name, seg.flags_str,
                               f"seq {seg.seq} is not the announced ISN {self.peer_isn}"))
            return
        if self.nominator and self.winner is not None and self.winner is not flow:
            self._note(Received(now, name, seg.flags_str, seg.seq, seg.ack, seg.payload_length,
                                "watched (another flow is nominated)"))
            return
        if seg.flags & Flags.SYN:
            flow.peer_options = seg.options
            flow.ts_ok = self.offer.timestamps and seg.options.timestamp is not None
        if flow.ts_ok and seg.options.timestamp is not None:
            flow.ts_recent = seg.options.timestamp[0]
        was = flow.state
        before = flow.tracker.rcv_nxt
        if flow.plan.kind == "prflx" and was is TcpState.CLOSED:
            # its first segment, the peer's SYN: answer as a passive open
            reply = flow.tracker.assume_syn(seg.seq, seg.window, seg.options.wscale)
            event = FlowEvent.NONE
        else:
            event, reply = flow.tracker.input(seg)
        self._note(Received(now, name, seg.flags_str, seg.seq, seg.ack, seg.payload_length,
                            event.name))
        advanced = (flow.tracker.rcv_nxt - before) & 0xFFFFFFFF
        if seg.payload_length and advanced >= seg.payload_length:
            flow.received += seg.payload
        if event == FlowEvent.RESET:
            self._reset(flow, now)
            return
        state = flow.state
        evidence = state in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED)
        if self.nominator and self.winner is None and evidence:
            self.winner, self.nominated_at = flow, now
            self._note(Nominated(now, name))
        if reply is not None and self._may_answer(flow):
            self._emit(flow, reply, now, out, count=False)
        early_ok = flow.plan.early and (self.nominator or self._single()) and \
            self.peer_isn is not None
        if was is TcpState.SYN_SENT and state is TcpState.SYN_RECEIVED and early_ok and \
                flow.tracker.rcv_nxt == (self.peer_isn + 1) & 0xFFFFFFFF:
            # complete on the peer's SYN: an ACK right behind our SYN-ACK
            # takes our gateway's entry from SYN_RECV (60 s before it
            # expires) to ESTABLISHED even if the peer's SYN-ACK never comes
            self._emit(flow, flow.tracker.ack(), now, out, count=False)
            self._complete(flow, now, early=True)
        elif state is TcpState.ESTABLISHED:
            self._complete(flow, now, early=False)
            if was is TcpState.SYN_SENT and acks(seg, self.iss):
                self.confirmed = True

    def _reset(self, flow: _Flow, now: float) -> None:
        """Back off and start the flow over (the RST may have come from a
        gateway that met our SYN before the peer's own SYN opened it)."""
        flow.stats.rsts += 1
        if self.winner is flow:
            self.winner = None
        flow.tracker = FlowTracker(self.iss, self.offer.rcv_wnd, self.offer.wscale)
        if flow.plan.mode is Mode.OPEN:
            flow.tracker.syn_sent()
        if flow.opener_last and flow.next_at is not None and flow.next_at >= now:
            # it answers our opener (a gateway within its TTL): the full SYN
            # right behind it goes as planned
            self._note(Backoff(now, flow.name, flow.stats.rsts, flow.next_at - now))
            return
        flow.rsts += 1
        interval = self.limits.resend * (1 << min(flow.rsts - 1, MAX_BACKOFF_STEPS)) / 2
        # A RST from the far gateway closed our own mapping as it passed:
        # reopen it at once, before the peer's next SYN finds it closed and
        # draws a RST from our gateway in turn; the full SYN waits out the
        # backoff (0.1, 0.2, 0.4, 0.8 s after RSTs 1-4+). Once per backoff
        # step only: an opener that itself draws a RST (a gateway within its
        # TTL) waits for the next full SYN, or each RST would fire another.
        flow.full_at = now + interval
        if flow.plan.opener_ttl and not flow.quiet:
            flow.opener_due = True
            flow.next_at = now if now >= flow.opener_ok_at else max(now, flow.full_at - MIN_GAP)
            flow.opener_ok_at = flow.full_at
        elif not flow.quiet:
            flow.next_at = flow.full_at
        self._note(Backoff(now, flow.name, flow.rsts, interval))

    def _complete(self, flow: _Flow, now: float, early: bool) -> None:
        if self.keep:
            self._data += flow.received
            flow.received.clear()
        self.winner = flow
        self.state = MachineState.COMPLETE
        flow.stats.outcome = "won (early)" if early else "won"
        six = ":" in flow.plan.remote[0]
        for other in self.flows.values():
            if other is not flow and not other.dead and not other.stats.outcome:
                # (which family won, for a pair of the other one: the report's why)
                other.stats.outcome = "lost" if (":" in other.plan.remote[0]) == six else \
                    f"lost to the IPv{6 if six else 4} pair"
        self.outcome = Outcome(flow.stats, early, now)
        self._note(Completed(now, flow.name, early))

    def _confirming(self, seg: Segment, now: float, out: list) -> None:
        w = self.winner
        if (seg.dport, seg.src, seg.sport) != w.plan.key or not acks(seg, self.iss):
            return
        self.confirmed = True
        self._note(Confirmed(now, w.name, f"[{seg.flags_str}] ack={seg.ack}"))
        if seg.flags & Flags.SYN:
            # its SYN-ACK: ACK it, as the handshake would (the tracker, fed
            # nothing since the hand-off, still holds ISN + 1 both ways)
            self._emit(w, w.tracker.ack(), now, out, count=False)
        self.state = MachineState.DONE

    def _spray_round(self, spray: list, now: float, out: list) -> None:
        plan, _, tried, _ = spray
        if self.spray_sent >= self.limits.spray or now >= self.deadline:
            spray[1] = None
            return
        room = self.limits.spray - self.spray_sent
        opts = TCPOptions(mss=plan.mss, wscale=self.offer.wscale,
                          sack_permitted=self.offer.sack_permitted,
                          timestamp=(self._tsval(now), 0) if self.offer.timestamps else None)
        if tried is not None:
            ports = []
            span = plan.high - plan.low + 1
            while len(ports) < min(plan.probe_ports, room) and len(tried) < span:
                p = self.randint(plan.low, plan.high)
                if p not in tried:
                    tried.add(p)
                    ports.append(p)
            if not ports:
                spray[1] = None
                return
            batch = SendBatch(plan.local_ip, plan.remote_ip, plan.local_port, 0, self.iss,
                              int(Flags.SYN), self.offer.rcv_wnd, opts, dports=tuple(ports))
        else:
            batch = SendBatch(plan.local_ip, plan.remote_ip, 0, plan.remote_port, self.iss,
                              int(Flags.SYN), self.offer.rcv_wnd, opts,
                              sports=tuple(plan.sources[:room]))
        out.append(batch)
        self.spray_sent += len(batch)
        self._note(Sent(now, f"{plan.remote_ip}", "S", count=len(batch), what="spray"))
        spray[1] = now + plan.round
