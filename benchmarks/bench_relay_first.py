"""Time to first byte, relay-first against direct-only (issue 15), side by
side in one lab: camera and viewer each behind a gateway, 20 ms one-way on
each site's access link (the CCS and its relay in the core between them).

A trial: the viewer accepts; the camera connects (relay-first, direct-only,
or "auto": the CCS's choice), both
open a resumable session on what they got, and the camera sends 32 bytes.
Time to first byte: from the camera's connect() call to the viewer holding
those bytes. For relay-first, also the time until both sessions moved to
the direct path, and the bytes the relay carried. Two pairs: nat:nat, whose
punch is fast, and napt-sequential:napt-random, whose plan sprays for
seconds and mostly ends on the relay anyway.

FASTPUNCH_RELAY_FIRST_TRIALS (default 5) trials of each mode, interleaved.
Needs root.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import pytest

from benchmarks.bench_punch import DELAY_MS, lab_devices, tcp_rtt
from tests.conftest import require_root

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("FASTPUNCH_RELAY_FIRST_TRIALS", "5"))


def _moved(rs) -> bool:
    return any(e.what == "resumed" for e in rs.history)


def trial(cam, viewer, relay_first, relay, must_move: bool) -> dict:
    """One trial; relay_first: True, False or "auto" (connect()'s)."""
    (la, a), (lb, b) = cam, viewer
    data = os.urandom(32)
    out: dict = {}

    def accept_side():
        rb = None
        try:
            cb = accepting.result(30)
            rb = out["rb"] = cb.resumable()
            got = b""
            while len(got) < len(data):
                part = rb.recv(len(data) - len(got))
                if not part:
                    break
                got += part
            out.update(first=time.perf_counter(), intact=got == data, path=cb.path)
            while rb.recv(65536):          # a viewer goes on reading (and so moves)
                pass
        except Exception as exc:
            out["error"] = repr(exc)[:300]
        finally:
            if rb is not None:
                rb.close(10)

    relayed0 = relay.bytes_total
    accepting = lb.submit(b.accept())
    t = threading.Thread(target=accept_side)
    t0 = time.perf_counter()
    t.start()
    ra = None
    try:
        ca = la.run(a.connect("viewer", relay_first=relay_first), 30)
        connected = time.perf_counter()
        relay_first = ca.path == "relay" and ca.upgrade is not None   # what the CCS chose
        ra = ca.resumable()
        ra.sendall(data)
        result = {"connect_s": connected - t0}
        if relay_first:
            # a trickle of bytes (the next frames) until both sides moved
            end = time.monotonic() + 15
            while time.monotonic() < end and not (
                    _moved(ra) and "rb" in out and _moved(out["rb"])) and \
                    not any(e.what == "upgrade-failed" for e in ra.history):
                ra.sendall(b".")
                time.sleep(0.01)
            moved = _moved(ra) and "rb" in out and _moved(out["rb"])
            result["moved_s"] = time.perf_counter() - t0 if moved else None
        ra.close(10)
        t.join(30)
        if "error" in out or "first" not in out:
            return {"ok": False, "error": out.get("error", "no first byte")}
        result.update(first_byte_s=out["first"] - t0, relay_first=relay_first,
                      relayed_bytes=relay.bytes_total - relayed0,
                      ok=out["intact"] and ca.path == out["path"] and
                      (ca.path == "direct" or not must_move or relay_first)
                      and (not relay_first or not must_move or result["moved_s"] is not None))
        result["direct"] = ca.path == "direct" or bool(result.get("moved_s"))
        return result
    except Exception as exc:
        if ra is not None:
            with contextlib.suppress(Exception):
                ra.close(1)
        return {"ok": False, "error": repr(exc)[:300]}
    finally:
        t.join(30)


# (camera's gateway, viewer's, whether both modes must end direct): a pair
# whose punch is fast, and one whose plan mostly ends on the relay after
# seconds of spraying (docs/compatibility.md's known limit)
PAIRS = [("nat", "nat", True), ("napt-sequential", "napt-random", False)]


@pytest.mark.parametrize("a,b,must_move", PAIRS, ids=[f"{a}:{b}" for a, b, _ in PAIRS])
def test_time_to_first_byte_relay_first_vs_direct_only(benchmark, a, b, must_move):
    require_root("connecting through a NAT lab")
    from tests.punch.harness import CCS_PORT

    results: dict = {"relay_first": [], "direct_only": [], "auto": []}
    modes = {"relay_first": True, "direct_only": False, "auto": "auto"}
    rtts = {}

    def run():
        with lab_devices(a, b, delay_ms=DELAY_MS) as (lab, ccs, cam, viewer):
            rtts["ccs"] = tcp_rtt(lab, "a", (lab.ccs_addr, CCS_PORT))
            relay = ccs.server.relay
            for _ in range(TRIALS):
                for kind, mode in modes.items():              # interleaved, same lab
                    results[kind].append(trial(cam, viewer, mode, relay, must_move))

    benchmark.pedantic(run, rounds=1, iterations=1)
    ok = {k: [r for r in rs if r["ok"]] for k, rs in results.items()}

    def med(kind, key):
        values = [r[key] for r in ok[kind] if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    info = benchmark.extra_info
    ttfb_rf, ttfb_d = med("relay_first", "first_byte_s"), med("direct_only", "first_byte_s")
    info.update({
        "pair": f"{a}:{b}", "trials": TRIALS, "delay_ms_one_way_per_site": DELAY_MS,
        "ccs_rtt_ms_measured": round(rtts.get("ccs", 0) * 1000, 1),
        **{f"{k}_ok": f"{len(ok[k])}/{TRIALS}" for k in results},
        **{f"{k}_connect_median_s": med(k, "connect_s") for k in results},
        **{f"{k}_first_byte_median_s": med(k, "first_byte_s") for k in results},
        "relay_first_moved_to_direct_median_s": med("relay_first", "moved_s"),
        **{f"{k}_ended_direct": sum(1 for r in ok[k] if r["direct"]) for k in results},
        "auto_chose_relay_first": sum(1 for r in ok["auto"] if r["relay_first"]),
        "relay_first_relayed_bytes_median": med("relay_first", "relayed_bytes"),
        "direct_only_relayed_bytes_max": max((r["relayed_bytes"] for r in ok["direct_only"]),
                                             default=None),
        "first_byte_ratio_relay_first_to_direct": (round(ttfb_rf / ttfb_d, 3)
                                                   if ttfb_rf and ttfb_d else None),
        "failures": [r["error"] for rs in results.values() for r in rs if "error" in r][:5],
    })
    info["correct"] = all(len(ok[k]) == TRIALS for k in results)
