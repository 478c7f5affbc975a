"""A tiny in-memory network for the punch machine: two machines, a fake
clock, per-direction delays and drop rules, and every segment as the wire
would carry it (built and parsed by the engine, checksums included).

No sockets, no threads: ``Net.run(until)`` pops the earliest of the
machines' timers and the segments in flight, in time order.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastpunch._engine import build, parse
from fastpunch.proto.punch import PunchMachine, Send, SendBatch


def wire(send: Send, ip_id: int = 0):
    """The segment a Send puts on the wire, parsed back (checksums verified)."""
    return parse(build(send.src, send.dst, send.sport, send.dport, seq=send.seq, ack=send.ack,
                       flags=send.flags, window=send.window, options=send.options,
                       payload=send.payload or None, ttl=send.ttl, ip_id=ip_id))


def expand(out) -> list:
    """Sends, with every SendBatch spelled out as single Sends."""
    sends = []
    for s in out:
        if isinstance(s, SendBatch):
            for i in range(len(s)):
                sends.append(Send(s.src, s.dst, s.sports[i] if s.sports else s.sport,
                                  s.dports[i] if s.dports else s.dport, s.seq, 0, s.flags,
                                  s.window, s.options))
        else:
            sends.append(s)
    return sends


@dataclass
class Host:
    name: str
    machine: PunchMachine
    addrs: set
    log: list = field(default_factory=list)        # (t, Send) as sent


class Net:
    """Delivers each Send to the host owning its destination address after
    ``delay(send)`` seconds, unless ``drop(t, send)`` is true. ``rewrite``
    may turn a send into what the far side sees (a NAT), or None (dropped).
    """

    def __init__(self, a: Host, b: Host, *, delay: Callable = lambda s: 0.01,
                 drop: Callable = lambda t, s: False,
                 rewrite: Optional[Callable] = None, start: float = 0.0) -> None:
        self.hosts = (a, b)
        self.delay, self.drop, self.rewrite = delay, drop, rewrite
        self.now = start
        self._q: list = []
        self._n = itertools.count()
        self.delivered: list = []                  # (t, to host name, segment)

    def _owner(self, addr: str) -> Optional[Host]:
        for h in self.hosts:
            if addr in h.addrs:
                return h
        return None

    def send(self, host: Host, out) -> None:
        for s in expand(out):
            host.log.append((self.now, s))
            if self.drop(self.now, s):
                continue
            s2 = self.rewrite(s) if self.rewrite is not None else s
            if s2 is None:
                continue
            to = self._owner(s2.dst)
            if to is None or to is host:
                continue
            heapq.heappush(self._q, (self.now + self.delay(s), next(self._n), to, s2))

    def run(self, until: float) -> None:
        for h in self.hosts:
            self.send(h, h.machine.advance(self.now))
        while True:
            timers = [(h.machine.next_timer, i) for i, h in enumerate(self.hosts)
                      if h.machine.next_timer is not None]
            t_timer = min(timers)[0] if timers else None
            t_seg = self._q[0][0] if self._q else None
            nxt = min(t for t in (t_timer, t_seg) if t is not None) if (t_timer is not None or
                                                                      t_seg is not None) else None
            if nxt is None or nxt > until:
                self.now = until
                return
            self.now = nxt
            if t_seg is not None and t_seg <= nxt:
                _, _, to, s = heapq.heappop(self._q)
                seg = wire(s)
                self.delivered.append((self.now, to.name, seg))
                self.send(to, to.machine.receive(seg, self.now))
            else:
                for h in self.hosts:
                    if h.machine.next_timer is not None and h.machine.next_timer <= self.now:
                        self.send(h, h.machine.advance(self.now))
