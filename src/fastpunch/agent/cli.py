"""``fastpunch agent run | status`` and ``fastpunch forward``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from fastpunch.errors import FastpunchError


def add_subparsers(sub) -> None:
    from fastpunch.agent import config

    p = sub.add_parser("agent", help="the device agent: expose local TCP services to peers")
    acmds = p.add_subparsers(dest="agent_command", required=True)
    run = acmds.add_parser(
        "run", help="stay logged in and serve the configured services (SIGHUP reloads the "
                    "config, SIGTERM stops)",
        description="Every setting is a flag, an environment variable and a TOML key of "
                    "--config; flag > environment > file > default.")
    config.add_arguments(run)
    run.set_defaults(func=cmd_agent_run)
    st = acmds.add_parser("status", help="what a running agent is doing, as JSON")
    st.add_argument("--status-socket", default=os.environ.get(
        config.ENV_PREFIX + "STATUS_SOCKET", config.DEFAULT_STATUS_SOCKET),
        help=f"the agent's status socket [env {config.ENV_PREFIX}STATUS_SOCKET] "
             "(default: %(default)s)")
    st.set_defaults(func=cmd_agent_status)

    from fastpunch.tools import add_login_args

    p = sub.add_parser("forward", help="a peer agent's service on a local port")
    add_login_args(p)
    p.add_argument("--to", required=True, metavar="PEER", help="the agent's device name")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--service", help="the service to reach (`--list` shows them)")
    what.add_argument("--list", action="store_true",
                      help="print the services PEER lets this device use, and exit")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where local clients connect (port 0: any free one; the chosen one "
                        "is logged)")
    p.add_argument("--nat", default="auto",
                   help="this device's NAT kind (auto: natcheck finds out)")
    p.add_argument("--quick", action="store_true",
                   help="do not wait for natcheck after logging in")
    p.add_argument("--strategy", action="append", metavar="NAME",
                   help="these strategies instead of the CCS's plan (both sides alike)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to connect to the peer")
    p.set_defaults(func=cmd_forward)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def cmd_agent_run(args) -> int:
    from fastpunch._loop import run as run_loop
    from fastpunch._sdnotify import notify
    from fastpunch.agent import config
    from fastpunch.agent.service import Agent, event

    flags = config.flags_of(args)
    unknown = config.unknown_environment(os.environ)
    try:
        cfg = config.load(flags, os.environ)      # a ConfigError names the setting
    except config.ConfigError as exc:
        if not unknown:
            raise
        # a misspelt variable is most likely why a required setting is missing
        raise config.ConfigError(f"{exc} (set but naming no setting: {', '.join(unknown)})",
                                 exc.setting, exc.source) from None
    _logging()
    event("config", file=cfg.file, settings=cfg.shown())
    for name in unknown:
        event("config-unknown-variable", variable=name,
              reason="names no setting of the agent; ignored")

    async def run() -> int:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def reload() -> None:
            notify("RELOADING=1")
            try:
                new = config.load(flags, os.environ)
            except FastpunchError as exc:
                event("config-reload-failed", reason=str(exc), kept="the running config")
            else:
                agent.reload(new)
            notify("READY=1")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await agent.start()
        notify(f"READY=1\nSTATUS=serving {', '.join(sorted(agent.config.services)) or 'nothing'}"
               f"\nMAINPID={os.getpid()}")
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(agent.done.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for t in (stopped, failed):
            t.cancel()
        notify("STOPPING=1")
        await agent.stop("signal")
        if agent.failed is not None:
            raise FastpunchError(f"the agent gave up: {agent.failed}")
        return 0

    return run_loop(run())


def cmd_agent_status(args) -> int:
    from fastpunch.agent.service import read_status

    print(json.dumps(read_status(args.status_socket), indent=2))
    return 0


def cmd_forward(args) -> int:
    from fastpunch._loop import run as run_loop
    from fastpunch.agent.forward import Forwarder
    from fastpunch.agent.service import event
    from fastpunch.credentials import read_credentials
    from fastpunch.ccs.config import ConfigError, parse_hostport
    from fastpunch.client import Device

    try:
        host, port = parse_hostport(args.listen)
    except ValueError:
        raise ConfigError(f"--listen {args.listen}: expected HOST:PORT") from None
    _, key = read_credentials(args.key_file, args.name)
    _logging()

    async def run() -> int:
        dev = Device(args.ccs, args.name, key, ca_file=args.ca, server_hostname=args.server_name,
                     nat=args.nat)
        fw = None
        try:
            await dev.login()
            if not args.quick:
                await dev.ready(30)
            fw = Forwarder(dev, args.to, args.service or "", strategies=args.strategy,
                           connect_timeout=args.timeout)
            offered = await fw.list_services()
            if args.list:
                print("\n".join(offered) if offered else f"({args.to} offers this device "
                                                         "no service)")
                return 0
            if args.service not in offered:
                have = ", ".join(offered) if offered else "none"
                raise FastpunchError(f"{args.to} offers this device no service "
                                     f"{args.service!r} (it offers: {have})")
            bound = await fw.serve(host, port)
            event("listening", address=f"{bound[0]}:{bound[1]}", peer=args.to,
                  service=args.service)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            event("stopping", clients=fw.clients, sessions=fw.sessions)
            return 0
        finally:
            if fw is not None:
                await fw.close()
            await dev.close()

    return run_loop(run())


__all__ = ["add_subparsers", "cmd_agent_run", "cmd_agent_status", "cmd_forward"]
