"""``fastpunch lab up | exec | status | down | matrix``."""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

from fastpunch._proc import pid_alive
from fastpunch.lab import keeper
from fastpunch.lab.profiles import CGN, FRAG_NEEDED_MODES, HAIRPIN_MODES, PROFILES
from fastpunch.lab.topology import LabError, conntrack_entries, setns_preexec, sweep_stale

PROFILE_CHOICES = sorted(PROFILES) + [CGN]


def add_subparser(sub) -> None:
    lab = sub.add_parser("lab", help="a small internet of NATs in network namespaces")
    cmds = lab.add_subparsers(dest="lab_command", required=True)

    up = cmds.add_parser("up", help="build a lab and keep it until `lab down`")
    for site in "abcd":
        up.add_argument(f"--{site}", choices=PROFILE_CHOICES, help=f"profile of site {site}")
    up.add_argument("--site", action="append", default=[], metavar="NAME=PROFILE",
                    help="more sites")
    up.add_argument("--loss", type=float, default=0.0,
                    help="loss percent per direction (default: 0)")
    up.add_argument("--delay", type=float, default=0.0, metavar="MS",
                    help="one-way delay of every site's access link (default: 0)")
    up.add_argument("--rate", type=float, default=0.0, metavar="MBIT",
                    help="rate limit of every site's access link, each direction "
                         "(default: 0, unlimited)")
    # Topology settings: SITE=VALUE for one site (repeatable), or VALUE for every site.
    up.add_argument("--hosts", action="append", default=[], metavar="[SITE=]N",
                    help="hosts on the site's LAN, 1-8, named a, a2, a3, ... (default: 1)")
    up.add_argument("--hairpin", action="append", default=[], metavar="[SITE=]MODE",
                    help=f"what the gateway does with a LAN host's packet to its own WAN "
                         f"address: {', '.join(HAIRPIN_MODES)} (default: off)")
    up.add_argument("--mtu", action="append", default=[], metavar="[SITE=]BYTES",
                    help="MTU of the site's LAN link, 576-9000 (default: 1500)")
    up.add_argument("--wan-mtu", action="append", default=[], metavar="[SITE=]BYTES",
                    help="MTU of the gateway's WAN link, with MSS clamping in the gateway "
                         "(default: 1500, no clamping)")
    up.add_argument("--frag-needed", action="append", default=[], metavar="[SITE=]MODE",
                    help=f"ICMP fragmentation-needed for the site: "
                         f"{', '.join(FRAG_NEEDED_MODES)} (default: pass)")
    up.add_argument("--port-range", action="append", default=[], metavar="[SITE=]LOW-HIGH",
                    help="ephemeral ports of the site's hosts (default: the kernel's, "
                         "32768-60999)")
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    up.set_defaults(func=cmd_up)

    ex = cmds.add_parser("exec", help="run a command in a site's host (or gw-SITE, inet)")
    ex.add_argument("where")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ex.add_argument("--lab", help="lab tag when several are up")
    ex.set_defaults(func=cmd_exec)

    st = cmds.add_parser("status", help="sites, addresses and live conntrack entries")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    dn = cmds.add_parser("down", help="tear labs down (all, or --lab TAG) and sweep stale ones")
    dn.add_argument("--lab", help="only this lab")
    dn.set_defaults(func=cmd_down)

    from fastpunch.lab import matrix

    mx = cmds.add_parser("matrix", help="the compatibility matrix: which profiles and "
                                        "topologies connect, how, how fast",
                         description=matrix.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    matrix.add_arguments(mx)
    mx.set_defaults(func=matrix.cmd_matrix, matrix_parser=mx)


def _states() -> list[dict]:
    states = []
    for path in sorted(glob.glob(os.path.join(keeper.STATE_DIR, "*.json"))):
        with open(path) as f:
            state = json.load(f)
        if not pid_alive(state["keeper"]):
            os.unlink(path)          # a keeper that died without cleaning up
            continue
        states.append(state)
    return states


def _pick(tag) -> dict:
    states = _states()
    if tag:
        states = [s for s in states if s["tag"] == tag]
    if not states:
        raise LabError("no lab is up" + (f" with tag {tag}" if tag else "") +
                       " (start one with `fastpunch lab up --a nat --b nat`)")
    if len(states) > 1:
        raise LabError("several labs are up; choose one with --lab: " +
                       ", ".join(s["tag"] for s in states))
    return states[0]


def _namespace(state: dict, where: str) -> str:
    if where in ("inet", "internet", "ccs"):
        return next(n for n in state["namespaces"] if n.endswith("-inet"))
    sites = state["sites"]
    if where in sites:
        return sites[where]["host_ns"]
    for site in sites.values():
        for host in site.get("hosts", []):
            if host["name"] == where:
                return host["ns"]
    for role, key in (("gw-", "gateway_ns"), ("home-", "home_ns")):
        if where.startswith(role) and where[len(role):] in sites and sites[where[len(role):]][key]:
            return sites[where[len(role):]][key]
    hosts = [h["name"] for s in sites.values() for h in s.get("hosts", [])]
    raise LabError(f"no such place: {where!r} (sites: {', '.join(sites)}, hosts: "
                   f"{', '.join(hosts)}, gw-SITE, inet)")


def _per_site(items: list, flag: str, parse):
    """``--flag VALUE`` (every site) or ``--flag SITE=VALUE`` (repeatable) as
    the Lab keyword's value: one value, or a dict per site."""
    every, per_site = None, {}
    for item in items:
        site, sep, value = item.rpartition("=")
        try:
            parsed = parse(value)
        except ValueError:
            raise LabError(f"--{flag} {item}: not a valid value") from None
        if sep:
            per_site[site] = parsed
        else:
            every = parsed
    if every is not None and per_site:
        raise LabError(f"--{flag}: give one value for every site or SITE=VALUE items, not both")
    return every if every is not None else per_site


def _port_range(text: str) -> list:
    low, sep, high = text.partition("-")
    if not sep:
        raise ValueError(text)
    return [int(low), int(high)]


def cmd_up(args) -> int:
    sites = {s: getattr(args, s) for s in "abcd" if getattr(args, s)}
    for item in args.site:
        name, _, profile = item.partition("=")
        sites[name] = profile
    if not sites:
        raise LabError("give at least one site, e.g. --a nat --b napt-random")
    spec = {**sites, "loss": args.loss, "delay_ms": args.delay, "rate_mbit": args.rate}
    for key, flag, items, parse in (("hosts", "hosts", args.hosts, int),
                                    ("hairpin", "hairpin", args.hairpin, str),
                                    ("mtu", "mtu", args.mtu, int),
                                    ("wan_mtu", "wan-mtu", args.wan_mtu, int),
                                    ("frag_needed", "frag-needed", args.frag_needed, str),
                                    ("port_range", "port-range", args.port_range, _port_range)):
        if items:
            spec[key] = _per_site(items, flag, parse)
    from fastpunch.lab.topology import Lab

    Lab(**spec)            # refuses a bad spec here, with its message, before a keeper starts
    os.makedirs(keeper.STATE_DIR, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "fastpunch.lab.keeper", json.dumps(spec)],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = keeper.state_path(proc.pid)
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            error = ""
            if os.path.exists(path + ".error"):
                with open(path + ".error") as f:
                    error = f.read()
                os.unlink(path + ".error")
            if proc.poll() is None:
                proc.terminate()
            raise LabError(f"the lab did not come up: {error or 'keeper exited'}")
        time.sleep(0.05)
    with open(path) as f:
        state = json.load(f)
    if args.json:
        print(json.dumps(state))
    else:
        _print_lab(state, with_conntrack=False)
    return 0


def cmd_exec(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("give a command after --, e.g. fastpunch lab exec a -- ss -tn")
    fd, enter = setns_preexec(_namespace(_pick(args.lab), args.where))
    try:
        return subprocess.call(argv, preexec_fn=enter)
    finally:
        os.close(fd)


def _print_lab(state: dict, with_conntrack: bool) -> None:
    print(f"lab {state['tag']} (keeper pid {state['keeper']}): CCS {state['ccs']}, "
          f"relay {state['relay']}")
    for name, site in state["sites"].items():
        print(f"  site {name}: {site['profile']:<15} host {site['host']:<15} "
              f"public {site['public']:<15} loss {site['loss']}% delay {site['delay_ms']} ms"
              f" rate {site['rate_mbit'] or '-'} Mbit/s")
        extras = [f"{key.replace('_', '-')} {site[key]}" for key, default in (
            ("hairpin", "off"), ("mtu", None), ("wan_mtu", None), ("frag_needed", "pass"),
            ("port_range", None)) if site.get(key, default) != default]
        if extras:
            print(f"    {', '.join(extras)}")
        hosts = site.get("hosts", [])
        if len(hosts) > 1:
            print("    hosts: " + ", ".join(f"{h['name']} {h['addr']}" for h in hosts))
        if with_conntrack:
            for gw_key in ("home_ns", "gateway_ns"):
                ns = site[gw_key]
                if not ns:
                    continue
                entries = conntrack_entries(ns)
                print(f"    {'gw' if gw_key == 'gateway_ns' else 'home'}-{name}: "
                      f"{len(entries)} conntrack entries")
                for e in entries:
                    o, r = e["orig"], e["reply"]
                    print(f"      {e['proto']} {e['state'] or '':<12} {o[0]}:{o[1]} -> "
                          f"{o[2]}:{o[3]}  reply {r[0]}:{r[1]} -> {r[2]}:{r[3]}  "
                          f"({e['timeout']} s)")


def cmd_status(args) -> int:
    states = _states()
    if args.json:
        for state in states:
            state["conntrack"] = {n: conntrack_entries(s["gateway_ns"])
                                  for n, s in state["sites"].items()}
        print(json.dumps(states))
        return 0
    if not states:
        print("no lab is up")
    for state in states:
        _print_lab(state, with_conntrack=True)
    return 0


def cmd_down(args) -> int:
    states = _states()
    if args.lab:
        states = [s for s in states if s["tag"] == args.lab]
    for state in states:
        os.kill(state["keeper"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    for state in states:
        while (os.path.exists(keeper.state_path(state["keeper"])) and pid_alive(state["keeper"])
               and time.monotonic() < deadline):
            time.sleep(0.05)
        print(f"lab {state['tag']} torn down")
    stale = sweep_stale()
    if stale:
        print(f"removed {len(stale)} namespaces of crashed labs: {', '.join(stale)}")
    return 0


def main(argv=None) -> int:
    from fastpunch.cli import main as fastpunch_main

    return fastpunch_main(["lab", *(sys.argv[1:] if argv is None else argv)])
