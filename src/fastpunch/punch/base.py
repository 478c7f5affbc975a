"""What every strategy takes and gives back: the context of one rendezvous,
an attempt's record, the report, and the socket helpers they share."""

from __future__ import annotations

import socket
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from fastpunch.errors import FastpunchError
from fastpunch.netcheck.route import route_source as route_source  # (re-exported: one helper)
from fastpunch.proto.candidates import Candidate
from fastpunch.proto.kinds import CandidateKind, Filtering, Mapping, NatClass, Role

__all__ = ["PunchFailed", "Side", "PunchContext", "Attempt", "Report", "tie", "release",
           "free_port", "route_source", "abort"]


class PunchFailed(FastpunchError):
    """A strategy did not produce a connection; ``reason`` is a stable word."""

    def __init__(self, reason: str, message: str, **details) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class Side:
    """One side's next-connection info, as a punch uses it."""
    public: str                     # the address the CCS sees it at (reflexive)
    port: int                       # the port a version-1 peer and kernel strategies aim at
    isn: int
    candidates: tuple = ()          # version 1 peers announce none: see PunchContext.peer
    mss: int = 1460
    wscale: Optional[int] = 7
    sack_permitted: bool = True
    timestamps: bool = True
    nat: NatClass = NatClass.UNKNOWN
    mapping: Mapping = Mapping.UNKNOWN
    filtering: Filtering = Filtering.UNKNOWN
    filtering6: Filtering = Filtering.UNKNOWN     # its IPv6 firewall's (protocol 5)
    crafted: bool = True

    def reachable_at(self) -> tuple:
        """Its candidates; for a version-1 peer, the one address it knows."""
        if self.candidates:
            return self.candidates
        return (Candidate(CandidateKind.SRFLX, self.public, self.port),)

    def mapped(self) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.kind is CandidateKind.MAPPED), None)


@dataclass(frozen=True)
class PunchContext:
    """Both sides of one rendezvous, as this side sees them."""
    role: Role
    local_ip: str                   # our address toward the peer's public address
    local_port: int                 # the one port every crafted flow and kernel open uses
    ours: Side
    peer: Side
    ccs_ip: str = ""                # the CCS's address, as we reach it (spoof's source)
    session: Optional[int] = None   # the CCS's id of this rendezvous (PeerLeft, Abandon)
    guarded: bool = False           # our kernel's RSTs from local_port are dropped already
                                    # (since gathering: netcheck.gather.guard_port)
    tracer: Optional[Callable] = field(default=None, compare=False)   # Device(tracer=...)

    @property
    def iss(self) -> int:
        return self.ours.isn

    @property
    def peer_isn(self) -> int:
        return self.peer.isn

    @property
    def peer_ip(self) -> str:
        return self.peer.public

    @property
    def peer_port(self) -> int:
        return self.peer.port

    @property
    def initiator(self) -> bool:
        return self.role is Role.INITIATOR


@dataclass
class Attempt:
    """One stage's try (one strategy, or the crafted race of several): what
    it sent and saw, per pair, how long, how it ended."""
    strategy: str
    ok: bool = False
    seconds: float = 0.0
    sent: int = 0
    seen: int = 0
    reason: str = ""
    detail: str = ""
    events: list = field(default_factory=list)     # (seconds since the stage began, text)
    pairs: list = field(default_factory=list)      # proto.punch.PairStats of each flow
    trace: list = field(default_factory=list)      # the machine's typed events
    winner: str = ""                               # the pair that completed

    def as_dict(self) -> dict:
        out = asdict(self)
        out["pairs"] = [asdict(p) if hasattr(p, "__dataclass_fields__") else p
                        for p in self.pairs]
        out.pop("trace")
        return out


@dataclass
class Report:
    peer: str
    path: str = ""                  # "direct" or "relay"
    strategy: str = ""              # the winning pair's policy, or "relay"
    seconds: float = 0.0            # from connect()/accept() to a connected socket
    attempts: list = field(default_factory=list)
    pair: str = ""                  # the candidate pair that won ("" for the relay)
    family: str = ""                # "IPv4" or "IPv6": the winning pair's, or the relay's
    history: list = field(default_factory=list)    # (seconds, what): gathering, stages, relay

    @property
    def sent(self) -> int:
        return sum(a.sent for a in self.attempts)

    def as_dict(self) -> dict:
        return {"peer": self.peer, "path": self.path, "strategy": self.strategy,
                "pair": self.pair, "family": self.family, "seconds": round(self.seconds, 4), "sent": self.sent,
                "attempts": [a.as_dict() for a in self.attempts]}

    def lines(self) -> list:
        out = [f"{self.peer}: {self.path or 'failed'} via {self.strategy or '-'} "
               f"{f'over {self.family} ' if self.family else ''}"
               f"in {self.seconds * 1000:.0f} ms" + (f" ({self.pair})" if self.pair else "")]
        for t, what in self.history:
            out.append(f"  {t * 1000:7.0f} ms  {what}")
        for a in self.attempts:
            out.append(f"  {a.strategy:10s} {'ok' if a.ok else 'failed':6s} {a.seconds * 1000:7.0f} ms"
                       f"  sent {a.sent:4d} seen {a.seen:4d}  {a.reason} {a.detail}".rstrip())
            out.extend(f"      pair {p}" for p in a.pairs)
            out.extend(f"      {t:8.3f}s {what}" for t, what in a.events)
        return out


_ties: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tie(sock: socket.socket, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` when the connection is done with: at :func:`release`
    (``PeerConnection.close``) or, failing that, when the socket object is
    garbage collected."""
    _ties.setdefault(sock, []).append(weakref.finalize(sock, cleanup))


def release(sock: socket.socket) -> None:
    """Run what :func:`tie` attached to ``sock`` (each once)."""
    for finalizer in _ties.pop(sock, []):
        finalizer()


def free_port() -> int:
    """A TCP port free on this host right now (bound once, released)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): nothing of the socket stays on its
    4-tuple (no FIN_WAIT), so the port is the next strategy's at once."""
    import struct

    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
