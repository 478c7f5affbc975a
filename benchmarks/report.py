"""Turn a pytest-benchmark JSON file into the ratio table of docs/benchmarks.md.

    python -m pytest benchmarks --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Rates are per segment (a batch call counts its segments_per_call); every row
compares numbers from the same run. Means are used throughout.
"""

from __future__ import annotations

import json
import sys


def load(path):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        out[b["name"]] = {"mean": b["stats"]["mean"], "extra": b.get("extra_info", {})}
    return data, out


def rate(bench, name):
    b = bench[name]
    return b["extra"].get("segments_per_call", 1) / b["mean"]


def gbps(bench, name):
    b = bench[name]
    return b["extra"]["bytes_per_call"] / b["mean"] / 1e9


def fmt_rate(r):
    return f"{r / 1e6:.2f} M/s" if r >= 1e6 else f"{r / 1e3:.1f} k/s"


def rows(bench):
    def ratio_row(what, ours, base, target):
        r = rate(bench, ours) / rate(bench, base)
        return (what, f"{fmt_rate(rate(bench, ours))} vs {fmt_rate(rate(bench, base))}",
                f"{r:,.0f}x", f">= {target}x", "met" if r >= target else "NOT met")

    out = [
        ratio_row("SYN build+checksum, batched (1024/call) vs dpkt per segment",
                  "test_syn_build_fastpunch_batch", "test_syn_build_dpkt", 100),
        ratio_row("SYN build+checksum, single call vs dpkt",
                  "test_syn_build_fastpunch_single", "test_syn_build_dpkt", 1),
        ratio_row("SYN build+checksum, single call vs scapy",
                  "test_syn_build_fastpunch_single", "test_syn_build_scapy", 1),
        ratio_row("1460-byte segment build, batched (256/call) vs dpkt",
                  "test_data_build_fastpunch_batch", "test_data_build_dpkt", 1),
        ratio_row("1460-byte segment build, single call vs dpkt",
                  "test_data_build_fastpunch_single", "test_data_build_dpkt", 1),
        ratio_row("SYN parse, batched (1024/call, fields as columns) vs dpkt",
                  "test_syn_parse_fastpunch_batch", "test_syn_parse[dpkt]", 50),
        ratio_row("SYN parse (fields + MSS), single call vs dpkt",
                  "test_syn_parse[fastpunch]", "test_syn_parse[dpkt]", 1),
        ratio_row("SYN parse (fields + MSS) vs scapy",
                  "test_syn_parse[fastpunch]", "test_syn_parse[scapy]", 1),
    ]
    g = gbps(bench, "test_checksum_fastpunch_many")
    out.append(("Checksum of 1460-byte payloads, 4096 per call", f"{g:.1f} GB/s", "-",
                ">= 10 GB/s", "met" if g >= 10 else "NOT met"))
    g1 = gbps(bench, "test_checksum_fastpunch_single")
    gd = gbps(bench, "test_checksum_dpkt")
    gs = gbps(bench, "test_checksum_scapy")
    out.append(("Checksum of one 1460-byte payload per Python call",
                f"{g1:.2f} GB/s (dpkt {gd:.3f}, scapy {gs:.3f})", f"{g1 / gd:,.0f}x dpkt",
                "-", "-"))
    if "test_raw_send_into_veth[sendmmsg]" in bench:
        mm = rate(bench, "test_raw_send_into_veth[sendmmsg]")
        st = rate(bench, "test_raw_send_into_veth[sendto]")
        out.append(("Raw send into veth, sendmmsg (1024/call)", fmt_rate(mm), "-",
                    ">= 1 M/s", "met" if mm >= 1e6 else "NOT met"))
        out.append(("sendmmsg gain over one sendto per segment",
                    f"{fmt_rate(mm)} vs {fmt_rate(st)}", f"{(mm / st - 1) * 100:+.0f}%",
                    "~+30% (kernel's figure)", "see note"))
    return out


def main(path):
    data, bench = load(path)
    wrong = [n for n, b in bench.items() if b["extra"].get("correct") is not True]
    machine = data.get("machine_info", {})
    print(f"Run {data.get('datetime', '?')} on {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"Python {machine.get('python_version', '?')}; "
          f"{'all outputs verified correct' if not wrong else 'WRONG OUTPUT: ' + ', '.join(wrong)}")
    print()
    print("| measurement | fastpunch vs baseline | ratio | target | |")
    print("|---|---|---|---|---|")
    for r in rows(bench):
        print("| " + " | ".join(r) + " |")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench.json"))
