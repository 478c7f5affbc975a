"""``fastpunch ccs init | add-device | devices | serve`` and ``fastpunch device run``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Optional

from fastpunch.credentials import read_credentials
from fastpunch.errors import FastpunchError

DEFAULT_DIR = "/var/lib/fastpunch/ccs"


def add_subparsers(sub) -> None:
    """``fastpunch ccs ...`` and ``fastpunch device run``."""
    add_ccs_subparser(sub)
    add_device_subparser(sub)


def add_ccs_subparser(sub) -> None:
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
    p.add_argument("--ca-key-out", metavar="PATH",
                   help="write the CA key here, outside --dir, and nowhere else (keep it "
                        "offline: only `ccs renew-cert --ca-key` needs it) (default: DIR/ca.key)")
    p.set_defaults(func=cmd_init)

    p = cmds.add_parser("add-device", help="enroll a device and print its credentials (JSON)")
    p.add_argument("name")
    p.add_argument("--may-reach", action="append", default=[], metavar="OTHER",
                   help="a device this one may rendezvous with (repeatable; both directions)")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--key-file", help="write the credentials here (0600) instead of printing "
                                      "the key")
    p.add_argument("--key-from", metavar="FILE",
                   help="take the key from these credentials (the same device enrolled on "
                        "another node) instead of making one")
    p.set_defaults(func=cmd_add_device)

    p = cmds.add_parser("allow", help="let two enrolled devices rendezvous")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.set_defaults(func=cmd_allow)

    from fastpunch.ccs.admin import add_subparsers as add_admin   # devices, acl, audit

    add_admin(cmds)

    from fastpunch.ccs import config as serve_config

    p = cmds.add_parser(
        "serve", help="run a CCS node (asyncio on uvloop)",
        description="Run a CCS node. Every setting is a flag, an environment variable "
                    "FASTPUNCH_CCS_<SETTING> and a key of the --config TOML file; a flag "
                    "wins over the environment, which wins over the file. SIGHUP reloads "
                    "server.pem/server.key.")
    serve_config.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = cmds.add_parser("renew-cert", help="issue a new server key and certificate from the CA",
                        description="A new server key and certificate signed by the deployment "
                                    "CA, replacing server.key and server.pem atomically; then "
                                    "reload a running node with SIGHUP.")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"deployment directory (default: {DEFAULT_DIR})")
    p.add_argument("--ca-key", metavar="PATH",
                   help="the CA key, wherever it is kept (default: DIR/ca.key)")
    p.add_argument("--name", action="append", metavar="DNS",
                   help="DNS name for the certificate (repeatable; replaces the old "
                        "certificate's names) (default: the old certificate's)")
    p.add_argument("--ip", action="append", metavar="ADDR",
                   help="IP address for the certificate (repeatable; replaces the old "
                        "certificate's addresses) (default: the old certificate's)")
    p.add_argument("--days", type=int, default=730,
                   help="validity in days, at most the CA's own (default: 730)")
    p.set_defaults(func=cmd_renew_cert)


def add_device_subparser(sub) -> None:
    """``fastpunch device run`` (none of the server's modules: a device's
    process never loads the key store or sqlite3)."""
    dev = sub.add_parser("device", help="a device agent")
    dcmds = dev.add_subparsers(dest="device_command", required=True)
    p = dcmds.add_parser("run", help="stay connected to the CCS; answer and make rendezvous")
    p.add_argument("--ccs", action="append", required=True, metavar="HOST:PORT",
                   help="CCS node (repeatable: the agent fails over between them)")
    p.add_argument("--name", required=True)
    p.add_argument("--key-file", required=True, help="credentials from `fastpunch ccs add-device`")
    p.add_argument("--ca", required=True, help="the deployment's ca.pem (pinned)")
    p.add_argument("--server-name", help="TLS name of the CCS (default: the host given)")
    p.add_argument("--nat", default="auto",
                   help="this device's NAT kind (auto: natcheck finds out after login)")
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
    """Write a secret readable by its owner only (see _secret_file)."""
    with _secret_file(path) as write:
        write(text)


def key_from(path: Optional[str], name: str) -> Optional[bytes]:
    """The key of ``name`` in a credentials file (``--key-from``), or None."""
    if path is None:
        return None
    _, key = read_credentials(path, name)
    if len(key) != 32:
        raise FastpunchError(f"{path}: a device key is 32 bytes, not {len(key)}")
    return key


@contextlib.contextmanager
def _secret_file(path: str):
    """Open ``path`` for a secret, yielding the function that writes it:
    never through a symbolic link, never into anything but a regular file,
    and an existing file (perhaps world-readable) made 0600 before anything
    goes in. Opened before the change that makes the secret, so a path that
    cannot take it fails the command before anything changed; a file
    created here is removed again if the change fails."""
    import errno
    import stat

    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK   # (a FIFO: no wait)
    created = True
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            created = False
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FastpunchError(f"{path} is a symbolic link: not writing a secret through it") \
                from None
        raise FastpunchError(f"cannot write a secret to {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FastpunchError(f"{path} is not a regular file: not writing a secret into it")
        os.fchmod(fd, 0o600)            # open() leaves an existing file's mode as it was

        def write(text: str) -> None:
            os.ftruncate(fd, 0)
            os.write(fd, text.encode())   # (a few hundred bytes: one write)

        try:
            yield write
        except BaseException:
            if created:
                os.unlink(path)
            raise
    finally:
        os.close(fd)


def cmd_init(args) -> int:
    from fastpunch.ccs import pki

    if os.path.exists(os.path.join(args.dir, "ca.pem")):
        raise FastpunchError(f"{args.dir} already holds a deployment; not overwriting its CA")
    if args.ca_key_out is not None:
        out = os.path.dirname(os.path.realpath(args.ca_key_out))
        home = os.path.realpath(args.dir)
        if out == home or out.startswith(home + os.sep):
            raise FastpunchError(f"--ca-key-out {args.ca_key_out} is inside --dir {args.dir}: "
                                 "the point is to keep the CA key off the serving machine's "
                                 "directory")
    paths = pki.init(args.dir, args.name or ["localhost"], args.ip or ["127.0.0.1"],
                     ca_key_path=args.ca_key_out)
    if args.sealed:
        _write_secret(os.path.join(args.dir, "master.key"), os.urandom(32).hex() + "\n")
    # seals session keys between CCS nodes (copy it with keys.db to every node)
    _write_secret(os.path.join(args.dir, "cluster.key"), os.urandom(32).hex() + "\n")
    _store(args, create=True).close()
    print(json.dumps({"dir": args.dir, "ca": paths["ca"], "sealed": args.sealed}))
    return 0


def cmd_add_device(args) -> int:
    from fastpunch.ccs.admin import say_audit

    given = key_from(args.key_from, args.name)
    store = _store(args)
    try:
        with _secret_file(args.key_file) if args.key_file else contextlib.nullcontext() as write:
            key = store.add_device(args.name, args.may_reach, given)
            say_audit(store)
            creds = json.dumps({"name": args.name, "key": key.hex(),
                                "ca": os.path.join(args.dir, "ca.pem")})
            if write is not None:
                write(creds + "\n")
                creds = json.dumps({"name": args.name, "key_file": args.key_file})   # not the key
            elif given is not None:
                creds = json.dumps({"name": args.name, "key_from": args.key_from})  # nor here
    finally:
        store.close()
    print(creds)
    return 0


def cmd_allow(args) -> int:
    """The first spelling of ``ccs acl allow`` (kept)."""
    from fastpunch.ccs.admin import say_audit
    from fastpunch.ccs.keystore import UnknownDeviceError

    store = _store(args)
    try:
        for name in (args.a, args.b):
            if store.state(name) is None:
                raise UnknownDeviceError(name)
        store.allow(args.a, args.b)
        say_audit(store)
    finally:
        store.close()
    return 0


def _hostport(text: str) -> tuple:
    """``HOST:PORT`` (or ``[v6]:PORT``) -> (host, port); the port 0-65535."""
    from fastpunch.ccs.config import parse_hostport

    try:
        return parse_hostport(text)
    except ValueError:
        raise FastpunchError(f"expected HOST:PORT with a port 0-65535, got {text!r}") from None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _raise_nofile() -> None:
    """Every device is a socket: take the whole hard open-file limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cmd_serve(args) -> int:
    from types import SimpleNamespace

    from fastpunch.ccs import config, metrics, pki
    from fastpunch.ccs.budget import Budgets
    from fastpunch.ccs.registry import MemoryRegistry, RedisRegistry
    from fastpunch.ccs.relay import Relay
    from fastpunch.ccs.server import CCSServer, event, new_event_loop

    # every setting checked before anything starts (a ConfigError names it)
    cfg = config.load({s.key: getattr(args, s.key) for s in config.SETTINGS} |
                      {"config": args.config}, os.environ)
    _logging()
    _raise_nofile()
    event("config", file=cfg.file, settings=cfg.shown())
    for name in config.unknown_environment(os.environ):
        event("config-unknown-variable", variable=name,
              reason="names no setting of ccs serve; ignored")
    directory = cfg["dir"]
    budgets = Budgets(**cfg.budgets())
    cluster_key = None
    if cfg["redis"]:
        path = os.path.join(directory, "cluster.key")
        if not os.path.exists(path):
            raise FastpunchError(f"--redis needs {path} (the same on every node; "
                                 "`fastpunch ccs init` writes one)")
        with open(path) as f:
            cluster_key = bytes.fromhex(f.read().strip())
    store = _store(SimpleNamespace(dir=directory))
    try:
        ssl_context = pki.server_context(directory)     # server.pem/server.key; never ca.key
        host, port = cfg["listen"]
        node = cfg["node"]
        try:
            registry = RedisRegistry(cfg["redis"], node) if cfg["redis"] else MemoryRegistry(node)
        except RuntimeError as exc:         # no redis package
            raise FastpunchError(str(exc)) from exc
        relay = Relay(max_relays=cfg["relay_max"], per_device=cfg["relay_per_device"],
                      quota_bytes=cfg["relay_quota"], log=event,
                      probes_per_source=budgets.probes_per_source,
                      hellos_per_source=budgets.relay_hellos_per_source)
        server = CCSServer(store, ssl_context, registry=registry, relay=relay,
                           public_addr=cfg["public_addr"], public_addr6=cfg["public_addr6"],
                           heartbeat=cfg["heartbeat"],
                           keepalive=cfg["keepalive"],
                           rendezvous_timeout=cfg["rendezvous_timeout"],
                           auth_timeout=cfg["auth_timeout"], cluster_key=cluster_key,
                           budgets=budgets)
    except BaseException:
        store.close()
        raise

    def reload_certificate() -> None:
        """SIGHUP: the renewed server.pem/server.key for handshakes from now
        on; a pair that does not load leaves the old one serving."""
        try:
            cert = pki.reload_server_context(ssl_context, directory)
        except (FastpunchError, OSError) as exc:
            event("cert-reload-failed", dir=directory, reason=str(exc),
                  kept="the certificate already serving")
        else:
            event("cert-reloaded", dir=directory, **cert)

    def notify(state: str) -> None:
        from fastpunch._sdnotify import notify as sd_notify

        failed = sd_notify(state)
        if failed:
            event("notify-failed", socket=os.environ.get("NOTIFY_SOCKET"), reason=failed)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_certificate)
        relay_port, probe_port = cfg["relay_port"], cfg["probe_port"]
        try:
            bound = await server.start(host, port, None if relay_port < 0 else relay_port,
                                       None if probe_port < 0 else probe_port)
        except RuntimeError as exc:         # the registry's: Redis not reachable
            try:
                await server.close()
            except Exception:               # it cannot reach Redis to say goodbye either
                pass
            raise FastpunchError(str(exc)) from exc
        mserver = None
        ready = {"host": bound[0], "port": bound[1], "relay_port": server.relay_port,
                 "probe_port": server.probe_port2, "node": server.node}
        if cfg["metrics"] is not None:
            mserver = await metrics.serve(server, *cfg["metrics"])
            ready["metrics"] = mserver.sockets[0].getsockname()[1]
        if cfg["ready_file"]:
            with open(cfg["ready_file"] + ".tmp", "w") as f:
                json.dump(ready, f)
            os.replace(cfg["ready_file"] + ".tmp", cfg["ready_file"])
        notify(f"READY=1\nSTATUS=listening on {bound[0]}:{bound[1]}\nMAINPID={os.getpid()}")
        await stop.wait()
        # asked to stop: a repeated request (an impatient operator, a
        # supervisor's second TERM) must not kill the clean exit half way
        # through, with -15 for a status (seen under load: the store still
        # closing after the loop had given TERM its default back)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        notify("STOPPING=1")
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


def cmd_renew_cert(args) -> int:
    from fastpunch.ccs import pki

    out = pki.renew(args.dir, ca_key_path=args.ca_key, names=args.name, addresses=args.ip,
                    days=args.days)
    print(json.dumps(out))
    print("reload a running `ccs serve` with SIGHUP (systemctl reload fastpunch-ccs)",
          file=sys.stderr)
    return 0


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

    _, key = read_credentials(args.key_file, args.name)

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
