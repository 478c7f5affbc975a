"""Direct connections in the NAT lab: time to a direct connection, the CCS's
whole plan ("auto": the crafted race over the candidate pairs) and crafted
"symmetric" against plain kernel "simopen" in the same run, two devices on
one LAN, and stream throughput through the TCP_REPAIR hand-off against
plain kernel TCP on the same lab path.

FASTPUNCH_PUNCH_TRIALS (default 5) connections per strategy;
FASTPUNCH_PUNCH_MIB (default 256) MiB per transfer. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import tempfile
import threading
import time
from typing import Optional

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("FASTPUNCH_PUNCH_TRIALS", "5"))
MIB = int(os.environ.get("FASTPUNCH_PUNCH_MIB", "256"))
DELAY_MS = 20.0              # one-way, on each site's access link
THROUGHPUT_TARGET = 0.95
# throughput transfers per path, interleaved; medians reported. 3 keeps the
# suite's run short; on this shared VM single rounds range 140-210 MB/s, so
# the recorded figures use more (docs/benchmarks.md)
ROUNDS = int(os.environ.get("FASTPUNCH_PUNCH_ROUNDS", "3"))


@contextlib.contextmanager
def lab_devices(a: str = "nat", b: Optional[str] = "nat", hints: bool = True,
                standing: bool = True, viewer_host: str = "b", **lab_kw):
    """A lab (nat+nat unless told), a CCS in its core, cam logged in at site
    a and viewer at b, each announcing its site's profile as its NAT (with
    ``hints``; else as not known), viewer's next-connection info announced
    ahead unless ``standing`` is false."""
    from fastpunch.lab import Lab
    from tests.punch.harness import LabCCS

    tmp = tempfile.TemporaryDirectory(prefix="bench-punch-")
    sites = {"a": a} if b is None else {"a": a, "b": b}
    with tmp, Lab(**sites, **lab_kw) as lab:
        ccs = LabCCS(lab, tmp.name)
        devices = []
        try:
            ccs.enroll("cam", "viewer")
            ccs.enroll("viewer")
            known = {"a": {"nat": a}, "b": {"nat": b}} if hints else {"a": {}, "b": {}}
            devices.append(ccs.device("a", "cam", **known["a"]))
            # the accepting side announces its info ahead, as the camera does
            devices.append(ccs.device(viewer_host, "viewer", standing=standing, **known["b"]))
            for loop, dev in devices:        # gathered, as a device that has been up a while
                loop.run(dev.ready(15))
            yield lab, ccs, devices[0], devices[1]
        finally:
            for loop, dev in devices:
                with contextlib.suppress(Exception):
                    loop.run(dev.close(), 15)
            ccs.close()


def connect(cam, viewer, strategy: str, timeout: float = 30.0):
    """cam connects, viewer accepts, both restricted to ``strategy``; both
    futures are finished when this returns or raises."""
    ca, cb, _ = connect_and_write(cam, viewer, strategy, b"", timeout)
    return ca, cb


def connect_and_write(cam, viewer, strategy: str, data: bytes, timeout: float = 30.0):
    """cam connects, viewer accepts, both restricted to ``strategy``; cam
    writes ``data`` (if any) the moment its connect() returns, before the
    accepting side is known to be done, as an application does. Both
    futures are finished when this returns or raises; returns (ca, cb, when
    the data was written)."""
    (la, a), (lb, b) = cam, viewer
    only = None if strategy == "auto" else [strategy]
    accepting = lb.submit(b.accept(strategies=only))
    try:
        ca = la.run(a.connect("viewer", strategies=only), timeout)
        if data:
            ca.sock.setblocking(True)
            ca.sock.settimeout(10)
            ca.sock.sendall(data)
        written = time.perf_counter()
    except BaseException:
        with contextlib.suppress(BaseException):
            accepting.result(timeout)
        raise
    try:
        cb = accepting.result(timeout)
    except BaseException:
        ca.sock.close()
        raise
    return ca, cb, written


def ping(s1: socket.socket, s2: socket.socket, size: int = 32) -> tuple:
    """``size`` random bytes s1 -> s2 and back; (round trip seconds, all intact)."""
    for s in (s1, s2):
        s.setblocking(True)
        s.settimeout(10)
    data = os.urandom(size)
    t0 = time.perf_counter()
    s1.sendall(data)
    got = recv_exactly(s2, size)
    s2.sendall(got)
    back = recv_exactly(s1, size)
    return time.perf_counter() - t0, got == data and back == data


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if not k:
            break
        got += k
    return bytes(buf[:got])


def timed_trial(cam, viewer, strategy: str) -> dict:
    """One connection by ``strategy``: its times, and whether it went direct
    by that strategy on both sides with 32 bytes intact each way. The 32
    bytes leave the moment connect() returns; ``peer_rtt`` is the time from
    there until they are back (one peer round trip, unless they reached the
    accepting side before its socket and had to be resent)."""
    data = os.urandom(32)
    try:
        ca, cb, written = connect_and_write(cam, viewer, strategy, data)
    except Exception as exc:
        return {"ok": False, "error": repr(exc)[:300]}
    try:
        cb.sock.setblocking(True)
        cb.sock.settimeout(10)
        got = recv_exactly(cb.sock, len(data))
        cb.sock.sendall(got)
        back = recv_exactly(ca.sock, len(data))
        rtt, intact = time.perf_counter() - written, got == data and back == data
        won = ca.report.attempts[-1]
        return {"ok": intact and ca.path == cb.path == "direct" and won.ok
                      and (strategy == "auto" or ca.strategy == cb.strategy == strategy),
                "seconds": ca.report.seconds,        # from the connect() call
                "from_start": won.seconds,           # from the stage's start (the race:
                                                     # the moment this side had the Ready)
                "accept_seconds": cb.report.seconds,
                "peer_rtt": rtt, "pair": ca.report.pair.split(" ")[0],
                "sent": ca.report.sent, "accept_sent": cb.report.sent}
    finally:
        ca.close()
        cb.close()


def tcp_rtt(lab, where: str, addr: tuple, tries: int = 5) -> float:
    """Median time of a kernel TCP connect() (one round trip) from ``where``."""
    times = []
    with lab.inside(where):
        for _ in range(tries):
            t0 = time.perf_counter()
            with socket.create_connection(addr, timeout=10):
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_time_to_direct_connection(benchmark):
    require_root("connecting through a NAT lab")
    from tests.punch.harness import CCS_PORT

    results = {"auto": [], "symmetric": [], "simopen": []}
    rtts = {}

    def run():
        with lab_devices(delay_ms=DELAY_MS) as (lab, ccs, cam, viewer):
            rtts["ccs"] = tcp_rtt(lab, "a", (lab.ccs_addr, CCS_PORT))
            for _ in range(TRIALS):
                for strategy in results:                         # interleaved, same lab
                    results[strategy].append(timed_trial(cam, viewer, strategy))

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    ok = {s: [r for r in rs if r["ok"]] for s, rs in results.items()}

    def med(strategy, key):
        values = [r[key] for r in ok[strategy]]
        return round(statistics.median(values), 4) if values else None

    peer_rtt = statistics.median([r["peer_rtt"] for rs in ok.values() for r in rs]) \
        if any(ok.values()) else None
    nominal_peer_rtt = 4 * DELAY_MS / 1000          # a->gwA->gwB->b and back: 4 delayed hops
    nominal_ccs_rtt = 2 * DELAY_MS / 1000
    target_start = 1.5 * nominal_peer_rtt
    target_connect = nominal_ccs_rtt + 1.5 * nominal_peer_rtt
    info.update({
        "trials": TRIALS, "delay_ms_one_way_per_site": DELAY_MS,
        "ccs_rtt_ms_measured": round(rtts.get("ccs", 0) * 1000, 1),
        "peer_rtt_ms_measured": round(peer_rtt * 1000, 1) if peer_rtt else None,
        "ccs_rtt_ms_nominal": nominal_ccs_rtt * 1000, "peer_rtt_ms_nominal": nominal_peer_rtt * 1000,
        **{f"{s}_ok": f"{len(ok[s])}/{TRIALS}" for s in results},
        **{f"{s}_median_s": med(s, "seconds") for s in results},
        **{f"{s}_from_start_median_s": med(s, "from_start") for s in results},
        **{f"{s}_accept_median_s": med(s, "accept_seconds") for s in results},
        **{f"{s}_packets_sent_median": med(s, "sent") for s in results},
        "auto_pairs": sorted({r["pair"] for r in ok["auto"]}),
        # the first 32 bytes, written the moment connect() returned, there
        # and back: one peer round trip, unless they met a side still
        # handing off and waited for a retransmission
        **{f"{s}_first_exchange_ms_median_max": [
            round(statistics.median(r["peer_rtt"] for r in ok[s]) * 1000, 1),
            round(max(r["peer_rtt"] for r in ok[s]) * 1000, 1)] for s in results if ok[s]},
        "symmetric_times_s": [round(r["seconds"], 4) for r in ok["symmetric"]],
        "simopen_times_s": [round(r["seconds"], 4) for r in ok["simopen"]],
        "target_from_start_s": target_start,
        "target_from_connect_s": target_connect,
        "target_note": "one CCS round trip + 1.5 peer round trips from connect() (the "
                       "issue's floor: one CCS round trip + half a peer round trip, "
                       "floor_s): the viewer announced its next-connection info ahead "
                       "(standing), so the rendezvous is one CCS round trip, and the race "
                       "sends its SYNs the moment the Ready is in",
        "floor_s": nominal_ccs_rtt + nominal_peer_rtt / 2,
        "failures": [r["error"] for rs in results.values() for r in rs if "error" in r][:5],
    })
    info["auto_within_s_of_floor"] = (round(info["auto_median_s"] - info["floor_s"], 4)
                                      if info["auto_median_s"] is not None else None)
    sym, sim = info["symmetric_median_s"], info["simopen_median_s"]
    sym_start = info["symmetric_from_start_median_s"]
    info["target_from_start_met"] = sym_start is not None and sym_start <= target_start
    info["target_from_connect_met"] = sym is not None and sym <= target_connect
    info["faster_than_simopen"] = sym is not None and sim is not None and sym < sim
    info["faster_than_simopen_from_start"] = (
        sym_start is not None and info["simopen_from_start_median_s"] is not None
        and sym_start < info["simopen_from_start_median_s"])
    info["correct"] = all(len(ok[s]) == TRIALS for s in results)


def test_time_to_connect_on_one_lan(benchmark):
    """Camera and phone behind one home gateway (the CCS 20 ms away on the
    gateway's access link, the LAN between them instant): the race's host
    pair goes over the LAN. Targets: direct over the LAN, under 50 ms from
    the start, fewer than 20 packets per side."""
    require_root("connecting through a NAT lab")
    results = []

    def run():
        with lab_devices("nat", None, viewer_host="a2", hosts={"a": 2},
                         delay_ms=DELAY_MS) as (lab, ccs, cam, viewer):
            for _ in range(TRIALS):
                results.append(timed_trial(cam, viewer, "auto"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    ok = [r for r in results if r["ok"]]
    info = benchmark.extra_info

    def med(key):
        return round(statistics.median(r[key] for r in ok), 4) if ok else None

    info.update({
        "trials": TRIALS, "delay_ms_one_way_ccs": DELAY_MS, "ok": f"{len(ok)}/{TRIALS}",
        "median_s": med("seconds"), "from_start_median_s": med("from_start"),
        "accept_median_s": med("accept_seconds"),
        "pairs": sorted({r["pair"] for r in ok}),
        "packets_sent_max": max((max(r["sent"], r["accept_sent"]) for r in ok), default=None),
        "failures": [r["error"] for r in results if "error" in r][:5],
    })
    info["target_from_start_met"] = info["from_start_median_s"] is not None and \
        info["from_start_median_s"] < 0.05
    info["target_packets_met"] = info["packets_sent_max"] is not None and \
        info["packets_sent_max"] < 20
    info["correct"] = len(ok) == TRIALS and info["pairs"] == ["host-host"]


def test_time_to_connect_over_ipv6_beside_ipv4(benchmark):
    """Time to a direct connection over IPv6 (two sites whose IPv4 is a
    random NAPT each, only the relay's; their IPv6 behind stateful
    firewalls) beside the same over IPv4 (two port-preserving NATs, no
    IPv6), 20 ms one way on each site's link, the CCS's whole plan ("auto")
    in both. Target: IPv6 no slower than IPv4 (the same race, the same
    round trips: no NAT to map)."""
    require_root("connecting through a NAT lab")
    results = {"ipv6": [], "ipv4": []}
    labs = {"ipv6": dict(a="napt-random", b="napt-random", v6="firewall"),
            "ipv4": dict(a="nat", b="nat")}

    def run():
        for name, kw in labs.items():
            a, b = kw.pop("a"), kw.pop("b")
            with lab_devices(a, b, delay_ms=DELAY_MS, **kw) as (lab, ccs, cam, viewer):
                for _ in range(TRIALS):
                    results[name].append(timed_trial(cam, viewer, "auto"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    info.update({"trials": TRIALS, "delay_ms_one_way_per_site": DELAY_MS,
                 "ipv6_lab": "napt-random:napt-random, IPv6 firewall:firewall",
                 "ipv4_lab": "nat:nat, no IPv6"})
    for name, rs in results.items():
        ok = [r for r in rs if r["ok"]]
        info[f"{name}_ok"] = f"{len(ok)}/{TRIALS}"
        info[f"{name}_pairs"] = sorted({r["pair"] for r in ok})
        if ok:
            for key in ("seconds", "from_start", "sent"):
                info[f"{name}_{key}_median"] = round(statistics.median(r[key] for r in ok), 4)
    info["failures"] = [r["error"] for rs in results.values() for r in rs if "error" in r][:5]
    v6, v4 = info.get("ipv6_seconds_median"), info.get("ipv4_seconds_median")
    info["ratio_v6_to_v4"] = round(v6 / v4, 3) if v6 and v4 else None
    info["target_met"] = info["ratio_v6_to_v4"] is not None and info["ratio_v6_to_v4"] <= 1.1
    info["correct"] = all(len([r for r in rs if r["ok"]]) == TRIALS for rs in results.values())


@pytest.mark.parametrize("a,b,strategies", [
    ("upnp", "nat", ("upnp", "symmetric", "simopen")),
    ("firewall-liberal", "firewall-liberal", ("spoof", "symmetric", "simopen"))])
def test_time_to_connect_mapping_and_spoof(benchmark, a, b, strategies):
    """The gateway-mapping and spoof strategies against symmetric and simopen
    on a pair where all three work, 20 ms one way on each site's link,
    interleaved in one lab."""
    require_root("connecting through a NAT lab")
    results = {s: [] for s in strategies}

    def run():
        with lab_devices(a, b, delay_ms=DELAY_MS) as (lab, ccs, cam, viewer):
            for _ in range(TRIALS):
                for strategy in strategies:
                    results[strategy].append(timed_trial(cam, viewer, strategy))

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    info.update({"pair": f"{a}:{b}", "trials": TRIALS, "delay_ms_one_way_per_site": DELAY_MS})
    for strategy, rs in results.items():
        ok = [r for r in rs if r["ok"]]
        info[f"{strategy}_ok"] = f"{len(ok)}/{TRIALS}"
        if ok:
            info[f"{strategy}_median_s"] = round(statistics.median(r["seconds"] for r in ok), 4)
            info[f"{strategy}_from_start_median_s"] = round(
                statistics.median(r["from_start"] for r in ok), 4)
    info["failures"] = [r["error"] for rs in results.values() for r in rs if "error" in r][:5]
    info["correct"] = all(len([r for r in rs if r["ok"]]) == TRIALS for rs in results.values())


def transfer(src: socket.socket, dst: socket.socket, total: int) -> tuple:
    """``total`` bytes src -> dst: a sender thread, a recv_into loop here.
    Returns (seconds, bytes received)."""
    for s in (src, dst):
        s.setblocking(True)
        s.settimeout(60)
    block = memoryview(os.urandom(1 << 20))
    sent = {"n": 0, "error": None}

    def send():
        try:
            while sent["n"] < total:
                sent["n"] += src.send(block[:min(len(block), total - sent["n"])])
        except OSError as exc:
            sent["error"] = exc

    buf = bytearray(1 << 20)
    thread = threading.Thread(target=send, daemon=True)
    got = 0
    t0 = time.perf_counter()
    thread.start()
    try:
        while got < total:
            n = dst.recv_into(buf, min(len(buf), total - got))
            if not n:
                break
            got += n
    except OSError:
        pass
    seconds = time.perf_counter() - t0
    thread.join(60)
    return seconds, got if sent["error"] is None else -1


def inet_pair(lab) -> tuple:
    """A plain kernel TCP connection from host a (behind its NAT) to a
    listener in the lab's core on the CCS address: one NAT, not two."""
    with lab.inside("inet"):
        listener = socket.socket()
        listener.bind((lab.ccs_addr, 0))
        listener.listen(1)
    try:
        with lab.inside("a"):
            client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    finally:
        listener.close()
    return client, server


def test_throughput_handoff_vs_kernel(benchmark):
    require_root("streaming through a NAT lab")
    total = MIB << 20
    rates = {}          # path -> [MB/s, ...]
    checks = {}

    def run():
        # no delay here: the lab's delay is a userspace NFQUEUE process and
        # would measure that process, not the socket
        with lab_devices() as (lab, ccs, cam, viewer):
            handoff = connect(cam, viewer, "symmetric")
            kernel = connect(cam, viewer, "simopen")
            plain = inet_pair(lab)
            paths = {
                "handoff a->b": (handoff[0].sock, handoff[1].sock),
                "handoff b->a": (handoff[1].sock, handoff[0].sock),
                "simopen a->b": (kernel[0].sock, kernel[1].sock),
                "simopen b->a": (kernel[1].sock, kernel[0].sock),
                "inet a->core": plain,
            }
            try:
                checks["paths"] = (handoff[0].path, handoff[0].strategy,
                                   kernel[0].path, kernel[0].strategy)
                for _ in range(ROUNDS):
                    for name, (src, dst) in paths.items():
                        seconds, got = transfer(src, dst, total)
                        rates.setdefault(name, []).append(
                            total / seconds / 1e6 if got == total else 0.0)
                        checks.setdefault(name, []).append(got == total)
                # still in step after every transfer: nothing lost or duplicated
                checks["aligned"] = all(ping(src, dst)[1] for src, dst in paths.values())
            finally:
                for s in (handoff[0].sock, handoff[1].sock, kernel[0].sock, kernel[1].sock,
                          *plain):
                    s.close()

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    med = {name: round(statistics.median(v)) for name, v in rates.items()}
    info.update({"bytes": total, "rounds": ROUNDS,
                 **{f"{name} MB_per_s": v for name, v in med.items()},
                 **{f"{name} MB_per_s_all": [round(x) for x in v] for name, v in rates.items()}})
    for d in ("a->b", "b->a"):
        base = med.get(f"simopen {d}")
        info[f"ratio_vs_simopen {d}"] = round(med[f"handoff {d}"] / base, 3) if base else None
    ratios = [info["ratio_vs_simopen a->b"], info["ratio_vs_simopen b->a"]]
    info["ratio_vs_simopen"] = min(r for r in ratios if r is not None) if any(ratios) else None
    base = med.get("inet a->core")
    info["ratio_vs_inet_a->b"] = round(med["handoff a->b"] / base, 3) if base else None
    info["target_ratio"] = THROUGHPUT_TARGET
    info["target_met"] = info["ratio_vs_simopen"] is not None and \
        info["ratio_vs_simopen"] >= THROUGHPUT_TARGET
    info["correct"] = (checks.get("paths") == ("direct", "symmetric", "direct", "simopen")
                       and checks.get("aligned") is True
                       and all(all(v) for k, v in checks.items() if isinstance(v, list)))


def test_first_exchange_on_a_zero_delay_path(benchmark, monkeypatch):
    """Where data can outrun a hand-off: no delay on the path, and the
    accepting side 25 ms late, so it completes on the connecting side's
    SYN-ACK while that side (done on the peer's SYN) already writes. 32 bytes
    leave the moment connect() returns; a byte that reaches the accepting
    side before its kernel socket exists was dropped there and comes again
    only after a retransmission timeout (200 ms), unless the hand-off queues
    it (the machine's late_data)."""
    require_root("connecting through a NAT lab")
    from tests.punch.harness import start_responder_late

    start_responder_late(monkeypatch, 0.025)
    trials = max(TRIALS, 40)
    results = []

    def run():
        # NATs not announced (the full SYN leaves 30 ms after the opener,
        # toward a peer that may answer with a RST) and no standing info (the
        # CCS asks the accepting side): the timing in which the race showed
        with lab_devices(hints=False, standing=False) as (lab, ccs, cam, viewer):
            for _ in range(trials):
                results.append(timed_trial(cam, viewer, "symmetric"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    ok = [r for r in results if r["ok"]]
    times = sorted(round(r["peer_rtt"] * 1000, 1) for r in ok)
    benchmark.extra_info.update({
        "trials": trials, "ok": f"{len(ok)}/{trials}", "delay_ms": 0, "responder_late_ms": 25,
        "first_exchange_ms": times,
        "first_exchange_ms_median": statistics.median(times) if times else None,
        "waited_for_a_retransmission": sum(t >= 100 for t in times),
        "failures": [r["error"] for r in results if "error" in r][:5],
        "correct": len(ok) == trials,
    })
