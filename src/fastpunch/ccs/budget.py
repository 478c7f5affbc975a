"""What one device, or one source address, may cost a CCS node.

Two pure pieces, no I/O, driven by the server with ``now``:

* ``Bucket``: a token bucket (messages a second, with a burst) for one
  authenticated device: the server cuts a device that outruns it, with an
  Error saying so.
* ``Gate``: connections that have not logged in yet (TLS handshake or login
  still running), counted per source address and in all. Past either cap
  the *oldest* such connection is cut, not the newcomer: a flood of silent
  connections then holds at most the caps' worth of sockets, and a real
  device's login, which takes a few round trips, always gets through.

``Budgets`` holds every limit in one place (``ccs serve`` exposes them).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass(frozen=True)
class Budgets:
    messages_per_second: float = 20.0    # per device, after login (heartbeats are one per 15 s)
    message_burst: int = 100             # a viewer opening many cameras at once
    rendezvous_in_flight: int = 16       # per device, as the side asking
    offers_per_pair: int = 4             # offers one device has outstanding to one peer
    offers_pending: int = 64             # offers a device has not answered yet, from everyone
    write_buffer: int = 256 * 1024       # bytes queued to one device before it is cut
    preauth_per_source: int = 128        # connections not logged in, per source address
    preauth_total: int = 4096            # and in all
    handshake_timeout: float = 10.0      # seconds for the TLS handshake
    probes_per_source: int = 4           # filtering probes at once, per source address
    relay_hellos_per_source: int = 64    # relay connections yet to say who they are

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"budget {name} must be positive, not {value!r}")


class Bucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        """One token if there is one."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Gate:
    """Connections waiting to log in, oldest first, per source and in all.
    ``admit`` returns the keys it evicted (their ``cut`` callbacks have been
    called); ``leave`` forgets a key (logged in, or closed)."""

    def __init__(self, per_source: int, total: int) -> None:
        self.per_source, self.total = per_source, total
        self._all: collections.OrderedDict = collections.OrderedDict()   # key -> source
        self._cuts: dict = {}
        self._by_source: dict = {}      # source -> OrderedDict of keys

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._all

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(self, key: Hashable, source: str, cut: Callable[[], None]) -> list:
        self._all[key] = source
        self._cuts[key] = cut
        self._by_source.setdefault(source, collections.OrderedDict())[key] = None
        evicted = []
        mine = self._by_source[source]
        while len(mine) > self.per_source:
            evicted.append(next(iter(mine)))
            self._evict(evicted[-1])
        while len(self._all) > self.total:
            evicted.append(next(iter(self._all)))
            self._evict(evicted[-1])
        return evicted

    def update(self, key: Hashable, cut: Callable[[], None]) -> None:
        """How to cut ``key`` from now on (its session exists)."""
        if key in self._cuts:
            self._cuts[key] = cut

    def leave(self, key: Hashable) -> None:
        source = self._all.pop(key, None)
        if source is None:
            return
        self._cuts.pop(key, None)
        mine = self._by_source[source]
        mine.pop(key, None)
        if not mine:
            del self._by_source[source]

    def _evict(self, key: Hashable) -> None:
        cut = self._cuts.get(key)
        self.leave(key)
        if cut is not None:
            cut()
