"""Stream tools: ``fastpunch connect | send | recv | exec``.

``fastpunch natcheck`` classifies this device's NAT (mapping kind, and the
delta of a sequential one) from probes the CCS answers; ``--nat auto`` on
the others does the same before connecting.

Each logs this device in to the CCS, makes (``--to PEER``) or accepts
(``--from PEER``) one connection, direct when the networks allow it and
relayed otherwise, wraps it in the secure channel, and moves bytes:

    fastpunch send --to viewer movie.ts           # or - for stdin
    fastpunch recv --from camera out.ts           # or - for stdout
    fastpunch exec --to viewer -- ffmpeg -re -f lavfi -i testsrc -f mpegts -
    fastpunch exec --from camera -- ffplay -

so ffmpeg, gst or any player can sit on either end. Progress (bytes, rate,
path) goes to stderr on a terminal; a one-line JSON summary always ends it
(``--json``: only that line). With ``--session`` on both sides the stream is
a resumable session (it survives the path's death), and ``--relay-first``
on the connecting side starts it on the relay and moves it to the direct
path when the punch completes; the summary then carries ``path_now`` and
``path_history``, and ``--verbose`` prints the history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from typing import Optional

from fastpunch.errors import FastpunchError
from fastpunch.liveness import PathLost

CHUNK = 256 * 1024


def add_login_args(p: argparse.ArgumentParser) -> None:
    """What every device command needs to log in to the CCS."""
    p.add_argument("--ccs", action="append", required=True, metavar="HOST:PORT",
                   help="CCS node (repeatable)")
    p.add_argument("--name", required=True, help="this device's name")
    p.add_argument("--key-file", required=True, help="credentials from `fastpunch ccs add-device`")
    p.add_argument("--ca", required=True, help="the deployment's ca.pem (pinned)")
    p.add_argument("--server-name", help="TLS name of the CCS (default: the host given)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """A command that connects to a peer: logging in, and how to connect."""
    add_login_args(p)
    p.add_argument("--nat", default="auto",
                   help="this device's NAT kind (default: %(default)s, natcheck finds out)")
    p.add_argument("--quick", action="store_true",
                   help="do not wait for natcheck after logging in (a one-shot command waits "
                        "by default: its plan rests on the evidence)")
    p.add_argument("--strategy", action="append", metavar="NAME",
                   help="these strategies instead of the CCS's plan, in this order (both "
                        "sides alike; add 'relay' to allow the relay); default: the plan")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the peer")
    p.add_argument("--keepalive", type=_keepalive, default=None, metavar="SECONDS",
                   help="keepalive period of the stream, 0 = none (default: the CCS's, "
                        "else 10; docs/liveness.md)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument("--session", action="store_true",
                   help="a resumable session (both sides alike): when the path dies it "
                        "resumes over a fresh punch or the relay, every byte once; the "
                        "device stays logged in meanwhile (docs/session.md)")
    p.add_argument("--relay-first", nargs="?", const="yes", choices=("yes", "auto", "no"),
                   help="(the connecting side; implies --session, the peer needs --session) "
                        "start on the CCS relay at once and move to the direct path when "
                        "the punch behind it completes; auto: only where the CCS expects a "
                        "slow punch (the default with --session), no: punch first")


def _keepalive(text: str):
    """--keepalive: whole seconds 1-3600, or 0 for none."""
    from fastpunch import liveness

    try:
        value = int(text)
        return False if value == 0 else liveness.Keepalive(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"whole seconds, {liveness.MIN_PERIOD}-{liveness.MAX_PERIOD}, or 0 for none: "
            f"{text!r}") from None


def add_camera_subparser(sub) -> None:
    """`fastpunch camera` (fastpunch.camera runs it; its flags live here, so
    that module imports nothing but the public API: it is the example of a
    program of your own)."""
    from fastpunch import camera

    p = sub.add_parser("camera", help="serve a live MPEG-TS stream to every authorized viewer",
                       description=camera.__doc__.split("\n\n")[0])
    add_login_args(p)
    p.add_argument("--nat", default="auto", help="NAT kind (auto: natcheck finds out)")
    p.add_argument("--source", default=camera.TEST_SOURCE, help="ffmpeg input arguments")
    p.add_argument("--max-viewers", type=int, metavar="N", help="stop accepting after N viewers")
    p.set_defaults(func=camera.cmd_camera)


def add_subparsers(sub) -> None:
    p = sub.add_parser("natcheck", help="classify this device's NAT mapping with the CCS's help")
    add_login_args(p)
    p.add_argument("--probes", type=int, default=4, help="address probes from each local port")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for the whole check (login and probes)")
    p.set_defaults(func=cmd_natcheck)

    p = sub.add_parser("connect", help="connect to a peer and report how (then close)")
    add_device_args(p)
    p.add_argument("--to", required=True, metavar="PEER")
    p.add_argument("--verbose", "-v", action="store_true", help="every attempt, every packet")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("send", help="send a file or stdin to a peer, encrypted")
    add_device_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--to", metavar="PEER")
    who.add_argument("--from", dest="from_", metavar="PEER", help="wait for PEER to connect")
    p.add_argument("file", nargs="?", default="-")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the connection's report and the session's path history on stderr")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("recv", help="receive from a peer into a file or stdout")
    add_device_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--from", dest="from_", metavar="PEER", help="wait for PEER to connect")
    who.add_argument("--to", metavar="PEER")
    p.add_argument("file", nargs="?", default="-")
    p.add_argument("--limit", type=int, metavar="BYTES", help="stop after this many bytes")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the connection's report and the session's path history on stderr")
    p.set_defaults(func=cmd_recv)

    p = sub.add_parser("exec", help="run CMD with the connection as its stdin/stdout")
    add_device_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--to", metavar="PEER")
    who.add_argument("--from", dest="from_", metavar="PEER")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the connection's report and the session's path history on stderr")
    p.set_defaults(func=cmd_exec)


class _DeviceThread:
    """A device logged in on an event loop of its own thread, for as long as
    a resumable session needs it (a reconnect goes through it)."""

    def __init__(self) -> None:
        from fastpunch._loop import new_event_loop

        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="fastpunch-device")
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def open_connection(args):
    """Log in, connect or accept; returns (PeerConnection, the stream over
    it, what to call when done with it). The stream is the secure channel,
    or with --session / --relay-first a resumable session, the device then
    kept logged in until the returned closer runs."""
    from fastpunch.client import Device
    from fastpunch.credentials import read_credentials

    _, key = read_credentials(args.key_file, args.name)
    asked = getattr(args, "relay_first", None)
    if asked is not None and not getattr(args, "to", None):
        raise FastpunchError("--relay-first is for the connecting side (--to); the accepting "
                             "side follows the CCS's word with --session")
    session = asked not in (None, "no") or bool(getattr(args, "session", False))
    # a session can move off the relay: where the punch looks slow, start there
    relay_first = asked if asked is not None else ("auto" if session else "no")
    runner = _DeviceThread()
    dev = None

    async def run():
        nonlocal dev
        accepting = not getattr(args, "to", None)
        # an accepting side announces its next-connection info ahead: the
        # peer's rendezvous then takes one CCS round trip, not two
        dev = Device(args.ccs, args.name, key, ca_file=args.ca, server_hostname=args.server_name,
                     nat=args.nat, standing=accepting and getattr(args, "from_", None) is None,
                     keepalive=args.keepalive)
        await dev.login()
        if not args.quick:
            # a process that logged in just now: without natcheck's
            # evidence its plan could not spray, predict or map a port
            await dev.ready(30)
        if getattr(args, "to", None):
            return await dev.connect(args.to, strategies=args.strategy, timeout=args.timeout,
                                     relay_first=relay_first)
        return await asyncio.wait_for(
            dev.accept(strategies=args.strategy, peer=args.from_), args.timeout)

    def done() -> None:
        if dev is not None:
            try:
                runner.run(dev.close(), 30)
            except Exception:                 # closing is best effort: the process ends
                pass
        runner.stop()

    try:
        conn = runner.run(run())
        stream = conn.resumable() if session else conn.secure()
    except BaseException:
        done()
        raise
    if not session:                           # nothing goes through the device any more
        done()
        return conn, stream, lambda: None
    return conn, stream, done


def path_now(conn, stream) -> str:
    """Where the stream runs now: a session's last transport, else the
    connection's path."""
    for event in reversed(getattr(stream, "history", ())):
        if event.what in ("resume", "established"):
            return event.detail.split(" ", 1)[0]
    return conn.path


def history_lines(stream) -> list:
    """A session's path history, for --verbose: a line per event, in
    seconds from the first."""
    events = list(getattr(stream, "history", ()))
    if not events:
        return []
    t0 = events[0].at or 0.0
    return [f"  {((e.at or t0) - t0):8.3f} s  {e.what:14s} {e.detail}".rstrip() for e in events]


def history_of(stream) -> Optional[list]:
    """A session's path history for the JSON summary, None without one."""
    events = getattr(stream, "history", None)
    if events is None:
        return None
    t0 = events[0].at if events and events[0].at is not None else 0.0
    return [{"at": round((e.at or t0) - t0, 3), "what": e.what, "detail": e.detail}
            for e in events]


class Progress:
    def __init__(self, conn, quiet: bool) -> None:
        self.conn, self.start, self.bytes = conn, time.monotonic(), 0
        self.tty = not quiet and sys.stderr.isatty()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.bytes += n
        now = time.monotonic()
        if self.tty and now - self._last > 0.5:
            self._last = now
            rate = self.bytes / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.bytes / 1e6:10.1f} MB  {rate / 1e6:8.1f} MB/s  "
                             f"{self.conn.path} ({self.conn.strategy})")
            sys.stderr.flush()

    def summary(self, stream=None, **extra) -> dict:
        seconds = time.monotonic() - self.start
        if self.tty:
            sys.stderr.write("\n")
        history = history_of(stream)
        if history is not None:
            extra = {"path_now": path_now(self.conn, stream), "path_history": history, **extra}
        return {"peer": self.conn.peer, "path": self.conn.path, "strategy": self.conn.strategy,
                "connect_seconds": round(self.conn.report.seconds, 4),
                "keepalive_seconds": _keepalive_seconds(self.conn), "bytes": self.bytes,
                "seconds": round(seconds, 3),
                "MB_per_s": round(self.bytes / max(seconds, 1e-9) / 1e6, 2), **extra}


def _keepalive_seconds(conn) -> Optional[int]:
    """The summary's keepalive: the period in force, None when off."""
    return conn.keepalive.period if conn.keepalive is not None else None


def _say(args, conn, summary: dict, stream=None) -> None:
    if not args.json and getattr(args, "verbose", False):
        for line in conn.report.lines():
            print(line, file=sys.stderr)
        lines = history_lines(stream)
        if lines:
            print("session path history:", file=sys.stderr)
            for line in lines:
                print(line, file=sys.stderr)
    print(json.dumps(summary), file=sys.stderr if not args.json else sys.stdout, flush=True)


def cmd_natcheck(args) -> int:
    from fastpunch._loop import new_event_loop
    from fastpunch.client import Device
    from fastpunch.credentials import read_credentials

    _, key = read_credentials(args.key_file, args.name)

    async def run():
        # nat "unknown": no natcheck in the background, this one is the measurement
        async with Device(args.ccs, args.name, key, ca_file=args.ca,
                          server_hostname=args.server_name, nat="unknown") as dev:
            return await dev.natcheck(args.probes)

    async def bounded():
        try:
            return await asyncio.wait_for(run(), args.timeout)
        except asyncio.TimeoutError:
            raise FastpunchError(f"natcheck did not finish within {args.timeout:g} s") from None

    loop = new_event_loop()
    try:
        result = loop.run_until_complete(bounded())
    finally:
        loop.close()
    print(json.dumps(result))
    return 0


def cmd_connect(args) -> int:
    conn, secure, done = open_connection(args)
    try:
        summary = {"peer": conn.peer, "path": conn.path, "strategy": conn.strategy,
                   "connect_seconds": round(conn.report.seconds, 4),
                   "cipher": secure.cipher.name if hasattr(secure, "cipher") else None,
                   "keepalive_seconds": _keepalive_seconds(conn),
                   "report": conn.report.as_dict() if args.verbose else None}
        if args.verbose and not args.json:
            for line in conn.report.lines():
                print(line)
            print(conn.keepalive.describe() if conn.keepalive else "keepalive: off")
        print(json.dumps(summary))
        secure.close()
    finally:
        done()
    return 0


def _pump_out(src, secure, progress: Progress) -> None:
    while data := src.read(CHUNK):
        secure.sendall(data)
        progress.add(len(data))
    secure.close_write()


def _pump_in(secure, dst, progress: Progress, limit: Optional[int] = None) -> None:
    while True:
        want = CHUNK if limit is None else min(CHUNK, limit - progress.bytes)
        if want <= 0:
            break
        data = secure.recv(want)
        if not data:
            break
        dst.write(data)
        progress.add(len(data))
    dst.flush()


def cmd_send(args) -> int:
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    try:
        conn, secure, done = open_connection(args)
        try:
            progress = Progress(conn, args.json)
            _pump_out(src, secure, progress)
            # wait for the peer to finish reading and close: nothing is lost in flight
            while secure.recv(CHUNK):
                pass
            secure.close()
            _say(args, conn, progress.summary(secure, sent=progress.bytes), secure)
        finally:
            done()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    return 0


def cmd_recv(args) -> int:
    dst = sys.stdout.buffer if args.file == "-" else open(args.file, "wb")
    try:
        conn, secure, done = open_connection(args)
        try:
            progress = Progress(conn, args.json or args.file == "-")
            _pump_in(secure, dst, progress, args.limit)
            secure.close()
            _say(args, conn, progress.summary(secure, received=progress.bytes), secure)
        finally:
            done()
    finally:
        if dst is not sys.stdout.buffer:
            dst.close()
    return 0


def cmd_exec(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise FastpunchError("exec needs a command: fastpunch exec --to PEER -- CMD [ARGS]")
    conn, secure, done = open_connection(args)
    try:
        return _exec(args, cmd, conn, secure)
    finally:
        done()


def _exec(args, cmd, conn, secure) -> int:
    from fastpunch.session import SessionLost

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    progress_out = Progress(conn, True)
    progress_in = Progress(conn, True)
    lost: list = []                 # a dead path is an error, not the child's quiet end
    if hasattr(secure, "bridge"):
        # a resumable session writes as it reads (ACKs, resumes): it runs in
        # this one thread, the child's pipes beside its transport
        try:
            secure.bridge(proc.stdout, proc.stdin, sent=progress_out.add,
                          received=progress_in.add)
        except (PathLost, SessionLost) as exc:
            lost.append(exc)
        except BaseException:
            # anything else (a usage limit, a protocol violation, Ctrl-C):
            # the child and the session go too, nothing left running
            proc.kill()
            proc.wait()
            secure.close()
            raise
        finally:
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        return _exec_done(args, conn, secure, proc, progress_out, progress_in, lost)

    def feed():
        try:
            _pump_in(secure, proc.stdin, progress_in)
        except (PathLost, SessionLost) as exc:
            lost.append(exc)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    reader = threading.Thread(target=feed, daemon=True)
    reader.start()
    try:
        _pump_out(proc.stdout, secure, progress_out)
    except (PathLost, SessionLost) as exc:
        lost.append(exc)
    except (BrokenPipeError, ConnectionError):
        pass
    proc.wait()
    reader.join(30)
    return _exec_done(args, conn, secure, proc, progress_out, progress_in, lost)


def _exec_done(args, conn, secure, proc, progress_out, progress_in, lost) -> int:
    rc = proc.wait()
    secure.close()
    _say(args, conn, {**progress_out.summary(secure, sent=progress_out.bytes),
                      "received": progress_in.bytes, "exit_code": rc}, secure)
    if lost:
        raise lost[0]
    return rc
