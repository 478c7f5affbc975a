"""Keeping a device-to-device stream alive, and knowing when its path died.

A camera stream can sit idle for minutes (a motion-triggered camera, a
paused viewer) while the gateways under it forget idle flows: mobile
carriers and many routers drop an established TCP entry after minutes,
some after 25 s. A forgotten flow does not fail, it hangs: the sender
retransmits into a gateway that drops every segment, and both sockets stay
ESTABLISHED for as long as the application waits.

So every connection the package hands out (direct or through the relay,
and both legs of the relay on the CCS) gets the kernel's own liveness
machinery, set per socket:

* ``SO_KEEPALIVE`` with ``TCP_KEEPIDLE = period``: after ``period`` seconds
  with nothing received, the kernel sends a probe (a bare ACK the peer's
  kernel must answer), then one every ``interval`` seconds until something
  comes back. The probes cross both gateways, so they refresh every
  conntrack and NAT entry on the path, and they cost 40-52 bytes each way
  per period: no application, no channel record, no wake-up of our process.
* ``TCP_USER_TIMEOUT = timeout``: data we sent that stays unacknowledged
  for ``timeout`` seconds aborts the connection (``ETIMEDOUT``), and so
  does a keepalive probe left unanswered once ``timeout`` seconds have
  passed since the peer was last heard.

What that bounds (docs/liveness.md has the measurements):

* a side that is **sending** learns of a dead path ``timeout`` seconds after
  its first unacknowledged segment (the kernel clamps its retransmission
  timer to the user timeout);
* a side that is **receiving or idle** learns it at the first keepalive
  check after ``timeout`` with a probe unanswered (plus the kernel timer
  wheel's rounding, at most an eighth of each timer's delay: measured 0.2 s
  on 12 s). The default timeout lets :data:`LOST_PROBES` probes in a row be
  lost: one dropped 52-byte probe on a lossy Wi-Fi or mobile path must not
  end an idle stream (with a timeout below ``period + interval`` it did: at
  1 % loss each way an idle stream lasted about 4 minutes on average).

The period is the CCS's to advertise (``AuthOk.keepalive``, a CCS setting),
the application's to override (``Device(keepalive=...)``). Pure settings
here; :func:`apply` is the only function that touches a socket.
"""

from __future__ import annotations

import errno
import math
import socket
from dataclasses import dataclass
from typing import Optional, Union

from fastpunch.errors import FastpunchError

__all__ = ["Keepalive", "DEFAULT", "apply", "resolve", "PathLost", "KeepaliveError",
           "path_lost", "MIN_PERIOD", "MAX_PERIOD", "LOST_PROBES"]

MIN_PERIOD, MAX_PERIOD = 1, 3600          # whole seconds (TCP_KEEPIDLE's unit)
MAX_PROBES = 127                          # the kernel's cap on TCP_KEEPCNT (MAX_TCP_KEEPCNT)
LOST_PROBES = 2                           # probes in a row the default timeout survives losing
# SOL_TCP option numbers (linux/tcp.h); Python names them where the libc does
TCP_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", 4)
TCP_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", 5)
TCP_KEEPCNT = getattr(socket, "TCP_KEEPCNT", 6)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


@dataclass(frozen=True)
class Keepalive:
    """Liveness settings for one stream.

    ``period``: whole seconds of silence before the first probe (keep it
    under the shortest idle timeout of the gateways on the way; 10 s is the
    CCS's default). ``timeout``: seconds without an acknowledgement after
    which the path is declared dead (the kernel's TCP_USER_TIMEOUT); None
    for ``period + (LOST_PROBES + 1) * interval``, which
    :attr:`user_timeout` gives: the third unanswered probe in a row ends the
    stream, never the first (16 s for the default period).
    ``interval`` (derived): seconds between probes once one went out."""

    period: int = 10
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.period, bool) or not isinstance(self.period, int) \
                or not MIN_PERIOD <= self.period <= MAX_PERIOD:
            raise ValueError(f"keepalive period must be whole seconds in "
                             f"{MIN_PERIOD}..{MAX_PERIOD}, not {self.period!r}")
        if self.timeout is not None and (isinstance(self.timeout, bool)
                                         or not isinstance(self.timeout, (int, float))
                                         or not 1 <= self.timeout <= MAX_PERIOD
                                         or math.isnan(self.timeout)):
            raise ValueError(f"keepalive timeout must be seconds in 1..{MAX_PERIOD}, "
                             f"not {self.timeout!r}")

    @property
    def interval(self) -> int:
        """Seconds between probes once the first went unanswered."""
        return max(1, self.period // 4)

    @property
    def user_timeout(self) -> float:
        """The timeout in force (TCP_USER_TIMEOUT), in seconds."""
        if self.timeout is not None:
            return float(self.timeout)
        # the check after probe LOST_PROBES + 1 is the first at or past it,
        # the one before it falls short however late the kernel's timers
        # run (each at most an eighth of its delay, under one interval in all)
        return float(self.period + (LOST_PROBES + 1) * self.interval)

    def _fatal_check(self) -> int:
        """k of the keepalive timer's check at ``period + k * interval`` (k
        probes out by then) that first finds the user timeout passed; the
        kernel gives up no sooner than the first probe's check (k = 1)."""
        return max(1, math.ceil(max(0.0, self.user_timeout - self.period) / self.interval))

    @property
    def probes(self) -> int:
        """TCP_KEEPCNT: unanswered probes before the kernel gives up, which
        it counts only while TCP_USER_TIMEOUT is 0 (after :func:`apply` it
        is not): the same moment as the user timeout, within the kernel's
        cap of 127."""
        return min(MAX_PROBES, self._fatal_check())

    def idle_detection(self) -> float:
        """Seconds, at most, from the last thing heard from the peer to
        ETIMEDOUT on a side that is not sending."""
        return float(self.period + self._fatal_check() * self.interval)

    def busy_detection(self) -> float:
        """Seconds from the first unacknowledged segment to ETIMEDOUT on a
        side that is sending: the user timeout (the kernel clamps its last
        retransmission timer to it; measured 0.2-0.5 s past it)."""
        return self.user_timeout

    def socket_options(self) -> list[tuple[int, int, int]]:
        """[(level, option, value)] that :func:`apply` sets, in order."""
        return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, TCP_KEEPIDLE, self.period),
                (socket.IPPROTO_TCP, TCP_KEEPINTVL, self.interval),
                (socket.IPPROTO_TCP, TCP_KEEPCNT, self.probes),
                (socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.user_timeout * 1000))]

    def describe(self) -> str:
        return (f"keepalive every {self.period} s, dead after {self.user_timeout:g} s "
                f"without an acknowledgement")


DEFAULT = Keepalive()

_NAMES = {(socket.SOL_SOCKET, socket.SO_KEEPALIVE): "SO_KEEPALIVE",
          (socket.IPPROTO_TCP, TCP_KEEPIDLE): "TCP_KEEPIDLE",
          (socket.IPPROTO_TCP, TCP_KEEPINTVL): "TCP_KEEPINTVL",
          (socket.IPPROTO_TCP, TCP_KEEPCNT): "TCP_KEEPCNT",
          (socket.IPPROTO_TCP, TCP_USER_TIMEOUT): "TCP_USER_TIMEOUT"}


class KeepaliveError(FastpunchError, OSError):
    """The kernel refused a liveness option on a socket; ``option`` names it."""

    def __init__(self, option: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"cannot set {option} on the stream: {exc.strerror}")
        self.option = option


class PathLost(FastpunchError, ConnectionError):
    """The path to the peer stopped answering: the kernel's keepalive or
    user timeout gave up (``ETIMEDOUT``). ``code`` is "path-lost"."""

    code = "path-lost"

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, f"{message} ({self.code})")


def path_lost(exc: OSError, keepalive: Optional[Keepalive]) -> Optional[PathLost]:
    """The PathLost an OSError from a stream means, or None if it means
    something else (a reset, a close)."""
    if exc.errno != errno.ETIMEDOUT or isinstance(exc, PathLost):
        return None
    how = f" ({keepalive.describe()})" if keepalive is not None else ""
    return PathLost(f"the peer stopped answering{how}: the path to it is gone")


def resolve(value: Union[None, bool, int, float, Keepalive],
            advertised: Optional[int] = None) -> Optional[Keepalive]:
    """The settings a stream gets: ``value`` is the application's (a
    Keepalive, a period in seconds, False/0 for none, None for the CCS's
    ``advertised`` period or the default when the CCS says nothing)."""
    if isinstance(value, Keepalive):
        return value
    if value is None or value is True:
        return Keepalive(int(advertised)) if advertised else DEFAULT
    if value is False or value == 0:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"keepalive period must be whole seconds in "
                             f"{MIN_PERIOD}..{MAX_PERIOD}, not {value!r}")
        value = int(value)
    return Keepalive(value)


def apply(sock: socket.socket, keepalive: Optional[Keepalive]) -> None:
    """Set ``keepalive``'s options on a connected TCP socket (None: turn
    keepalive off). Raises KeepaliveError naming the option refused."""
    if keepalive is None:
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),
                   (socket.IPPROTO_TCP, TCP_USER_TIMEOUT, 0)]
    else:
        options = keepalive.socket_options()
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            raise KeepaliveError(_NAMES.get((level, option), str(option)), exc) from exc
