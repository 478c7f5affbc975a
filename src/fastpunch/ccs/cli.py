"""``fastpunch ccs init | add-device | devices | serve`` and ``fastpunch device run``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys

from fastpunch.errors import FastpunchError

DEFAULT_DIR = "/var/lib/fastpunch/ccs"


def add_subparsers(sub) -> None:
    ccs = sub.add_parser("ccs", help="the central communications station")
    cmds = ccs.add_subparsers(dest="ccs_command", required=True)

    p = cmds.add_parser("init", help="create a deployment: private CA, server certificate, key store")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"deployment directory (default {DEFAULT_DIR})")
    p.add_argument("--name", action="append", default=[], metavar="DNS",
                   help="DNS name devices use for the CCS (repeatable; default localhost)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="IP address devices use for the CCS (repeatable; default 127.0.0.1)")
    p.add_argument("--sealed", action="store_true",
                   help="also create master.key and seal every device key with it")
    p.set_defaults(func=cmd_init)

    p = cmds.add_parser("add-device", help="enroll a device and print its credentials (JSON)")
    p.add_argument("name")
    p.add_argument("--may-reach", action="append", default=[], metavar="OTHER",
                   help="a device this one may rendezvous with (repeatable; both directions)")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--key-file", help="also write the credentials here (0600)")
    p.set_defaults(func=cmd_add_device)

    p = cmds.add_parser("allow", help="let two enrolled devices rendezvous")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.set_defaults(func=cmd_allow)

    p = cmds.add_parser("serve", help="run a CCS node (asyncio on uvloop)")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--listen", default="0.0.0.0:7443", metavar="HOST:PORT")
    p.add_argument("--relay-port", type=int, default=7444, help="0 = any, -1 = no relay")
    p.add_argument("--probe-port", type=int, default=7445,
                   help="a second port answering address probes (natcheck sees whether a "
                        "mapping depends on the destination port); 0 = any, -1 = none")
    p.add_argument("--public-addr", help="address devices reach the relay at (default: --listen host)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    p.add_argument("--redis", metavar="URL", help="share presence with other nodes through Redis")
    p.add_argument("--node", default=socket.gethostname(), help="this node's name (default hostname)")
    p.add_argument("--heartbeat", type=int, default=15, help="seconds between device heartbeats")
    p.add_argument("--rendezvous-timeout", type=float, default=30.0)
    p.add_argument("--relay-max", type=int, default=256, help="concurrent relays, whole node")
    p.add_argument("--relay-per-device", type=int, default=4, help="concurrent relays per device")
    p.add_argument("--relay-quota", type=int, metavar="BYTES", help="relay bytes per device")
    p.add_argument("--ready-file", help="write {host, port, relay_port, metrics} here when listening")
    p.set_defaults(func=cmd_serve)

    dev = sub.add_parser("device", help="a device agent")
    dcmds = dev.add_subparsers(dest="device_command", required=True)
    p = dcmds.add_parser("run", help="stay connected to the CCS; answer and make rendezvous")
    p.add_argument("--ccs", action="append", required=True, metavar="HOST:PORT",
                   help="CCS node (repeatable: the agent fails over between them)")
    p.add_argument("--name", required=True)
    p.add_argument("--key-file", required=True, help="credentials from `fastpunch ccs add-device`")
    p.add_argument("--ca", required=True, help="the deployment's ca.pem (pinned)")
    p.add_argument("--server-name", help="TLS name of the CCS (default: the host given)")
    p.add_argument("--nat", default="unknown", help="this device's NAT guess, sent with its info")
    p.add_argument("--rendezvous", metavar="PEER", help="ask for PEER once, print the result, exit")
    p.set_defaults(func=cmd_device_run)


def _store(args, create: bool = False):
    from fastpunch.ccs.keystore import KeyStore

    path = os.path.join(args.dir, "keys.db")
    if not create and not os.path.exists(path):
        raise FastpunchError(f"no deployment in {args.dir}: run `fastpunch ccs init --dir {args.dir}`")
    master = None
    mpath = os.path.join(args.dir, "master.key")
    if os.path.exists(mpath):
        with open(mpath) as f:
            master = bytes.fromhex(f.read().strip())
    return KeyStore(path, master)


def _write_secret(path: str, text: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def cmd_init(args) -> int:
    from fastpunch.ccs import pki

    if os.path.exists(os.path.join(args.dir, "ca.pem")):
        raise FastpunchError(f"{args.dir} already holds a deployment; not overwriting its CA")
    paths = pki.init(args.dir, args.name or ["localhost"], args.ip or ["127.0.0.1"])
    if args.sealed:
        _write_secret(os.path.join(args.dir, "master.key"), os.urandom(32).hex() + "\n")
    # seals session keys between CCS nodes (copy it with keys.db to every node)
    _write_secret(os.path.join(args.dir, "cluster.key"), os.urandom(32).hex() + "\n")
    _store(args, create=True).close()
    print(json.dumps({"dir": args.dir, "ca": paths["ca"], "sealed": args.sealed}))
    return 0


def cmd_add_device(args) -> int:
    store = _store(args)
    try:
        key = store.add_device(args.name, args.may_reach)
    finally:
        store.close()
    creds = json.dumps({"name": args.name, "key": key.hex(),
                        "ca": os.path.join(args.dir, "ca.pem")})
    if args.key_file:
        _write_secret(args.key_file, creds + "\n")
    print(creds)
    return 0


def cmd_allow(args) -> int:
    store = _store(args)
    try:
        for name in (args.a, args.b):
            if store.key_for(name) is None:
                raise FastpunchError(f"no device {name!r}: enroll it with `ccs add-device`")
        store.allow(args.a, args.b)
    finally:
        store.close()
    return 0


def _hostport(text: str) -> tuple:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise FastpunchError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _raise_nofile() -> None:
    """Every device is a socket: take the whole hard open-file limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cmd_serve(args) -> int:
    from fastpunch.ccs import metrics, pki
    from fastpunch.ccs.registry import MemoryRegistry, RedisRegistry
    from fastpunch.ccs.relay import Relay
    from fastpunch.ccs.server import CCSServer, event, new_event_loop

    _logging()
    _raise_nofile()
    store = _store(args)
    host, port = _hostport(args.listen)
    registry = RedisRegistry(args.redis, args.node) if args.redis else MemoryRegistry(args.node)
    cluster_key = None
    if args.redis:
        path = os.path.join(args.dir, "cluster.key")
        if not os.path.exists(path):
            raise FastpunchError(f"--redis needs {path} (the same on every node; "
                                 "`fastpunch ccs init` writes one)")
        with open(path) as f:
            cluster_key = bytes.fromhex(f.read().strip())
    relay = Relay(max_relays=args.relay_max, per_device=args.relay_per_device,
                  quota_bytes=args.relay_quota, log=event)
    server = CCSServer(store, pki.server_context(args.dir), registry=registry, relay=relay,
                       public_addr=args.public_addr, heartbeat=args.heartbeat,
                       rendezvous_timeout=args.rendezvous_timeout, cluster_key=cluster_key)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bound = await server.start(host, port, None if args.relay_port < 0 else args.relay_port,
                                   None if args.probe_port < 0 else args.probe_port)
        mserver = None
        ready = {"host": bound[0], "port": bound[1], "relay_port": server.relay_port,
                 "probe_port": server.probe_port2, "node": server.node}
        if args.metrics:
            mhost, mport = _hostport(args.metrics)
            mserver = await metrics.serve(server, mhost, mport)
            ready["metrics"] = mserver.sockets[0].getsockname()[1]
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                json.dump(ready, f)
            os.replace(args.ready_file + ".tmp", args.ready_file)
        await stop.wait()
        event("stopping", node=server.node)
        if mserver is not None:
            mserver.close()
        await server.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
        store.close()
    return 0


def read_credentials(path: str) -> tuple:
    with open(path) as f:
        text = f.read().strip()
    try:
        creds = json.loads(text)
        return creds.get("name"), bytes.fromhex(creds["key"])
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        return None, bytes.fromhex(text)
    except ValueError:
        raise FastpunchError(f"{path}: not a credentials file from `ccs add-device`") from None


def _ready_json(ready) -> dict:
    from fastpunch.proto.wire import fields_of

    out = fields_of(ready)
    out["key"] = "(%d bytes)" % len(ready.key)
    out["relay_token"] = "(%d bytes)" % len(ready.relay_token)
    out["plan"] = list(ready.plan)
    return out


def cmd_device_run(args) -> int:
    from fastpunch._loop import new_event_loop
    from fastpunch.client import Device

    name, key = read_credentials(args.key_file)
    if name is not None and name != args.name:
        raise FastpunchError(f"{args.key_file} holds the credentials of {name!r}, not {args.name!r}")

    def say(kind: str, **fields) -> None:
        print(json.dumps({"event": kind, **fields}), flush=True)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Device(args.ccs, args.name, key, ca_file=args.ca,
                          server_hostname=args.server_name, nat=args.nat) as dev:
            say("connected", node=dev.node, public_addr=list(dev.public_addr))
            if args.rendezvous:
                info, gathered = await dev.next_info()
                try:
                    ready = await dev.rendezvous(args.rendezvous, info)
                finally:
                    await dev.gatherer.release(gathered)   # shown, not punched from
                say("ready", **_ready_json(ready))
                return 0

            async def answer_all() -> None:
                async for offer in dev.incoming():
                    say("offer", peer=offer.peer)
                    info, gathered = await dev.next_info()
                    try:
                        ready = await offer.answer(info)
                    finally:
                        await dev.gatherer.release(gathered)
                    say("ready", **_ready_json(ready))

            serving = loop.create_task(answer_all())
            stopping = loop.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if serving.done():
                serving.result()             # raises the reason the agent stopped
            serving.cancel()
        return 0

    loop = new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()
