"""Hostile devices against a real ``fastpunch ccs serve`` process, and a
legitimate device measured at the same time (tests/ccs/test_hostile.py).

The CCS runs as its own process (its RSS is what is bounded); each attack
runs in another process (``python -m tests.ccs.hostile ATTACK ...``, at
nice 19: see main), from 127.0.0.2, bounded in time, and prints a
JSON summary of what the CCS did to it; the legitimate devices run in the
test's own event loop. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from typing import Optional

from fastpunch.ccs.relay import FILTERING
from fastpunch.credentials import client_context
from fastpunch.proto import wire
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, Role

INFO = wire.NextInfo(port=40000, isn=1, nat="nat")
ATTACKER = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


class Node:
    """One ``ccs serve`` process on loopback, its log in a file."""

    def __init__(self, directory: str, *extra: str) -> None:
        self.dir = directory
        self.port = free_port()
        self.ready_path = os.path.join(directory, "ready.json")
        self.log_path = os.path.join(directory, "serve.log")
        if os.path.exists(self.ready_path):
            os.unlink(self.ready_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastpunch", "ccs", "serve", "--dir", directory, "--listen",
             f"127.0.0.1:{self.port}", "--relay-port", "0", "--probe-port", "-1",
             "--metrics", "127.0.0.1:0", "--heartbeat", "15", "--ready-file", self.ready_path,
             *extra], stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ready_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the CCS did not start: " + open(self.log_path).read()[-2000:])
            time.sleep(0.05)
        with open(self.ready_path) as f:
            ready = json.load(f)
        self.relay_port = ready["relay_port"]
        self.metrics_port = ready["metrics"]

    def rss_kib(self) -> int:
        return status_kib(self.proc.pid, "VmRSS")

    def peak_kib(self) -> int:
        return status_kib(self.proc.pid, "VmHWM")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def events(self) -> list:
        out = []
        with open(self.log_path) as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def metric(self, name: str) -> float:
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        for line in data.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- a device reduced to its protocol, on asyncio (the legitimate side) -------------------
class Client(asyncio.Protocol):
    """Logs in; answers offers at once (when ``answer``); keeps every
    message it got; resolves futures for its requests."""

    def __init__(self, name: str, key: bytes, answer: bool = True) -> None:
        self.name, self.key, self.answer = name, key, answer
        self.m = Connection(Role.CLIENT)
        self.transport = None
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.closed = loop.create_future()
        self.waiters: dict = {}
        self.offers: asyncio.Queue = asyncio.Queue()
        self.readies: asyncio.Queue = asyncio.Queue()
        self.got: list = []
        self.error: Optional[wire.Error] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.m.hello(self.name, self.key, os.urandom))

    def data_received(self, data: bytes) -> None:
        self.m.receive_data(data)
        while True:
            msg = self.m.next_event()
            if msg is NEED_DATA or msg is CLOSED:
                return
            self.got.append(msg)
            if isinstance(msg, wire.Challenge):
                self.transport.write(self.m.respond())
            elif isinstance(msg, wire.AuthOk):
                self.ready.set_result(True)
            elif isinstance(msg, wire.RendezvousOffer):
                if self.answer:
                    self.send(wire.RendezvousAnswer(request=msg.request, **INFO.fields()))
                else:
                    self.offers.put_nowait(msg)
            elif isinstance(msg, (wire.RendezvousReady, wire.RendezvousRefused)):
                self.readies.put_nowait(msg)
                fut = self.waiters.pop(msg.request, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, wire.Error):
                self.error = msg
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(f"{msg.code}: {msg.reason}"))

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: lost ({exc})"))
        if not self.closed.done():
            self.closed.set_result(self.error)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"{self.name}: lost"))

    def send(self, msg: wire.Message) -> None:
        self.transport.write(self.m.send(msg))

    async def rendezvous(self, peer: str, rid: int, timeout: float = 10) -> wire.Message:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[rid] = fut
        self.send(wire.RendezvousRequest(request=rid, peer=peer, **INFO.fields()))
        return await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def login(port: int, ca: str, name: str, key: bytes, answer: bool = True,
                source: str = "127.0.0.1", timeout: float = 10) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(loop.create_connection(
        lambda: Client(name, key, answer), "127.0.0.1", port, ssl=client_context(ca),
        server_hostname="localhost", local_addr=(source, 0)), timeout)
    await asyncio.wait_for(client.ready, timeout)
    return client


def percentile(xs: list, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def legitimate(port: int, ca: str, keys: dict, seconds: float, rate: float = 20) -> dict:
    """The measured side: "viewer" logs in afresh and asks for "cam" (which
    answers at once), ``rate`` times a second for ``seconds``; each login
    and each rendezvous timed, every failure counted with its reason."""
    cam = await login(port, ca, "cam", keys["cam"])
    logins, rendezvous, failures = [], [], []
    try:
        end = time.monotonic() + seconds
        rid = 0
        while time.monotonic() < end:
            tick = time.monotonic()
            rid += 1
            try:
                t0 = time.perf_counter()
                viewer = await login(port, ca, "viewer", keys["viewer"])
                t1 = time.perf_counter()
                msg = await viewer.rendezvous("cam", rid)
                t2 = time.perf_counter()
                viewer.close()
                if isinstance(msg, wire.RendezvousReady):
                    logins.append(t1 - t0)
                    rendezvous.append(t2 - t1)
                else:
                    failures.append(f"refused: {msg.code}: {msg.reason}")
            except Exception as exc:        # a failure of the legitimate side: counted
                failures.append(repr(exc))
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))
        if cam.closed.done():
            failures.append(f"cam was cut: {cam.closed.result()}")
    finally:
        cam.close()
    return {"logins": len(logins), "failures": failures,
            "login_p99_ms": percentile(logins, 99) * 1000 if logins else None,
            "rendezvous_p99_ms": percentile(rendezvous, 99) * 1000 if rendezvous else None,
            "login_max_ms": max(logins) * 1000 if logins else None}


# -- attacks (each in its own process; sync sockets, bounded in time) ---------------------
class Sync:
    """A blocking TLS client speaking the device protocol."""

    def __init__(self, port: int, ca: str, source: str = ATTACKER) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                       source_address=(source, 0))
        self.sock = client_context(ca).wrap_socket(raw, server_hostname="localhost")
        self.m = Connection(Role.CLIENT)

    def login(self, name: str, key: bytes) -> None:
        self.sock.sendall(self.m.hello(name, key, os.urandom))
        self.expect(wire.Challenge)
        self.sock.sendall(self.m.respond())
        self.expect(wire.AuthOk)

    def expect(self, kind):
        while True:
            msg = self.m.next_event()
            if msg is NEED_DATA:
                data = self.sock.recv(65536)
                self.m.receive_data(data)
                continue
            if msg is CLOSED:
                raise ConnectionError("closed")
            if isinstance(msg, wire.Error):
                raise Cut(msg.code)
            if kind is None or isinstance(msg, kind):
                return msg

    def drain_error(self, seconds: float = 3.0) -> str:
        """Read until the CCS cuts us: the Error's code, or how it ended."""
        self.sock.settimeout(seconds)
        try:
            while True:
                self.expect(None)
        except Cut as cut:
            return cut.code
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            return type(exc).__name__
        except wire.WireError as exc:
            return "wire:" + exc.code

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Cut(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def flood(args, frame_of, read: bool) -> dict:
    """Log in as mallory and send frames as fast as possible (reading the
    replies or not) until the CCS cuts us; again, until time is up."""
    cuts: collections.Counter = collections.Counter()
    sent = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            c = Sync(args.port, args.ca)
            c.login(args.name, bytes.fromhex(args.key))
        except (OSError, Cut, ConnectionError) as exc:
            cuts["login:" + getattr(exc, "code", type(exc).__name__)] += 1
            time.sleep(0.05)
            continue
        stop = threading.Event()
        if read:
            def reader():
                try:
                    c.sock.settimeout(0.5)
                    while not stop.is_set():
                        c.sock.recv(65536)
                except (OSError, ssl.SSLError):
                    pass
            threading.Thread(target=reader, daemon=True).start()
        batch = b"".join(frame_of(c, i) for i in range(200))
        try:
            c.sock.settimeout(5)
            while time.monotonic() < end:
                c.sock.sendall(batch)
                sent += 200
        except (OSError, ssl.SSLError):
            pass
        stop.set()
        if not read:
            cuts[c.drain_error()] += 1
        else:
            cuts["cut"] += 1
        c.close()
    return {"sent": sent, "cuts": dict(cuts)}


def heartbeat(c, i):
    return c.m.send(wire.Heartbeat(i))


def request_to_cam(c, i):
    return c.m.send(wire.RendezvousRequest(request=i + 1, peer="cam", **INFO.fields()))


def guess_answer(c, i):
    return c.m.send(wire.RendezvousAnswer(request=random.getrandbits(32) or 1, **INFO.fields()))


def silent(args, tls: bool) -> dict:
    """Open ``args.count`` connections from one address and say nothing;
    count those the CCS closed by the end."""
    socks = []
    refused = 0
    for _ in range(args.count):
        try:
            raw = socket.create_connection(("127.0.0.1", args.port), timeout=5,
                                           source_address=(ATTACKER, 0))
            if tls:
                raw = client_context(args.ca).wrap_socket(raw, server_hostname="localhost")
            raw.setblocking(False)
            socks.append(raw)
        except (OSError, ssl.SSLError):
            refused += 1
    time.sleep(max(0.0, args.seconds - 1))
    closed = 0
    for s in socks:
        try:
            s.recv(1)            # an Error frame, or the end: the CCS cut it either way
            closed += 1
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, ssl.SSLError):
            closed += 1
        s.close()
    return {"opened": len(socks), "refused": refused, "closed_by_ccs": closed}


def probes(args) -> dict:
    """Filtering probes from 127.0.0.2 as fast as they are answered, many
    at once (their answers dropped by the test's nftables rule, so each
    holds its slot for the probe's whole wait)."""
    verdicts: collections.Counter = collections.Counter()
    end = time.monotonic() + args.seconds
    lock = threading.Lock()

    def one():
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", args.relay_port), timeout=5,
                                              source_address=(ATTACKER, 0)) as s:
                    s.sendall(FILTERING + bytes(32))
                    v = s.recv(1)
            except OSError as exc:
                v = type(exc).__name__.encode()
            with lock:
                verdicts[v.decode(errors="replace")] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args.count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 10)
    return {"verdicts": dict(verdicts)}


def malformed(args) -> dict:
    """Bad frames of every kind, each on a fresh connection: what the CCS
    answered to each."""
    answers: collections.Counter = collections.Counter()
    cases = {
        "oversized-frame": struct.pack("!BBH", wire.VERSION, 1, 0xFFFF) + bytes(64),
        "bad-utf8-name": struct.pack("!BBH", wire.VERSION, 1, 3 + 4 + 3 + 32) +
        struct.pack("!BH", 1, 4) + b"\xff\xfe\xfd\xfc" + struct.pack("!BH", 2, 32) +
        os.urandom(32),
        "field-overrun": struct.pack("!BBH", wire.VERSION, 1, 6) + struct.pack("!BH", 1, 900) +
        b"abc",
        "garbage": os.urandom(512),
        "unknown-type": struct.pack("!BBH", wire.VERSION, 200, 0),
    }
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:        # a name no device can have: the login runs its course and fails
            c = Sync(args.port, args.ca)
            c.login("ü" * 32, os.urandom(32))
            answers["non-ascii-name:logged-in"] += 1
        except Cut as cut:
            answers[f"non-ascii-name:{cut.code}"] += 1
        except (OSError, ssl.SSLError) as exc:
            answers[f"non-ascii-name:{type(exc).__name__}"] += 1
        c.close()
        for case, data in cases.items():
            try:
                c = Sync(args.port, args.ca)
                c.sock.sendall(data)
                answers[f"{case}:{c.drain_error()}"] += 1
                c.close()
            except (OSError, ssl.SSLError) as exc:
                answers[f"{case}:{type(exc).__name__}"] += 1
    return {"answers": dict(answers)}


ATTACKS = {
    "heartbeat-flood": lambda a: flood(a, heartbeat, read=False),
    "heartbeat-flood-read": lambda a: flood(a, heartbeat, read=True),
    "request-flood": lambda a: flood(a, request_to_cam, read=True),
    "guess-answers": lambda a: flood(a, guess_answer, read=False),
    "silent-tcp": lambda a: silent(a, tls=False),
    "silent-tls": lambda a: silent(a, tls=True),
    "probe-hold": probes,
    "malformed": malformed,
}


def start_attack(attack: str, node: Node, ca: str, seconds: float, name: str = "mallory",
                 key: bytes = b"", count: int = 0) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ccs.hostile", attack, "--port", str(node.port),
         "--relay-port", str(node.relay_port), "--ca", ca, "--name", name, "--key", key.hex(),
         "--seconds", str(seconds), "--count", str(count)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def attack_result(proc: subprocess.Popen, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the attack failed to run: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("attack", choices=sorted(ATTACKS))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--relay-port", type=int, default=0)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--name", default="mallory")
    ap.add_argument("--key", default="")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--count", type=int, default=0)
    args = ap.parse_args()
    import resource

    # the attacker's own CPU is not the CCS's: on a 2-core test machine an
    # attacker spinning at full priority would measure the scheduler, not
    # the CCS (a real one floods from elsewhere); what it costs the CCS is
    # what the CCS does with its bytes
    os.nice(19)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(ATTACKS[args.attack](args)), flush=True)


if __name__ == "__main__":
    main()
