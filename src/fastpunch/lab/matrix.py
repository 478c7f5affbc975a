"""The compatibility matrix: which lab gateway profiles let devices connect,
by which strategy and candidate pair, how often, how fast, in how many
packets. ``fastpunch lab matrix``; it writes docs/compatibility.md.

Three kinds of cells, each in a NAT lab of its own with a fresh CCS in its
core (``fastpunch.lab.deploy``):

* **pairs**: every unordered pair of profiles (the diagonal included: nat+nat
  is the commonest case), a camera on site a calling ``connect()``, a viewer
  on site b calling ``accept()``, for every strategy: "symmetric", "nat",
  "simopen", ... forced on both sides (``strategies=[...]`` replaces the
  plan, no relay), and "auto" (the CCS's whole plan, the relay as the
  fallback);
* **same LAN**: camera and viewer on two hosts behind one gateway
  (``Lab(a=P, hosts={"a": 2}, hairpin={"a": MODE})``), for every profile and
  every hairpin mode the lab builds for it;
* **crowded**: three cameras on hosts a, a2, a3 behind one gateway connect at
  the same time to three viewers on b, b2, b3 behind another, every host
  with the same narrow ephemeral port range, so hosts sharing a NAT collide
  on ports on their own.

Same-LAN and crowded cells run "auto" only. Every trial is bounded in time
and counts as connected only when both sides got a socket on the same path
and 32 bytes crossed each way. Each device waits for its natcheck
(``dev.ready()``) after logging in, before its first trial.

    fastpunch lab matrix                                   # everything, 10 trials
    fastpunch lab matrix --pairs nat:nat,nat:cgn --strategies auto --trials 3 --no-doc
    fastpunch lab matrix --lan nat:wan --crowded nat:napt-ei --trials 2 --no-doc
    fastpunch lab matrix --trials 10 --jobs 4 --json /tmp/matrix.json --check

``--check`` exits 1 unless the punching issue's goals hold (:func:`check`).
Needs root (network namespaces, raw sockets, nftables).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = ["Unit", "STRATEGIES", "all_profiles", "default_units", "default_pairs",
           "lan_units", "crowded_units", "parse_pairs", "parse_lan", "parse_crowded",
           "run_trial", "run_unit", "run_matrix", "summarize", "check", "render",
           "add_arguments", "cmd_matrix", "main"]

STRATEGIES = ("symmetric", "nat", "simopen", "predict", "spray", "spoof", "upnp", "auto")
TRIAL_TIMEOUT = 20.0            # seconds one trial may take, from connect() to data both ways
READY_TIMEOUT = 15.0            # seconds a device may take to finish natcheck after a login
EXCHANGE_BYTES = 32
CROWDED_HOSTS = 3
# 64 ports: the hosts' probes and punches collide on their own (every cell
# of a run saw several), while two pairs rarely meet on the same four
# ports at once, the one collision nothing can undo (docs/punch.md)
CROWDED_PORTS = (40000, 40063)
LAN_PACKETS = 20                # a same-LAN connection: fewer segments than this a side
DEFAULT_DOC = os.path.join("docs", "compatibility.md")
# the order of rows and columns; profiles the lab adds later come after these
PROFILE_ORDER = ("open", "firewall", "firewall-liberal", "nat", "nat-rst", "strict", "cgn",
                 "upnp", "napt-ei", "napt-sequential", "napt-random")
# crowded cells the full matrix runs: each profile facing itself, and nat facing the others
CROWDED_AGAINST = "nat"


def all_profiles() -> list:
    """Every lab profile (fastpunch.lab.profiles.PROFILES and cgn), in table order."""
    from fastpunch.lab.profiles import CGN, PROFILES

    known = set(PROFILES) | {CGN}
    return [p for p in PROFILE_ORDER if p in known] + sorted(known - set(PROFILE_ORDER))


def direct_expected(a: str, b: str, kind: str = "pair") -> bool:
    """Whether the goals want every "auto" trial between profiles ``a`` and
    ``b`` direct: all but two random NAPTs and a sequential NAPT facing a
    random one (the known limits, docs/punch.md); in a crowded cell, not two
    sequential NAPTs either (the neighbours' flows move both counters while
    the two sides punch: no prediction holds)."""
    if kind == "crowded" and a == b == "napt-sequential":
        return False
    return {a, b} not in ({"napt-random"}, {"napt-sequential", "napt-random"})


# -- what a cell is ---------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One lab of the matrix: a pair of profiles, a same-LAN cell or a
    crowded cell. Site a's hosts connect, site b's (the LAN cell: host a2)
    accept."""
    kind: str                            # "pair", "lan", "crowded", "dual"
    a: str                               # profile of site a
    b: str                               # profile of site b (lan: the same gateway, a)
    hairpin: str = "off"                 # lan: the gateway's hairpin mode
    hosts: int = 1                       # crowded: hosts (and connections) a side
    port_range: Optional[tuple] = None   # crowded: every host's ephemeral ports
    v6a: Optional[str] = None            # dual: site a's IPv6 profile (None: no IPv6)
    v6b: Optional[str] = None
    v4a: bool = True                     # dual: False, site a is IPv6-only
    v4b: bool = True

    @property
    def name(self) -> str:
        if self.kind == "lan":
            return f"{self.a} hairpin {self.hairpin}"
        if self.kind == "crowded":
            return f"{self.a}:{self.b} x{self.hosts}"
        if self.kind == "dual":
            return f"{self.spec(self.a, self.v6a, self.v4a)}:{self.spec(self.b, self.v6b, self.v4b)}"
        return f"{self.a}:{self.b}"

    @staticmethod
    def spec(profile: str, v6: Optional[str], v4: bool) -> str:
        """A dual-stack side as --dual writes it: PROFILE/V6, none/V6 for an
        IPv6-only site, PROFILE alone for one without IPv6."""
        return f"{profile if v4 else 'none'}" + (f"/{v6}" if v6 else "")

    def login_family(self, device: str) -> int:
        """The family ``device`` logs in over: an IPv6-only site's, IPv6."""
        on_a = device.startswith("cam")
        return 6 if self.kind == "dual" and not (self.v4a if on_a else self.v4b) else 4

    def expect(self) -> Optional[str]:
        """What the goals want of every "auto" trial: "v6" (direct over
        IPv6), "direct", "relay", or None (the known limit: measured, not
        checked)."""
        if self.kind == "lan":
            return "direct"
        if self.kind != "dual":
            return "direct" if direct_expected(self.a, self.b, self.kind) else None
        v6 = self.v6a is not None and self.v6b is not None
        v4 = self.v4a and self.v4b
        if v6:
            return "direct" if v4 and direct_expected(self.a, self.b) else "v6"
        if not v4:
            return "relay"           # no family in common: only the CCS joins them
        if direct_expected(self.a, self.b):
            return "direct"
        # two random NAPTs: the plan is the relay alone; the other IPv4 limits
        # sometimes go direct (measured, not checked)
        return "relay" if self.a == self.b == "napt-random" else None

    def lab_kwargs(self, delay_ms: float = 0.0) -> dict:
        if self.kind == "lan":
            return {"a": self.a, "hosts": {"a": 2}, "hairpin": {"a": self.hairpin},
                    "delay_ms": delay_ms}
        kw = {"a": self.a, "b": self.b, "delay_ms": delay_ms}
        if self.kind == "dual":
            kw.update(v6={s: v for s, v in (("a", self.v6a), ("b", self.v6b)) if v},
                      v4={"a": self.v4a, "b": self.v4b})
        if self.kind == "crowded":
            kw.update(hosts={"a": self.hosts, "b": self.hosts},
                      port_range={"a": self.port_range, "b": self.port_range})
        return kw

    def links(self) -> list:
        """(camera, its viewer) of every connection a trial makes."""
        if self.kind == "crowded":
            return [(f"cam{i}", f"viewer{i}") for i in range(1, self.hosts + 1)]
        return [("cam", "viewer")]

    def placement(self) -> dict:
        """{device: (host, profile of its gateway)}."""
        if self.kind == "lan":
            return {"cam": ("a", self.a), "viewer": ("a2", self.a)}
        out = {}
        for i, (cam, viewer) in enumerate(self.links()):
            suffix = "" if i == 0 else str(i + 1)
            out[cam] = ("a" + suffix, self.a)
            out[viewer] = ("b" + suffix, self.b)
        return out

    def strategies(self, asked: Sequence[str]) -> list:
        """Pairs run what was asked; same-LAN, crowded and dual-stack cells the plan."""
        return list(asked) if self.kind == "pair" else ["auto"]

    def argv(self) -> list:
        """The command-line options that select this unit alone."""
        if self.kind == "lan":
            return ["--lan", f"{self.a}:{self.hairpin}"]
        if self.kind == "crowded":
            low, high = self.port_range
            return ["--crowded", f"{self.a}:{self.b}", "--hosts", str(self.hosts),
                    "--port-range", f"{low}-{high}"]
        if self.kind == "dual":
            return ["--dual", self.name]
        return ["--pairs", f"{self.a}:{self.b}"]

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "a": self.a, "b": self.b,
                "hairpin": self.hairpin, "hosts": self.hosts,
                "port_range": list(self.port_range) if self.port_range else None,
                "v6a": self.v6a, "v6b": self.v6b, "v4a": self.v4a, "v4b": self.v4b,
                "expect": self.expect()}


def default_pairs(profiles: Sequence[str]) -> list:
    """Unordered pairs, the diagonal included; the earlier profile connects."""
    return [(profiles[i], profiles[j]) for i in range(len(profiles))
            for j in range(i, len(profiles))]


def _lan_allowed(profile: str, mode: str) -> Optional[str]:
    """None when the lab builds this same-LAN cell, else the lab's reason."""
    from fastpunch.lab.topology import Lab, LabError

    try:
        Lab(a=profile, hosts={"a": 2}, hairpin={"a": mode})      # validates, builds nothing
    except LabError as exc:
        return str(exc)
    return None


def lan_units(profiles: Sequence[str]) -> list:
    """Every profile x hairpin mode the lab builds (hairpin needs one NAT
    gateway: cgn and the no-NAT profiles get "off" only)."""
    from fastpunch.lab.profiles import HAIRPIN_MODES

    return [Unit("lan", p, p, hairpin=mode) for p in profiles for mode in HAIRPIN_MODES
            if _lan_allowed(p, mode) is None]


def crowded_units(pairs: Sequence[tuple], hosts: int = CROWDED_HOSTS,
                  port_range: tuple = CROWDED_PORTS) -> list:
    return [Unit("crowded", a, b, hosts=hosts, port_range=tuple(port_range)) for a, b in pairs]


# the lab's napt-ei cannot model a crowded NAT: each entry of its port map
# names one port, so a colliding flow is dropped where a real NAT picks
# another port (docs/netfilter-facts.md 9); crowded cells leave it out
CROWDED_UNMODELLED = {"napt-ei"}


def default_crowded(profiles: Sequence[str]) -> list:
    """Each profile facing itself, then nat facing every other profile
    (but CROWDED_UNMODELLED)."""
    profiles = [p for p in profiles if p not in CROWDED_UNMODELLED]
    out = [(p, p) for p in profiles]
    if CROWDED_AGAINST in profiles:
        out += [(CROWDED_AGAINST, p) for p in profiles if p != CROWDED_AGAINST]
    return out


# dual stack: every pair of IPv6 profiles on two sites whose IPv4 only the
# relay joins (it must go direct over IPv6), a pair whose IPv4 works too, two
# IPv6-only sites, an IPv6-only site facing an IPv4-only one and IPv6 on one
# side only (the relay, both), as --dual specs
DUAL_DEFAULT = ("nat/firewall:nat/firewall", "none/firewall:none/firewall",
                "none/firewall:nat", "napt-random/firewall:napt-random")


def dual_units(profiles: Sequence[str]) -> list:
    """The dual-stack cells whose IPv4 profiles are all among ``profiles``."""
    from fastpunch.lab.profiles import V6_PROFILES

    v6 = list(V6_PROFILES)
    specs = [f"napt-random/{x}:napt-random/{y}" for x, y in default_pairs(v6)] + \
        list(DUAL_DEFAULT)
    units = parse_dual(",".join(specs))
    return [u for u in units
            if all(p in profiles for p, v4 in ((u.a, u.v4a), (u.b, u.v4b)) if v4)]


def default_units(profiles: Sequence[str], hosts: int = CROWDED_HOSTS,
                  port_range: tuple = CROWDED_PORTS) -> list:
    """The full matrix over ``profiles``: pairs, same LAN, crowded, dual stack."""
    return ([Unit("pair", a, b) for a, b in default_pairs(profiles)] + lan_units(profiles)
            + crowded_units(default_crowded(profiles), hosts, port_range)
            + dual_units(profiles))


def _items(text: str) -> list:
    return [s for s in (item.strip() for item in text.replace(" ", ",").split(",")) if s]


def _profile(name: str, item: str) -> str:
    if name not in all_profiles():
        raise ValueError(f"unknown profile {name!r} in {item!r}; choose from "
                         f"{', '.join(all_profiles())}")
    return name


def parse_pairs(text: str) -> list:
    """"a:b,c:d" as [(a, b), (c, d)] (the first profile connects)."""
    pairs = []
    for item in _items(text):
        a, sep, b = item.partition(":")
        if not sep:
            raise ValueError(f"a pair is PROFILE:PROFILE: {item!r}")
        pairs.append((_profile(a, item), _profile(b, item)))
    return pairs


def parse_lan(text: str) -> list:
    """"nat:wan,cgn" as same-LAN units; a profile alone: every hairpin mode
    the lab builds for it."""
    from fastpunch.lab.profiles import HAIRPIN_MODES

    units = []
    for item in _items(text):
        profile, sep, mode = item.partition(":")
        _profile(profile, item)
        if not sep:
            units += lan_units([profile])
            continue
        if mode not in HAIRPIN_MODES:
            raise ValueError(f"hairpin modes are {', '.join(HAIRPIN_MODES)}: {item!r}")
        refused = _lan_allowed(profile, mode)
        if refused:
            raise ValueError(f"{item}: {refused}")
        units.append(Unit("lan", profile, profile, hairpin=mode))
    return units


def _dual_side(text: str, item: str) -> tuple:
    """(IPv4 profile, IPv6 profile or None, has IPv4) of one --dual side."""
    from fastpunch.lab.profiles import V6_PROFILES

    v4, _, v6 = text.partition("/")
    if v6 and v6 not in V6_PROFILES:
        raise ValueError(f"unknown IPv6 profile {v6!r} in {item!r}; choose from "
                         f"{', '.join(V6_PROFILES)}")
    if v4 == "none":
        if not v6:
            raise ValueError(f"an IPv6-only side needs its IPv6 profile (none/V6): {item!r}")
        return "nat", v6, False        # (its gateway's IPv4 profile serves no host)
    profile = _profile(v4, item)
    if v6 and profile == "cgn":
        raise ValueError(f"a cgn site's IPv6 is not modelled: {item!r}")
    return profile, v6 or None, True


def parse_dual(text: str) -> list:
    """"napt-random/firewall:none/open,nat:nat/firewall" as dual-stack
    units: each side PROFILE[/V6], or none/V6 for an IPv6-only site."""
    units = []
    for item in _items(text):
        left, sep, right = item.partition(":")
        if not sep:
            raise ValueError(f"a dual-stack cell is SIDE:SIDE (PROFILE[/V6] or none/V6): "
                             f"{item!r}")
        a, v6a, v4a = _dual_side(left, item)
        b, v6b, v4b = _dual_side(right, item)
        if v6a is None and v6b is None:
            raise ValueError(f"a dual-stack cell with IPv6 on neither side is a pair "
                             f"(--pairs {a}:{b}): {item!r}")
        units.append(Unit("dual", a, b, v6a=v6a, v6b=v6b, v4a=v4a, v4b=v4b))
    return units


def parse_crowded(text: str, hosts: int = CROWDED_HOSTS,
                  port_range: tuple = CROWDED_PORTS) -> list:
    return crowded_units(parse_pairs(text), hosts, port_range)


# -- one trial --------------------------------------------------------------------------
def _outcome(fut):
    """(PeerConnection or None, exception or None) of a finished future."""
    if not fut.done():
        return None, TimeoutError("still running")
    if fut.cancelled():
        return None, TimeoutError("cancelled at the trial's time bound")
    exc = fut.exception()
    return (None, exc) if exc is not None else (fut.result(), None)


def _exchange(ca, cb, timeout: float = 5.0) -> str:
    """A few bytes each way; returns "" or what went wrong."""
    payload = os.urandom(EXCHANGE_BYTES)
    try:
        for s in (ca.sock, cb.sock):
            s.settimeout(timeout)
        for src, dst in ((ca.sock, cb.sock), (cb.sock, ca.sock)):
            src.sendall(payload)
            got = b""
            deadline = time.monotonic() + timeout
            while len(got) < len(payload) and time.monotonic() < deadline:
                chunk = dst.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
            if got != payload:
                return f"data exchange failed: sent {len(payload)} bytes, got {len(got)}"
    except OSError as exc:
        return f"data exchange failed: {exc}"
    return ""


def _attempts(report) -> list:
    if report is None:
        return []
    return [{"strategy": a.strategy, "ok": a.ok, "seconds": round(a.seconds, 4),
             "sent": a.sent, "seen": a.seen, "reason": a.reason, "detail": a.detail[:300],
             "winner": a.winner, "pairs": len(a.pairs)}
            for a in report.attempts]


def pair_kind(pair: str) -> str:
    """"srflx-srflx" of "srflx-srflx 10.1.0.2:40000 -> 203.0.113.20:50000"."""
    return pair.split()[0] if pair else ""


def _timed_out(exc) -> bool:
    """Stopped at the trial's bound (asyncio.wait_for): a TimeoutError that
    carries no punch report (the punch attaches one to what it raises)."""
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and \
        getattr(exc, "report", None) is None


def _connection(fa, fb, strategy: str, wall: float, hung: bool) -> dict:
    """The record of one connect()/accept() pair whose futures are done."""
    ca, ea = _outcome(fa)
    cb, eb = _outcome(fb)
    # the report: on the connection, or on what the punch raised (exc.report)
    ra = ca.report if ca is not None else _report_of(ea)
    rb = cb.report if cb is not None else _report_of(eb)
    if ea is not None or eb is not None:
        error = "; ".join(f"{side}: " + ("stopped at the trial's time bound (no report)"
                                          if _timed_out(e) else f"{type(e).__name__}: {e}")
                          for side, e in (("connect", ea), ("accept", eb)) if e is not None)
    elif ca.path != cb.path:
        error = f"the sides disagree on the path: {ca.path} vs {cb.path}"
    elif strategy != "auto" and ca.strategy != strategy:
        error = f"forced {strategy} but connected via {ca.strategy}"
    else:
        error = _exchange(ca, cb)
    ok = not error
    won = next((a for a in ra.attempts if a.ok), None) if ra is not None else None
    result = {
        "ok": ok,
        "path": ca.path if ok else "",
        "strategy": ca.strategy if ok else "",
        "pair": ra.pair if ok and ra is not None else "",
        "accept_pair": rb.pair if ok and rb is not None else "",
        "pair_kind": pair_kind(ra.pair) if ok and ra is not None else "",
        "family": ra.family if ok and ra is not None else "",
        "accept_pair_kind": pair_kind(rb.pair) if ok and rb is not None else "",
        "seconds": round(ra.seconds, 4) if ra is not None else None,
        "start_seconds": (round(won.seconds, 4)
                          if ok and ca.path == "direct" and won is not None else None),
        "sent": ra.sent if ra is not None else None,
        "accept_sent": rb.sent if rb is not None else None,
        "wall": round(wall, 3),
        "hung": hung or _timed_out(ea) or _timed_out(eb),
        "reason": "",
        "error": error[:500],
        "attempts": _attempts(ra),
        "accept_attempts": _attempts(rb),
        "report_lines": [] if ok or ra is None else ra.lines()[:60],
        "accept_report_lines": [] if ok or rb is None else rb.lines()[:60],
    }
    result["reason"] = failure_reason(result)
    for conn in (ca, cb):
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
    return result


def _report_of(exc):
    """The punch's report on what it raised; a trial stopped at its time
    bound raised asyncio's TimeoutError from the cancellation that carries it."""
    for e in (exc, getattr(exc, "__cause__", None), getattr(exc, "__context__", None)):
        if e is not None and getattr(e, "report", None) is not None:
            return e.report
    return None


def run_trial(devices: dict, links: Sequence[tuple], strategy: str,
              trial_timeout: float = TRIAL_TIMEOUT) -> list:
    """Every (camera, viewer) of ``links`` connects at once: the viewers
    accept (each only its camera), the cameras connect. ``devices`` is
    {name: (LoopThread, Device)}. Returns one record per link; every future
    is finished (or cancelled and waited for) when it returns."""
    only = None if strategy == "auto" else [strategy]
    began = time.monotonic()
    accepting = []
    for cam, viewer in links:
        lb, b = devices[viewer]
        accepting.append(lb.submit(asyncio.wait_for(b.accept(strategies=only, peer=cam),
                                                    trial_timeout)))
    connecting = []
    for cam, viewer in links:
        la, a = devices[cam]
        connecting.append(la.submit(asyncio.wait_for(a.connect(viewer, strategies=only),
                                                     trial_timeout)))
    futures = accepting + connecting
    _, pending = concurrent.futures.wait(futures, timeout=trial_timeout + 10)
    for fut in pending:
        fut.cancel()
    if pending:
        concurrent.futures.wait(pending, timeout=10)
    wall = time.monotonic() - began
    out = []
    for (cam, viewer), fa, fb in zip(links, connecting, accepting):
        record = _connection(fa, fb, strategy, wall, bool(pending))
        record["link"] = f"{cam}->{viewer}"
        out.append(record)
    return out


def failure_reason(trial: dict) -> str:
    """One word for why a trial failed ("" when it did not)."""
    if trial["ok"]:
        return ""
    if trial["reason"] in ("login-failed", "worker-died"):
        return trial["reason"]
    if trial["hung"]:
        return "hung"
    mine = [a for a in trial["attempts"] if a["strategy"] != "relay" or not a["ok"]]
    theirs = trial["accept_attempts"]
    if any(a["ok"] for a in trial["attempts"]) != any(a["ok"] for a in theirs):
        return "one-sided"            # one side returned a socket, the other gave up
    for attempts in (mine, theirs):
        failed = [a for a in attempts if not a["ok"]]
        if failed:
            return failed[-1]["reason"] or "failed"
    if "data exchange" in trial["error"]:
        return "no-data"
    return "error"


# -- one unit ---------------------------------------------------------------------------
def _login(ccs, unit: Unit, nat_hints: bool, log: Callable) -> tuple:
    """({device: (loop, Device)} logged in and done with natcheck, notes)."""
    devices, notes = {}, []
    try:
        for name, (host, profile) in unit.placement().items():
            # without hints each device classifies its own gateway (natcheck)
            # and announces that, as a deployed device with nat="auto" does
            devices[name] = ccs.device(host, name, nat=profile if nat_hints else "auto",
                                       over=unit.login_family(name))
        waits = {name: loop.submit(dev.ready(READY_TIMEOUT))
                 for name, (loop, dev) in devices.items()}
        for name, fut in waits.items():
            try:
                fut.result(READY_TIMEOUT + 5)
            except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError):
                notes.append(f"{name}: natcheck not done within {READY_TIMEOUT:g} s of login")
                log(f"{unit.name}: {notes[-1]}")
    except BaseException:
        _logout(devices)
        raise
    return devices, notes


def _natcheck(devices: dict) -> dict:
    out = {}
    for name, (_, dev) in devices.items():
        r = dev.natcheck_result or {}
        out[name] = {k: r[k] for k in ("nat", "mapping", "filtering", "portmap", "delta",
                                       "offset", "behind") if r.get(k) not in (None, "")}
    return out


def _logout(devices: dict) -> None:
    for loop, dev in devices.values():
        with contextlib.suppress(Exception):
            loop.run(dev.close(), 15)


def _trial_line(unit: Unit, strategy: str, i: int, records: list) -> str:
    parts = []
    for r in records:
        if r["ok"]:
            parts.append(f"{r['path']} via {r['strategy']} in {r['seconds']:.3f} s"
                         + (f" ({r['pair_kind']})" if r["pair_kind"] else "")
                         + f", sent {r['sent']}/{r['accept_sent']}")
        else:
            parts.append(f"FAILED ({r['reason']}) after {r['wall']:.1f} s")
    return f"{unit.name} {strategy:9s} #{i + 1}: " + "; ".join(parts)


def run_unit(unit: Unit, strategies: Sequence[str] = STRATEGIES, trials: int = 10, *,
             trial_timeout: float = TRIAL_TIMEOUT, delay_ms: float = 0.0,
             nat_hints: bool = False, log: Optional[Callable] = None) -> dict:
    """One lab and one CCS for the unit; trials interleave the strategies.
    A trial that fails logs every device out and the next starts on fresh
    logins (a failed trial may leave an offer or a task behind)."""
    from fastpunch.lab.deploy import LabCCS
    from fastpunch.lab.topology import Lab

    log = log or (lambda msg: None)
    strategies = unit.strategies(strategies)
    cells = {s: [] for s in strategies}
    natcheck, notes = {}, []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastpunch-matrix-") as tmp, \
            Lab(**unit.lab_kwargs(delay_ms)) as lab, LabCCS(lab, tmp) as ccs:
        for cam, viewer in unit.links():
            ccs.enroll(cam, viewer)
            ccs.enroll(viewer)
        devices = None
        try:
            for i in range(trials):
                for strategy in strategies:
                    if devices is None:
                        try:
                            devices, login_notes = _login(ccs, unit, nat_hints, log)
                        except Exception as exc:      # this trial fails; the next logs in again
                            error = f"login: {type(exc).__name__}: {exc}"
                            notes.append(f"trial {i + 1}: {error}")
                            records = [dict(failed_record("login-failed", error),
                                            link=f"{cam}->{viewer}", trial=i)
                                       for cam, viewer in unit.links()]
                            cells[strategy].extend(records)
                            log(f"{unit.name} {strategy:9s} #{i + 1}: FAILED ({error})")
                            continue
                        notes += login_notes
                        natcheck = natcheck or _natcheck(devices)
                    records = run_trial(devices, unit.links(), strategy, trial_timeout)
                    for r in records:
                        r["trial"] = i
                    cells[strategy].extend(records)
                    log(_trial_line(unit, strategy, i, records))
                    if not all(r["ok"] for r in records):
                        _logout(devices)
                        devices = None
        finally:
            if devices is not None:
                _logout(devices)
    return {**unit.describe(), "seconds": round(time.monotonic() - t0, 1),
            "natcheck": natcheck, "notes": notes,
            "cells": {s: summarize(rs) for s, rs in cells.items()}, "trials": cells}


def _spread(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values)}


def summarize(results: list) -> dict:
    """A cell from its connection records (a crowded trial gives several)."""
    ok = [r for r in results if r["ok"]]
    direct = [r for r in ok if r["path"] == "direct"]
    times = [r["seconds"] for r in ok if r["seconds"] is not None]
    starts = [r["start_seconds"] for r in direct if r.get("start_seconds") is not None]
    return {
        "trials": len(results),
        "ok": len(ok),
        "direct": len(direct),
        "relay": sum(r["path"] == "relay" for r in ok),
        "median_s": round(statistics.median(times), 4) if times else None,
        "median_from_start_s": round(statistics.median(starts), 4) if starts else None,
        "strategies": dict(collections.Counter(r["strategy"] for r in ok)),
        "pairs": dict(collections.Counter(r.get("pair_kind") or "?" for r in direct)),
        "families": dict(collections.Counter(r.get("family") or "?" for r in direct)),
        "accept_pairs": dict(collections.Counter(r.get("accept_pair_kind") or "?"
                                                 for r in direct)),
        # every trial's packets, failed ones included: what the cell cost
        "sent": _spread([r.get("sent") for r in results]),
        "accept_sent": _spread([r.get("accept_sent") for r in results]),
        "failures": dict(collections.Counter(failure_reason(r) for r in results
                                             if not r["ok"])),
    }


# -- many units -------------------------------------------------------------------------
def _expected_seconds(unit: Unit, strategies: Sequence[str], trials: int) -> float:
    slow = unit.a.startswith("napt-") or unit.b.startswith("napt-")
    per = {"symmetric": 3.3, "nat": 2.3, "simopen": 3.3, "predict": 3.3, "spray": 4.3,
           "spoof": 3.3, "upnp": 2.3, "auto": 8.5} if slow else \
          {"symmetric": 0.5, "nat": 2.3, "simopen": 0.5, "predict": 0.5, "spray": 0.5,
           "spoof": 3.3, "upnp": 2.3, "auto": 0.5}
    return trials * sum(per.get(s, 3.0) for s in unit.strategies(strategies)) + \
        (5.0 if unit.kind == "crowded" else 0.0)


def run_matrix(units: Sequence[Unit], strategies: Sequence[str] = STRATEGIES,
               trials: int = 10, *, jobs: int = 1, trial_timeout: float = TRIAL_TIMEOUT,
               delay_ms: float = 0.0, nat_hints: bool = False,
               log: Optional[Callable] = None) -> dict:
    """Every unit (in this process, or ``jobs`` worker processes at once, a
    lab each); the result :func:`render` and :func:`check` take."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    if jobs <= 1:
        results = [run_unit(u, strategies, trials, trial_timeout=trial_timeout,
                            delay_ms=delay_ms, nat_hints=nat_hints, log=log) for u in units]
    else:
        results = _run_parallel(units, strategies, trials, jobs, trial_timeout, delay_ms,
                                nat_hints, log)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "trials": trials, "strategies": list(strategies), "trial_timeout": trial_timeout,
        "ready_timeout": READY_TIMEOUT, "delay_ms": delay_ms, "nat_hints": nat_hints,
        "jobs": jobs, "machine": machine(), "code": code_state(),
        "units": results,
    }


def _worker_env() -> dict:
    """The parent's environment, with the directory this package was
    imported from first on the path: a worker measures the same code."""
    import fastpunch

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastpunch.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p and p != root])
    return env


def failed_record(reason: str, error: str) -> dict:
    """The record of a connection that never started (the login failed, the
    worker died)."""
    return {"ok": False, "path": "", "strategy": "", "pair": "", "accept_pair": "",
            "pair_kind": "", "accept_pair_kind": "", "seconds": None, "start_seconds": None,
            "sent": None, "accept_sent": None, "wall": 0, "hung": False, "reason": reason,
            "error": error[:500], "attempts": [], "accept_attempts": [], "report_lines": [],
            "accept_report_lines": []}


def _dead_worker(unit: Unit, strategies, trials: int, returncode) -> dict:
    records = {s: [dict(failed_record("worker-died", f"exit {returncode}"), trial=i,
                        link=f"{cam}->{viewer}")
                   for i in range(trials) for cam, viewer in unit.links()]
               for s in unit.strategies(strategies)}
    return {**unit.describe(), "seconds": 0, "natcheck": {}, "notes": ["worker died"],
            "cells": {s: summarize(t) for s, t in records.items()}, "trials": records}


def _run_parallel(units, strategies, trials, jobs, trial_timeout, delay_ms, nat_hints, log):
    """Each unit in its own process (its own lab), at most ``jobs`` at once,
    longest first; each process bounded in time."""
    order = sorted(range(len(units)),
                   key=lambda i: -_expected_seconds(units[i], strategies, trials))
    results, running, queue = {}, [], list(order)
    env = _worker_env()
    with tempfile.TemporaryDirectory(prefix="fastpunch-matrix-") as tmp:
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    i = queue.pop(0)
                    unit = units[i]
                    out = os.path.join(tmp, f"unit{i}.json")
                    argv = [sys.executable, "-m", "fastpunch", "lab", "matrix", "--worker",
                            *unit.argv(), "--strategies", *unit.strategies(strategies),
                            "--trials", str(trials), "--trial-timeout", str(trial_timeout),
                            "--delay", str(delay_ms), "--json", out, "--no-doc"]
                    if nat_hints:
                        argv.append("--nat-hints")
                    bound = (trials * len(unit.strategies(strategies))
                             * (trial_timeout + 25 + READY_TIMEOUT) + 180)
                    proc = subprocess.Popen(argv, env=env)
                    running.append((i, proc, out, time.monotonic() + bound))
                time.sleep(0.5)
                for item in list(running):
                    i, proc, out, deadline = item
                    if proc.poll() is None and time.monotonic() < deadline:
                        continue
                    if proc.poll() is None:
                        log(f"{units[i].name}: worker exceeded its time bound; stopping it")
                        proc.terminate()
                        try:
                            proc.wait(30)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait(10)
                    running.remove(item)
                    try:
                        with open(out) as f:
                            results[i] = json.load(f)["units"][0]
                    except (OSError, ValueError, IndexError, KeyError):
                        log(f"{units[i].name}: worker failed (exit {proc.returncode})")
                        results[i] = _dead_worker(units[i], strategies, trials, proc.returncode)
        finally:
            for _, proc, _, _ in running:
                proc.kill()
                proc.wait(10)
    return [results[i] for i in range(len(units))]


# -- the check --------------------------------------------------------------------------
def units_of(result: dict, kind: Optional[str] = None) -> list:
    """The result's units (of one kind); a JSON of the old script ("pairs")
    reads as pair units."""
    units = result.get("units")
    if units is None:
        units = [{**p, "kind": "pair", "name": f"{p['a']}:{p['b']}"}
                 for p in result.get("pairs", [])]
    return [u for u in units if kind is None or u["kind"] == kind]


def check(result: dict) -> list:
    """The punching issue's goals for "auto", as problems found (empty:
    passed). Every trial ends connected (on the relay when direct cannot);
    every pair and crowded cell is direct in every trial unless both sides
    are napt-random or it is napt-sequential:napt-random (the known limit:
    measured, not checked); a same-LAN cell wins by a host-host pair on both
    sides in every trial, each side sending fewer than LAN_PACKETS segments."""
    problems = []
    autos = [u for u in units_of(result) if "auto" in u["cells"]]
    if not autos:
        return ['no "auto" trials were run: nothing to check']
    for u in autos:
        cell, name = u["cells"]["auto"], u["name"]
        n = cell["trials"]
        if cell["ok"] < n:
            problems.append(f"{name}: {n - cell['ok']}/{n} auto trials did not end connected "
                            f"({_reasons(cell)})")
        if u["kind"] == "lan":
            if cell["direct"] < n:
                problems.append(f"{name}: direct in {cell['direct']}/{n} auto trials "
                                f"(relay {cell['relay']}), expected {n}/{n} over the LAN")
            for side, key in (("connecting", "pairs"), ("accepting", "accept_pairs")):
                kinds = cell.get(key) or {}
                if cell["direct"] and set(kinds) != {"host-host"}:
                    problems.append(f"{name}: the {side} side won by {_counts(kinds)}, "
                                    f"expected host-host in every trial")
            for side, key in (("connecting", "sent"), ("accepting", "accept_sent")):
                spread = cell.get(key)
                if spread and spread["max"] >= LAN_PACKETS:
                    problems.append(f"{name}: the {side} side sent up to {spread['max']} "
                                    f"packets (median {spread['median']:g}), expected fewer "
                                    f"than {LAN_PACKETS}")
        elif u["kind"] == "dual":
            want = u.get("expect")
            if want in ("direct", "v6") and cell["direct"] < n:
                problems.append(f"{name}: direct in {cell['direct']}/{n} auto trials "
                                f"(relay {cell['relay']}), expected {n}/{n}")
            if want == "v6" and (cell.get("families") or {}).get("IPv6", 0) < cell["direct"]:
                problems.append(f"{name}: won over {_counts(cell['families'])}, expected "
                                f"IPv6 in every trial")
            if want == "relay" and cell["relay"] < cell["ok"]:
                problems.append(f"{name}: {cell['direct']} direct trials where only the "
                                f"relay can join the two (no family in common, or two "
                                f"random NAPTs and IPv6 on one side only)")
        elif direct_expected(u["a"], u["b"], u["kind"]) and cell["direct"] < n:
            problems.append(f"{name}: direct in {cell['direct']}/{n} auto trials "
                            f"(relay {cell['relay']}), expected {n}/{n}")
    return problems


def _reasons(cell: dict) -> str:
    return ", ".join(f"{k or '?'} x{v}" for k, v in cell["failures"].items()) or "-"


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) \
        or "-"


# -- where and what ---------------------------------------------------------------------
def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "system": platform.system()}


def code_state() -> dict:
    """Which fastpunch ran: its directory and version, and when that is a
    checkout's source tree (``<checkout>/src/fastpunch``), the commit and
    the files of ``src/`` changed since."""
    import fastpunch

    package = os.path.dirname(os.path.abspath(fastpunch.__file__))
    state = {"fastpunch": package, "version": fastpunch.__version__}
    src = os.path.dirname(package)
    checkout = os.path.dirname(src)
    if os.path.basename(src) != "src" or not os.path.exists(os.path.join(checkout, ".git")):
        return state
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        state["commit"] = head
        state["uncommitted_src"] = sorted(line[3:] for line in dirty if line.strip())
    return state


# -- the document -----------------------------------------------------------------------
def cell_text(cell: dict, auto: bool) -> str:
    n, ok = cell["trials"], cell["ok"]
    if not n:
        return ""
    text = f"{ok}/{n}"
    if ok:
        text += f" · {cell['median_s']:.2f} s"
        if auto:
            text += " · " + " ".join(f"{cell[p]} {p[0]}" for p in ("direct", "relay") if cell[p])
    else:
        top = max(cell["failures"].items(), key=lambda kv: kv[1])[0] if cell["failures"] else ""
        text += f" ({top})" if top else ""
    return text


def _sent_text(spread: Optional[dict]) -> str:
    return f"{spread['median']:g} / {spread['max']}" if spread else "-"


def _natcheck_text(unit: dict) -> str:
    """What the devices' natcheck said, per site."""
    sites = collections.defaultdict(set)
    for name, r in unit.get("natcheck", {}).items():
        side = "a" if name.startswith("cam") else ("a2" if unit["kind"] == "lan" else "b")
        sites[side].add(r.get("nat", "?") + (f" ({r['portmap']})" if r.get("portmap") else ""))
    return "; ".join(f"{side}: {', '.join(sorted(v))}" for side, v in sorted(sites.items())) \
        or "-"


HOW_HEADER = ["connected", "direct · relay", "median", "from start", "won by",
              "winning pair (connecting side)", "sent: connecting (median / max)",
              "sent: accepting (median / max)", "natcheck"]


def _how_row(unit: dict, first: list) -> str:
    c = unit["cells"]["auto"]
    start = c["median_from_start_s"]
    cols = first + [f"{c['ok']}/{c['trials']}" + (f" ({_reasons(c)})" if c["ok"] < c["trials"]
                                                  else ""),
                    f"{c['direct']} · {c['relay']}",
                    f"{c['median_s']:.2f} s" if c["median_s"] is not None else "-",
                    f"{start * 1000:.0f} ms" if start is not None else "-",
                    _counts(c["strategies"]), _counts(c.get("pairs") or {}),
                    _sent_text(c.get("sent")), _sent_text(c.get("accept_sent")),
                    _natcheck_text(unit)]
    return "| " + " | ".join(cols) + " |"


def _how_table(units: list, first_header: list, first: Callable) -> list:
    rows = ["| " + " | ".join(first_header + HOW_HEADER) + " |",
            "|" + "---|" * (len(first_header) + len(HOW_HEADER))]
    return rows + [_how_row(u, first(u)) for u in units if "auto" in u["cells"]]


def table(result: dict, strategy: str, profiles: list) -> list:
    cells = {}
    for pair in units_of(result, "pair"):
        if strategy in pair["cells"]:
            cells[(pair["a"], pair["b"])] = cells[(pair["b"], pair["a"])] = \
                pair["cells"][strategy]
    rows = ["| connects ↓ · accepts → | " + " | ".join(f"`{p}`" for p in profiles) + " |",
            "|---|" + "---|" * len(profiles)]
    for r in profiles:
        line = [cell_text(cells[(r, c)], strategy == "auto") if (r, c) in cells else ""
                for c in profiles]
        rows.append(f"| `{r}` | " + " | ".join(line) + " |")
    return rows


STRATEGY_NOTES = {
    "auto": "The CCS's whole plan (proto/plan.py): the crafted race first (`symmetric` over "
            "every candidate pair, joined by `predict` toward a sequential NAPT and `spray` "
            "where exactly one side is a random NAPT and the other offers no port mapping), "
            "`spoof` between two sides without NAT, the relay joined in parallel 1 s after "
            "the start and used only when nothing direct worked; two random NAPTs without a "
            "mapping go to the relay at once.",
    "symmetric": "Crafted simultaneous open over every candidate pair (both sides send SYN, "
                 "answer the peer's SYN with SYN-ACK), then the TCP_REPAIR hand-off to a "
                 "kernel socket.",
    "nat": "The original method: the initiator sends SYN, the responder an unsolicited "
           "SYN-ACK. Behind a Linux NAT that opening SYN-ACK is INVALID to conntrack and "
           "leaves untranslated (LAB-NOTES 2), so this works only where the responder is "
           "not behind a NAT.",
    "simopen": "Plain kernel simultaneous open (bind + connect from the announced port, one "
               "socket until it dies): the baseline.",
    "predict": "Port prediction: toward a side whose natcheck found a sequential NAPT, flows "
               "to its predicted next ports. Forced where no side is sequential it has "
               "nothing to try.",
    "spray": "Birthday spray: 512 source ports on the random-NAPT side, 512 fresh candidate "
             "ports a round on the other, batched SYNs. Forced where no side is a random NAPT "
             "it has nothing to try.",
    "spoof": "SYNs that carry the CCS's address as their source, for stateful firewalls "
             "without NAT (docs/punch.md).",
    "upnp": "A kernel connection to a port the peer's gateway mapped for it (PCP, NAT-PMP, "
            "UPnP-IGD).",
}

KNOWN_LIMIT = (
    "`napt-sequential:napt-random` is measured, not checked: it mostly ends on the relay, and "
    "no amount of spraying fixes that (docs/punch.md). Both NATs give every new flow its own "
    "external port, and each conntrack entry lets in only its exact reply tuple. The "
    "sequential side's *j*-th new flow leaves from a predictable port *s₀ + j*, but toward "
    "one guessed port of the random side; it opens only if one of the random side's SYNs "
    "aimed at exactly *s₀ + j* drew exactly that guess. Spreading *N* random-side SYNs over "
    "the sequential ports gives a chance of about *N* / 64,512 in all, however the guesses "
    "are arranged (no birthday effect: each sequential flow pairs with one guess); 90% "
    "would take some 150,000 SYNs, and as many conntrack entries, per attempt. "
    "`napt-random:napt-random` goes to the relay at once. A gateway that grants a port "
    "mapping on either side (`upnp`) makes both direct. Crowded "
    "`napt-sequential:napt-sequential` is measured, not checked either: two sequential "
    "NAPTs connect when each side's flows take the ports the other predicted, in order; "
    "neighbours punching through the same NATs at the same moment take ports in between, "
    "on both sides, and no window of guesses realigns them (a sequential NAPT facing any "
    "other kind stays direct: the other side's 8 guesses cover the shift).")


def _profiles_of(units: list) -> list:
    seen = []
    for u in units:
        for p in (u["a"], u["b"]):
            if p not in seen:
                seen.append(p)
    order = {p: i for i, p in enumerate(PROFILE_ORDER)}
    return sorted(seen, key=lambda p: order.get(p, len(order)))


def _header(result: dict, command: str) -> list:
    m, code = result["machine"], result["code"]
    if code.get("commit"):
        where = f"commit {code['commit']}" + (
            f", with uncommitted changes in {', '.join(code['uncommitted_src'])}"
            if code.get("uncommitted_src") else "")
    else:
        where = (f"fastpunch {code.get('version', '?')} from {code.get('fastpunch', '?')} "
                 "(not a checkout's source tree: no commit known)")
    ready = result.get("ready_timeout", READY_TIMEOUT)
    return ["# Compatibility matrix", "",
            "Which lab gateway profiles and topologies (docs/lab.md) let devices connect, by "
            "which strategy and candidate pair, how often, how fast and in how many packets. "
            "Generated by `fastpunch lab matrix` (src/fastpunch/lab/matrix.py) from a real "
            "run; rerun it to update this file rather than editing it.", "",
            f"* Command: `{command}`",
            f"* Date: {result['date']} ({result['seconds'] / 60:.1f} min)"
            + ("; this page was rendered again from that run's JSON (`--from-json`)"
               if result.get("rendered_from") else ""),
            f"* Machine: {m['cpus']} CPU {m['cpu'] or 'unknown CPU'}, Linux {m['kernel']}, "
            f"Python {m['python']}",
            f"* Code: {where}",
            f"* {result['trials']} trials per cell, each bounded at "
            f"{result['trial_timeout']:.0f} s; one lab and one CCS per cell, fresh "
            f"connect()/accept() per trial; lab delay {result['delay_ms']:g} ms; "
            + ("devices announced their profile as their NAT guess"
               if result["nat_hints"] else
               "devices ran natcheck (nat=\"auto\") and announced what it found, so the "
               "CCS planned from that evidence (proto/plan.py)")
            + (f"; {result['jobs']} cells ran in parallel (one lab each)"
               if result["jobs"] > 1 else "") + ".",
            f"* After logging in, every device waited for its background natcheck "
            f"(`dev.ready({ready:g})`) before its first trial (and again after a failed "
            "trial, which logs both sides in afresh), so the trials measure connections, "
            "not a device's first natcheck. A device that calls `connect()` right after "
            "logging in does not wait: its first connection is planned on whatever "
            "evidence is in by then.",
            ""]


def _summary(result: dict) -> list:
    groups = collections.defaultdict(list)
    for u in units_of(result):
        c = u["cells"].get("auto")
        if c is None:
            continue
        if c["ok"] < c["trials"]:
            groups["failed"].append(f"{u['name']} ({c['ok']}/{c['trials']} connected)")
        elif c["direct"] == c["trials"]:
            groups["direct"].append(u["name"])
        elif c["relay"] == c["trials"]:
            groups["relay"].append(u["name"])
        else:
            groups["mixed"].append(f"{u['name']} ({c['direct']} direct, {c['relay']} relay)")
    out = ["## Summary (\"auto\")", ""]
    for key, label in (("direct", "Direct in every trial"), ("relay", "Relay in every trial"),
                       ("mixed", "Direct in some trials, relay in the others"),
                       ("failed", "Some trials did not connect at all")):
        items = groups.get(key, [])
        out.append(f"* **{label}** ({len(items)}): " + (", ".join(items) or "none"))
    autos = [u for u in units_of(result) if "auto" in u["cells"]]
    expected = [u for u in autos if u["kind"] not in ("lan", "dual") and
                direct_expected(u["a"], u["b"], u["kind"])]
    lans = [u for u in autos if u["kind"] == "lan"]
    duals = [u for u in autos if u["kind"] == "dual"]
    problems = check(result)

    def met(units, test) -> str:
        return "**met**" if all(test(u["cells"]["auto"]) for u in units) else "**NOT met**"

    def host_host(c) -> bool:
        return (c["direct"] == c["trials"] and set(c.get("pairs") or {}) == {"host-host"}
                and set(c.get("accept_pairs") or {}) == {"host-host"}
                and all((c.get(k) or {"max": 0})["max"] < LAN_PACKETS
                        for k in ("sent", "accept_sent")))

    limits = [u for u in autos if u["kind"] not in ("lan", "dual") and
              not direct_expected(u["a"], u["b"], u["kind"])]
    dual_failed = [u["name"] for u in duals
                   if any(p.startswith(u["name"] + ":") for p in problems)]
    out += ["", "Goals of the punching issue, as measured here:", "",
            "* Every pair and crowded cell where at least one side is not `napt-random` "
            "connects directly in 100% of trials, except `napt-sequential:napt-random` "
            f"(the known limit below): {met(expected, lambda c: c['direct'] == c['trials'])} "
            f"({len(expected)} such cell(s)).",
            "* Every trial ends connected, on the relay when it cannot go direct: "
            f"{met(autos, lambda c: c['ok'] == c['trials'])}.",
            "* Two devices behind one gateway connect over their LAN: the winning pair is "
            f"`host-host` on both sides in every trial, each side sending fewer than "
            f"{LAN_PACKETS} packets, whatever the hairpin mode: {met(lans, host_host)} "
            f"({len(lans)} same-LAN cell(s)).",
            "* Dual stack: where both sides have IPv6, direct in every trial, over IPv6 "
            "where IPv4 alone cannot go direct; with no family in common, the relay: "
            + ("**met**" if not dual_failed else f"**NOT met** ({', '.join(dual_failed)})")
            + f" ({len(duals)} dual-stack cell(s)).",
            "* Measured, not checked (the known limit): "
            + ("; ".join(f"{u['name']}: {u['cells']['auto']['direct']} direct, "
                         f"{u['cells']['auto']['relay']} relay" for u in limits) or "none run")
            + ".", "",
            "`fastpunch lab matrix --check` on this run: "
            + ("**passed**." if not problems else "**failed**:"), ""]
    return out + [f"  * {p}" for p in problems] + ([""] if problems else [])


LEGEND = [
    "## Legend", "",
    "* Pair tables: rows are the side that calls `connect()` (site a), columns the side "
    "that calls `accept()` (site b). Each unordered pair ran once, with the profile listed "
    "first (earlier row) connecting; the mirrored cell repeats it. Only the `nat` strategy "
    "is asymmetric (the accepting side sends the unsolicited SYN-ACK), so its mirrored "
    "cells say nothing about the other direction.",
    "* A cell reads `connected/trials · median seconds`; the time is the connecting side's "
    "`report.seconds`, from the `connect()` call to a connected socket: the rendezvous at "
    "the CCS, the punch and the hand-off (not natcheck: see above). In the \"auto\" table "
    "`d` counts trials that ended direct and `r` trials that ended on the CCS relay.",
    "* *from start*: median `seconds` of the attempt that won, from the moment it began "
    "(the crafted race begins as soon as a side has the peer's candidates) to the "
    "connected socket; direct trials only.",
    "* *won by*: the winning pair's policy (`report.strategy`: `symmetric`, `predict`, "
    "`spray`, ...; `relay`). The race itself is one attempt named by every policy in it "
    "(`attempt.strategy`, e.g. `symmetric+predict+spray`: in the JSON output).",
    "* *winning pair*: the kind of the candidate pair that completed on the connecting "
    "side (`report.pair.split()[0]`: our candidate's kind, then the peer's): `host` a LAN "
    "address, `srflx` the address the CCS saw for the very punch port, `mapped` a port the "
    "gateway granted (PCP, NAT-PMP, UPnP-IGD), `predicted` a guessed port (a sequential "
    "NAPT's next one); or one word for a flow that no announced pair describes: `prflx` "
    "(peer-reflexive: the peer's SYN came from an address nobody announced, e.g. a random "
    "NAPT's new port aimed at our mapped one), `spray` (a birthday-spray hit). Counted over "
    "direct trials; the accepting side's kinds are in the JSON output (`accept_pairs`).",
    "* *sent*: the segments each side sent over every attempt of the connection "
    "(`report.sent`: openers, SYNs, SYN-ACKs, ACKs, spray), median / max over every trial "
    "of the cell, failed ones included.",
    "* *natcheck*: what each site's devices' natcheck reported (`dev.natcheck_result`), "
    "which is what the CCS planned from.",
    "* `0/N (reason)`, `(reason xK)`: trials that did not connect, by their commonest "
    "failure word (`timeout`: the strategy's slot ended without a handshake; `no-path`: "
    "nothing direct worked and the relay was not allowed, as for a forced strategy; "
    "`reset`: an RST ended it; `one-sided`: one side returned a socket and the other gave "
    "up; `login-failed`: a device could not log in to the CCS; `no-data`: the sockets "
    "did not carry the test bytes; `hung`: stopped at the "
    "trial's time bound, when no report is left).",
    f"* A trial counts as connected only when both sides reported the same path and "
    f"{EXCHANGE_BYTES} bytes crossed each way through the sockets they were handed.",
    ""]


def _pair_sections(result: dict) -> list:
    pairs = units_of(result, "pair")
    if not pairs:
        return []
    profiles = _profiles_of(pairs)
    out = ["## Pairs of profiles", "",
           "A camera on site a's host, a viewer on site b's (docs/lab.md, Topology).", ""]
    strategies = [s for s in ["auto"] + list(result["strategies"]) if s in result["strategies"]]
    for strategy in dict.fromkeys(strategies):
        out += [f"### `{strategy}`" + (" (forced on both sides, no relay)"
                                       if strategy != "auto" else ""), "",
                STRATEGY_NOTES.get(strategy, ""), ""]
        out += table(result, strategy, profiles) + [""]
        if strategy == "auto":
            out += ["How the \"auto\" trials connected:", ""]
            out += _how_table(pairs, ["pair"], lambda u: [f"`{u['a']}:{u['b']}`"]) + [""]
    return out


def _section(title: str, units: list, first_header: list, first: Callable,
             intro: str) -> list:
    return [f"## {title}", "", intro, ""] + _how_table(units, first_header, first) + [""]


def _lan_section(result: dict) -> list:
    lans = units_of(result, "lan")
    if not lans:
        return []
    intro = (
        "Camera and viewer on two hosts behind one gateway (`Lab(a=P, hosts={\"a\": 2}, "
        "hairpin={\"a\": MODE})`: host `a` connects, host `a2` accepts), both talking to "
        "the CCS in the core. The hairpin mode is what the gateway does with a LAN "
        "host's packet to its own WAN address (docs/lab.md, Hairpin): `off`, the "
        "gateway's kernel answers it with RST; `wan`, it reaches the other host from "
        "the sender's external address, as from a remote peer; `lan`, from the "
        "gateway's LAN address. `cgn` and the profiles without NAT run `off` only (the "
        "lab builds hairpin for a single NAT gateway). Goal: the `host-host` pair wins "
        f"on both sides, in fewer than {LAN_PACKETS} packets a side.")
    return _section("Same LAN", lans, ["gateway", "hairpin"],
                    lambda u: [f"`{u['a']}`", f"`{u['hairpin']}`"], intro)


def _crowded_section(result: dict) -> list:
    crowded = units_of(result, "crowded")
    if not crowded:
        return []
    u0 = crowded[0]
    hosts, (low, high) = u0["hosts"], u0["port_range"] or (0, 0)
    names = ", ".join(["a"] + [f"a{i}" for i in range(2, hosts + 1)])
    intro = (
        f"{hosts} cameras on hosts {names} behind one gateway of the first profile "
        f"connect at the same time to {hosts} viewers on b, b2, ... behind a gateway of "
        f"the second (camN to viewerN, each viewer accepting only its camera), every "
        f"host with the ephemeral ports {low}-{high}, so hosts sharing a NAT pick the "
        "same ports and their gateway resolves the collisions on its own "
        "(docs/lab.md, Ephemeral port ranges). Each trial counts "
        f"{hosts} connections.")
    return _section("Crowded", crowded, ["camera side", "viewer side"],
                    lambda u: [f"`{u['a']}`", f"`{u['b']}`"], intro)


def _dual_section(result: dict) -> list:
    duals = units_of(result, "dual")
    if not duals:
        return []
    intro = (
        "Dual stack (docs/lab.md, IPv6): each side is `PROFILE/V6`, its IPv4 gateway "
        "profile and its IPv6 one (`open`; `firewall`, stateful, the home-router "
        "default; `firewall-rst`, which answers unsolicited SYNs with RST; `nat66`, a "
        "unique local LAN masqueraded, filtered as `firewall`), `PROFILE` "
        "alone for a site without IPv6, `none/V6` for an IPv6-only site (its devices log "
        "in over IPv6; the others over IPv4, and learn the CCS's IPv6 address at login). "
        "Goals: where both sides have IPv6, direct in every trial, over IPv6 where IPv4 "
        "alone could not go direct; where they share no family, the relay in every trial.")
    return _section("Dual stack", duals, ["camera side", "viewer side", "expected", "won over"],
                    lambda u: [f"`{Unit.spec(u['a'], u['v6a'], u['v4a'])}`",
                               f"`{Unit.spec(u['b'], u['v6b'], u['v4b'])}`",
                               {"v6": "direct over IPv6", "direct": "direct",
                                "relay": "relay"}.get(u.get("expect"), "measured"),
                               _counts(u["cells"]["auto"].get("families") or {}) or "-"],
                    intro)


def _attempts_text(items: list) -> str:
    return "; ".join(f"{a['strategy']} {'ok' if a['ok'] else a['reason'] or 'failed'}"
                     f" (sent {a['sent']}, seen {a['seen']})" for a in items) or "no report"


def _first_events(trial: dict, n: int = 3) -> str:
    events = [line.strip() for line in trial.get("report_lines", [])
              if line.startswith("      ") and "pair " not in line[:12]][:n]
    return (" First events on the connecting side: " + " / ".join(f"`{e}`" for e in events)
            + ".") if events else ""


def _shortfalls(result: dict) -> list:
    """One sample trial for every "auto" cell short of its goal; forced
    strategies' empty cells grouped by strategy and reason."""
    notes = []
    problems = check(result)
    for u in units_of(result):
        c = u["cells"].get("auto")
        if c is None or not any(p.startswith(u["name"] + ":") for p in problems):
            continue
        expect_direct = (u["kind"] == "lan" or u.get("expect") in ("direct", "v6")) if \
            u["kind"] in ("lan", "dual") else direct_expected(u["a"], u["b"], u["kind"])
        sample = next((r for r in u["trials"]["auto"]
                       if not r["ok"] or (expect_direct and r["path"] != "direct")
                       or (u["kind"] == "lan" and r.get("pair_kind") != "host-host")), None)
        if sample is None:
            sample = max(u["trials"]["auto"], key=lambda r: (r.get("sent") or 0))
        notes.append(f"* {u['name']}: {c['ok']}/{c['trials']} connected, {c['direct']} "
                     f"direct, {c['relay']} relay. One such trial: "
                     + (f"{sample['path']} via {sample['strategy']} by "
                        f"`{sample.get('pair') or '-'}`; " if sample["ok"] else "")
                     + f"connecting side {_attempts_text(sample['attempts'])}; accepting "
                     f"side {_attempts_text(sample['accept_attempts'])}."
                     + _first_events(sample)
                     + (f" Error: {sample['error'][:200]}" if sample["error"] else ""))
    forced = collections.defaultdict(list)
    for u in units_of(result, "pair"):
        for strategy, c in u["cells"].items():
            if strategy != "auto" and c["trials"] and not c["ok"]:
                top = max(c["failures"].items(), key=lambda kv: kv[1])[0] \
                    if c["failures"] else "?"
                forced[(strategy, top)].append(f"`{u['name']}`")
    for (strategy, reason), names in sorted(forced.items()):
        notes.append(f"* `{strategy}` forced, no trial connected ({reason}): "
                     f"{', '.join(names)}.")
    if not notes:
        return []
    return ["## Where cells fell short", "",
            "Per-trial reports (both sides' attempts, pairs and events) are in the JSON "
            "output (`--json`). Forced strategies are expected to fail where their method "
            "cannot work (see each one's note).", ""] + notes + [""]


def render(result: dict, command: str) -> str:
    """docs/compatibility.md from a :func:`run_matrix` result."""
    out = _header(result, command)
    if any("auto" in u["cells"] for u in units_of(result)):
        out += _summary(result)
    out += LEGEND
    out += _pair_sections(result) + _lan_section(result) + _crowded_section(result) + \
        _dual_section(result)
    if units_of(result, "pair") or units_of(result, "crowded"):
        out += ["## The known limit", "", KNOWN_LIMIT, ""]
    out += _shortfalls(result)
    return "\n".join(out).rstrip() + "\n"


# -- command line -----------------------------------------------------------------------
def _split(values) -> list:
    return [v for item in values for v in item.replace(",", " ").split()]


def _port_range(text: str) -> tuple:
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 1024 <= int(low) <= int(high) \
            <= 65535:
        raise argparse.ArgumentTypeError(f"LOW-HIGH within 1024-65535: {text!r}")
    return int(low), int(high)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``fastpunch lab matrix``."""
    which = ap.add_argument_group(
        "which cells", "with none of --pairs, --lan, --crowded, --dual: the full matrix over "
                       "--profiles (every pair, every same-LAN cell, the crowded cells: each "
                       f"profile facing itself and {CROWDED_AGAINST} facing every other, "
                       "napt-ei left out: the lab's cannot pick another port on a collision); "
                       "with any of them, only the cells they name (e.g. --profiles nat cgn "
                       "--pairs all: the three pairs of nat and cgn, nothing else)")
    which.add_argument("--profiles", nargs="+", metavar="PROFILE",
                       help="profiles of the full matrix, space or comma separated "
                            "(default: every profile of the lab)")
    which.add_argument("--pairs", metavar="A:B,...|all",
                       help="profile pairs, the first profile connects; all: every pair of "
                            "--profiles (default: none when another kind is named)")
    which.add_argument("--lan", metavar="P[:MODE],...|all",
                       help="same-LAN cells: two hosts behind a gateway of profile P with "
                            "hairpin MODE (off, wan, lan; P alone: every mode the lab builds "
                            "for it); all: every profile of --profiles")
    which.add_argument("--crowded", metavar="P:Q,...|all",
                       help="crowded cells: --hosts cameras behind P connect at once to as "
                            "many viewers behind Q; all: the full matrix's crowded cells over "
                            "--profiles")
    which.add_argument("--dual", metavar="SIDE:SIDE,...|all",
                       help="dual-stack cells, each side PROFILE/V6 (V6: an IPv6 profile: "
                            "open, firewall, firewall-rst, nat66), PROFILE alone (no IPv6) or "
                            "none/V6 (IPv6-only), IPv6 on one side at least; all: the full "
                            "matrix's over --profiles")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), metavar="STRATEGY",
                    help="for the pairs, forced on both sides, or auto (the plan); same-LAN "
                         "and crowded cells run auto only (default: "
                         + " ".join(STRATEGIES) + ")")
    ap.add_argument("--trials", type=int, default=10,
                    help="trials per cell, 1-1000 (default: %(default)s)")
    ap.add_argument("--trial-timeout", type=float, default=TRIAL_TIMEOUT, metavar="SECONDS",
                    help="bound of one trial (default: %(default)s)")
    ap.add_argument("--delay", "--delay-ms", dest="delay_ms", type=float, default=0.0,
                    metavar="MS", help="one-way delay of every site's access link "
                                       "(default: %(default)s)")
    ap.add_argument("--hosts", type=int, default=CROWDED_HOSTS,
                    help="crowded cells: hosts (and connections) a side, 2-8 "
                         "(default: %(default)s)")
    ap.add_argument("--port-range", type=_port_range, default=CROWDED_PORTS,
                    metavar="LOW-HIGH", help="crowded cells: every host's ephemeral ports "
                                             "(default: %d-%d)" % CROWDED_PORTS)
    ap.add_argument("--nat-hints", action="store_true",
                    help="devices announce their gateway's profile as their NAT guess "
                         "instead of running natcheck (default: natcheck)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="cells run at once, each in its own process and lab, 1-16 "
                         "(default: %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="write every trial's record here "
                                                   "(default: no JSON)")
    ap.add_argument("--doc", default=DEFAULT_DOC, metavar="PATH",
                    help="the markdown page to write (default: %(default)s, relative to the "
                         "current directory: the published matrix; use --no-doc for trial "
                         "runs)")
    ap.add_argument("--no-doc", action="store_true", help="write no page")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless the issue's goals hold for \"auto\" (see the page)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="run nothing: render the page (and --check) from a saved --json file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def _units_from(args, ap) -> list:
    """The units the options name: each of --pairs, --lan, --crowded is a
    list, or "all" (its full set over --profiles); with none of them, all
    three in full."""
    if not 2 <= args.hosts <= 8:
        ap.error("--hosts 2..8")
    try:
        profiles = _split(args.profiles) if args.profiles else all_profiles()
        for p in profiles:
            _profile(p, p)
        if not (args.pairs or args.lan or args.crowded or args.dual):
            return default_units(profiles, args.hosts, args.port_range)
        units = []
        if args.pairs == "all":
            units += [Unit("pair", a, b) for a, b in default_pairs(profiles)]
        elif args.pairs:
            units += [Unit("pair", a, b) for a, b in parse_pairs(args.pairs)]
        if args.lan == "all":
            units += lan_units(profiles)
        elif args.lan:
            units += parse_lan(args.lan)
        if args.crowded == "all":
            units += crowded_units(default_crowded(profiles), args.hosts, args.port_range)
        elif args.crowded:
            units += parse_crowded(args.crowded, args.hosts, args.port_range)
        if args.dual == "all":
            units += dual_units(profiles)
        elif args.dual:
            units += parse_dual(args.dual)
        return units
    except ValueError as exc:
        ap.error(str(exc))


def _command() -> str:
    argv = sys.argv[1:]
    if "matrix" in argv:
        argv = argv[argv.index("matrix") + 1:]
    return " ".join(["fastpunch lab matrix"] + [shlex.quote(a) for a in argv])


def cmd_matrix(args) -> int:
    """``fastpunch lab matrix``."""
    ap = args.matrix_parser
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        for unit in units_of(result):        # summaries follow this version's rules
            unit["cells"] = {s: summarize(t) for s, t in unit["trials"].items()}
        result["units"] = units_of(result)
        result.pop("pairs", None)
        result["rendered_from"] = args.from_json
        return _finish(args, result)
    strategies = _split(args.strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        ap.error(f"strategies are {', '.join(STRATEGIES)}: not {', '.join(bad)}")
    if not 1 <= args.trials <= 1000 or not 1 <= args.jobs <= 16:
        ap.error("--trials 1..1000, --jobs 1..16")
    units = _units_from(args, ap)
    if not args.no_doc and not args.worker and \
            not os.path.isdir(os.path.dirname(os.path.abspath(args.doc))):
        ap.error(f"no directory for the page {args.doc}: give --doc PATH or --no-doc")
    from fastpunch import _caps

    _caps.require("the compatibility matrix (labs, raw sockets, nftables)",
                  _caps.CAP_SYS_ADMIN, _caps.CAP_NET_ADMIN, _caps.CAP_NET_RAW)
    if any("upnp" in (u.a, u.b) for u in units):
        print("note: the upnp profile needs miniupnpd >= 2.3.9 (scripts/build-miniupnpd)",
              file=sys.stderr)
    prefix = "[worker] " if args.worker else ""
    result = run_matrix(units, strategies, args.trials, jobs=args.jobs,
                        trial_timeout=args.trial_timeout, delay_ms=args.delay_ms,
                        nat_hints=args.nat_hints,
                        log=lambda msg: print(prefix + msg, file=sys.stderr, flush=True))
    result["command"] = _command()
    return _finish(args, result)


def _finish(args, result: dict) -> int:
    if args.json and not result.get("rendered_from"):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.worker:
        return 0
    if not args.no_doc:
        with open(args.doc, "w") as f:
            f.write(render(result, result.get("command", "fastpunch lab matrix")))
        print(f"wrote {args.doc}", file=sys.stderr)
    for unit in units_of(result):
        line = f"{unit['name']:>36s}  " + "  ".join(
            f"{s}={cell_text(c, s == 'auto')}" for s, c in unit["cells"].items())
        auto = unit["cells"].get("auto")
        if auto:
            line += (f"  pairs {_counts(auto.get('pairs') or {})}; sent "
                     f"{_sent_text(auto.get('sent'))} | {_sent_text(auto.get('accept_sent'))}")
        print(line, flush=True)
    problems = check(result) if args.check else []
    for p in problems:
        print(f"CHECK: {p}", file=sys.stderr)
    if args.check and not problems:
        print("CHECK: passed", file=sys.stderr)
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastpunch lab matrix ARGS`` from Python."""
    from fastpunch.cli import main as fastpunch_main

    return fastpunch_main(["lab", "matrix", *(sys.argv[1:] if argv is None else argv)])
