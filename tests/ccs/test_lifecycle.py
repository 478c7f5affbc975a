"""Device lifecycle on a running CCS: a device removed, disabled or re-keyed
(or a pair denied) in the key store, by another connection as the CLI would,
is cut by the server's watcher within a second (measured) whether it is
idle, mid-rendezvous or relaying; the change is logged as an audit line; its
peer is told; and the store's new state holds at the next login."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time

import pytest

from fastpunch.ccs.keystore import KeyStore
from fastpunch.ccs.lifecycle import Watcher
from fastpunch.client import AuthenticationError, CCSError, NextInfo, RendezvousRefusedError

from .conftest import arun, rendezvous, running

INFO = NextInfo(port=40001, isn=1, nat="napt-random")
CUT_WITHIN = 1.0                    # seconds, from the commit to the device seeing it
# change -> (what the admin does, the code the device's session is cut with,
#            what logging in with the old key then gets)
CHANGES = {
    "disable": (lambda store, name: store.disable(name), "device-disabled", "device-disabled"),
    "remove": (lambda store, name: store.remove(name), "device-removed", "auth-failed"),
    "rekey": (lambda store, name: store.rekey(name), "device-rekeyed", "auth-failed"),
}


@pytest.fixture
def admin(deployment):
    """The key store as `fastpunch ccs devices ...` opens it: another connection."""
    store = KeyStore(os.path.join(deployment.dir, "keys.db"), actor="test-operator")
    yield store
    store.close()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="fastpunch.ccs")
    caplog.set_level(logging.INFO, logger="fastpunch.client")

    def events(kind: str, **match) -> list:
        out = []
        for record in caplog.records:
            if record.name != "fastpunch.ccs" or not record.getMessage().startswith("{"):
                continue
            e = json.loads(record.getMessage())
            if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
                out.append(e)
        return out

    events.caplog = caplog
    return events


async def fatal(dev) -> BaseException:
    """What ended ``dev`` (its incoming() raises it), as soon as it does."""
    try:
        async for _ in dev.incoming():
            pass
    except BaseException as exc:      # (CCSError and its kinds)
        return exc


async def within(awaitable, t0: float, what: str, seconds: float = CUT_WITHIN):
    """Await ``awaitable`` and check it finished (returned or raised) within
    ``seconds`` of ``t0``."""
    try:
        return await asyncio.wait_for(awaitable, seconds + 2)
    finally:
        took = time.monotonic() - t0
        print(f"{what}: {took * 1000:.0f} ms after the change")
        assert took < seconds, f"{what} took {took:.3f} s"


async def until(predicate, seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def login(deployment, addr, name, key=None):
    dev = deployment.device(addr, name, key, reconnect=False)
    await dev.login()
    return dev


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_connected_device_is_cut_within_a_second(deployment, admin, logs, change):
    deployment.enroll_pair()
    apply, code, old_key_gets = CHANGES[change]

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            viewer = await login(deployment, addr, "viewer")
            ended = asyncio.create_task(fatal(cam))
            t0 = time.monotonic()
            result = apply(admin, "cam")
            err = await within(ended, t0, f"{change}: session cut")
            assert isinstance(err, CCSError) and err.code == code
            await until(lambda: "cam" not in server.sessions)
            assert viewer.connected and "viewer" in server.sessions     # nobody else is cut
            (audit,) = logs("audit", device="cam", action=change)
            assert audit["effect"] == "revoked" and audit["actor"] == "test-operator"
            assert logs("closed", device="cam", code=code)
            # the store's new state holds at the next login
            with pytest.raises(AuthenticationError) as again:
                await login(deployment, addr, "cam")
            assert again.value.code == old_key_gets
            if change == "rekey":
                new_key = result[0]
                dev = await login(deployment, addr, "cam", new_key)
                ra, rb, _ = await rendezvous(dev, viewer, "viewer", INFO, INFO)
                assert ra.peer == "viewer" and rb.peer == "cam"
                await dev.close()
            await viewer.close()
            await cam.close()

    arun(main())


def test_a_reconnecting_device_stops_at_its_refusal(deployment, admin):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam = deployment.device(addr, "cam")                 # reconnects, with backoff
            await cam.login()
            ended = asyncio.create_task(fatal(cam))
            t0 = time.monotonic()
            admin.disable("cam")
            # cut, logs in again, is refused: final (no retry loop), within the second
            err = await within(ended, t0, "disable: reconnect refused", CUT_WITHIN + 0.5)
            assert isinstance(err, AuthenticationError) and err.code == "device-disabled"
            assert cam.connections == 1 and "cam" not in server.sessions
            await cam.close()

    arun(main())


def test_a_device_enabled_again_logs_in_and_rendezvous(deployment, admin):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            admin.disable("cam")
            with pytest.raises(AuthenticationError) as err:
                await login(deployment, addr, "cam")
            assert err.value.code == "device-disabled" and server.connected == 0
            viewer = await login(deployment, addr, "viewer")
            with pytest.raises(RendezvousRefusedError) as refused:       # nor may it be reached
                await viewer.rendezvous("cam", INFO)
            assert refused.value.code == "not-authorized"
            admin.enable("cam")
            cam = await login(deployment, addr, "cam")
            ra, rb, asker = await rendezvous(viewer, cam, "cam", INFO, INFO)
            assert (ra.peer, rb.peer, asker) == ("cam", "viewer", "viewer")
            await cam.close()
            await viewer.close()

    arun(main())


@pytest.mark.parametrize("change", list(CHANGES))
def test_cut_while_holding_an_offer_its_asker_is_refused(deployment, admin, logs, change):
    """viewer asks for cam; cam holds the offer unanswered when it is cut:
    viewer's rendezvous is refused at once with the reason, not left to time out."""
    deployment.enroll_pair()
    apply, code, _ = CHANGES[change]

    async def main():
        server = deployment.server(rendezvous_timeout=30)
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            viewer = await login(deployment, addr, "viewer")
            asking = asyncio.create_task(viewer.rendezvous("cam", INFO))
            offers = cam.incoming()
            offer = await asyncio.wait_for(offers.__anext__(), 5)
            assert offer.peer == "viewer"
            ended = asyncio.create_task(fatal(cam))
            t0 = time.monotonic()
            apply(admin, "cam")
            with pytest.raises(RendezvousRefusedError) as refused:
                await within(asking, t0, f"{change}: the asker refused")
            assert refused.value.code == code
            err = await within(ended, t0, f"{change}: the offered device cut")
            assert err.code == code
            assert not server.pending and viewer.connected
            assert logs("audit", device="cam", action=change)[0]["effect"] == "revoked"
            await viewer.close()
            await cam.close()

    arun(main())


@pytest.mark.parametrize("change", list(CHANGES))
def test_cut_while_asking_its_offered_peer_learns_it_is_gone(deployment, admin, logs, change):
    """cam asks for viewer; viewer holds the offer when cam is cut: cam's
    request ends with the link, and viewer's answer is refused (peer-gone)."""
    deployment.enroll_pair()
    apply, code, _ = CHANGES[change]

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            viewer = await login(deployment, addr, "viewer")
            asking = asyncio.create_task(cam.rendezvous("viewer", INFO))
            offer = await asyncio.wait_for(viewer.incoming().__anext__(), 5)
            ended = asyncio.create_task(fatal(cam))
            t0 = time.monotonic()
            apply(admin, "cam")
            err = await within(ended, t0, f"{change}: the asker cut")
            assert err.code == code
            with pytest.raises(CCSError) as lost:
                await asking
            assert lost.value.code == "disconnected"       # its request died with its link
            assert not server.pending
            with pytest.raises(RendezvousRefusedError) as refused:
                await offer.answer(INFO, timeout=5)
            assert refused.value.code == "peer-gone" and viewer.connected
            assert logs("audit", device="cam", action=change)[0]["effect"] == "revoked"
            await viewer.close()
            await cam.close()

    arun(main())


class Stream:
    """Bytes pumped one way through a relayed pair, in threads: how many
    arrived, and when the receiving side saw the end."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.received = 0
        self.ended_at = None
        self.send_error = None
        self._stop = threading.Event()
        src.setblocking(True)
        dst.setblocking(True)
        dst.settimeout(10)
        self._threads = [threading.Thread(target=self._send, args=(src,), daemon=True),
                         threading.Thread(target=self._recv, args=(dst,), daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self, sock) -> None:
        block = os.urandom(64 * 1024)
        try:
            while not self._stop.is_set():
                sock.sendall(block)
        except OSError as exc:
            self.send_error = exc

    def _recv(self, sock) -> None:
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                self.received += len(data)
        except OSError:
            pass
        self.ended_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


async def relaying(deployment, addr):
    cam = await login(deployment, addr, "cam")
    viewer = await login(deployment, addr, "viewer")
    ra, rb, _ = await rendezvous(cam, viewer, "viewer", INFO, INFO)
    sa, sb = await asyncio.gather(cam.relay(ra), viewer.relay(rb))
    stream = Stream(sa, sb)
    await until(lambda: stream.received >= 1 << 20, 10)      # bytes are flowing
    return cam, viewer, ra, (sa, sb), stream


@pytest.mark.parametrize("change", list(CHANGES))
def test_cut_mid_relay_ends_the_relay_and_tells_the_peer(deployment, admin, logs, change):
    deployment.enroll_pair()
    apply, code, _ = CHANGES[change]

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam, viewer, ready, socks, stream = await relaying(deployment, addr)
            ended = asyncio.create_task(fatal(cam))
            t0 = time.monotonic()
            apply(admin, "cam")
            await within(until(lambda: stream.ended_at is not None, 5), t0,
                         f"{change}: the relay cut")
            err = await within(ended, t0, f"{change}: the session cut")
            assert err.code == code
            received = stream.received
            stream.stop()
            assert received >= 1 << 20
            # the peer was told cam left, with why (and stays connected)
            await until(lambda: logs("peer-left", device="cam", peer="viewer", code=code), 2)
            await until(lambda: any("cam left rendezvous" in r.getMessage()
                                    for r in logs.caplog.records
                                    if r.name == "fastpunch.client"), 2)
            assert viewer.connected and "viewer" in server.sessions
            assert logs("relay-revoked")
            await until(lambda: not server.relay.pairs)             # released, both sides
            assert not any(server.relay.active.values())
            for s in socks:
                s.close()
            await viewer.close()
            await cam.close()

    arun(main())


def test_acl_deny_ends_what_the_pair_has_under_way_and_nothing_else(deployment, admin, logs):
    deployment.enroll_pair()
    deployment.enroll("other", "viewer")

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam, viewer, ready, socks, stream = await relaying(deployment, addr)
            other = await login(deployment, addr, "other")
            # a rendezvous under way between them too: viewer asks, cam holds the offer
            asking = asyncio.create_task(viewer.rendezvous("cam", INFO))
            await asyncio.wait_for(cam.incoming().__anext__(), 5)
            t0 = time.monotonic()
            admin.deny("cam", "viewer")
            await within(until(lambda: stream.ended_at is not None, 5), t0, "deny: relay cut")
            with pytest.raises(RendezvousRefusedError) as refused:
                await within(asking, t0, "deny: the request refused")
            assert refused.value.code == "not-authorized"
            stream.stop()
            (audit,) = logs("audit", action="acl-deny")
            assert audit["effect"] == "denied" and (audit["device"], audit["other"]) == \
                ("cam", "viewer")
            # both stay connected; the pair may not meet again; others still may
            assert cam.connected and viewer.connected and server.connected == 3
            with pytest.raises(RendezvousRefusedError) as again:
                await cam.rendezvous("viewer", INFO)
            assert again.value.code == "not-authorized"
            ra, rb, _ = await rendezvous(other, viewer, "viewer", INFO, INFO)
            assert ra.peer == "viewer"
            for s in socks:
                s.close()
            for dev in (cam, viewer, other):
                await dev.close()

    arun(main())


def test_the_watcher_acts_on_the_store_as_it_is_when_it_reads(deployment, admin, logs):
    """A session that logged in after a change (a new key, enabled again) is
    not cut for it; a change undone before the poll does nothing; what came
    before the watcher started is not replayed."""
    deployment.enroll_pair()
    admin.disable("viewer")             # before the watcher: history, not news
    admin.enable("viewer")

    async def main():
        server = deployment.server(watch_keystore=False)
        async with running(server) as addr:
            watcher = Watcher(deployment.store, server)     # polled by hand here
            key, _ = admin.rekey("cam")
            cam = await login(deployment, addr, "cam", key)     # with the new key, before the poll
            viewer = await login(deployment, addr, "viewer")
            admin.disable("viewer")
            admin.enable("viewer")
            admin.deny("cam", "viewer")
            admin.allow("cam", "viewer")
            done = [(row.action, row.device, effect) for row, effect in await watcher.poll()]
            assert done == [("rekey", "cam", "current"), ("disable", "viewer", "current"),
                            ("enable", "viewer", "none"), ("acl-deny", "cam", "allowed"),
                            ("acl-allow", "cam", "none")]
            assert await watcher.poll() == []                  # nothing new: nothing read
            await asyncio.sleep(0.1)
            assert cam.connected and viewer.connected and server.connected == 2
            # a device removed and enrolled again under its name: the old session goes
            admin.remove("viewer")
            admin.add_device("viewer", ["cam"])
            done = [(row.action, effect) for row, effect in await watcher.poll()]
            assert done == [("remove", "revoked"), ("add", "none"), ("acl-allow", "none")]
            await until(lambda: "viewer" not in server.sessions)
            assert len(logs("audit")) == 8
            await cam.close()
            await viewer.close()

    arun(main())


def test_a_failing_watcher_is_logged_and_never_stops_the_server(deployment, admin, logs,
                                                                 monkeypatch):
    deployment.enroll_pair()

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            viewer = await login(deployment, addr, "viewer")
            real_revoke = server.revoke
            calls = []

            def broken_revoke(name, code, reason):
                calls.append(name)
                if len(calls) == 1:
                    raise RuntimeError("injected")
                return real_revoke(name, code, reason)

            monkeypatch.setattr(server, "revoke", broken_revoke)
            admin.disable("cam")                     # its revoke fails: logged, not fatal
            await until(lambda: logs("audit", device="cam", effect="error"))
            assert logs("audit-watch-error", seq=admin.audit_seq())
            watcher = server._watcher
            real_version = watcher.keystore.version
            failures = iter([sqlite_error()])

            def flaky_version():
                for exc in failures:
                    raise exc
                return real_version()

            monkeypatch.setattr(watcher.keystore, "version", flaky_version)
            await until(lambda: any("database is locked" in e["reason"]
                                    for e in logs("audit-watch-error")))
            ended = asyncio.create_task(fatal(viewer))
            t0 = time.monotonic()
            admin.disable("viewer")                   # the next change still applies
            err = await within(ended, t0, "after watcher errors: session cut")
            assert err.code == "device-disabled" and calls == ["cam", "viewer"]
            await cam.close()

    arun(main())


def sqlite_error():
    import sqlite3

    return sqlite3.OperationalError("database is locked")


def test_without_the_watcher_logins_still_check_the_store(deployment, admin):
    """watch_keystore=False: nothing is cut, but a disabled device cannot log in."""
    deployment.enroll_pair()

    async def main():
        server = deployment.server(watch_keystore=False)
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            admin.disable("cam")
            await asyncio.sleep(0.6)
            assert cam.connected and server._watcher is None
            with pytest.raises(AuthenticationError) as err:
                await login(deployment, addr, "cam")          # replaces nothing: refused
            assert err.value.code == "device-disabled" and "cam" in server.sessions
            await cam.close()

    arun(main())


def test_the_cli_cuts_a_device_on_a_running_node(deployment, logs, tmp_path):
    """`fastpunch ccs devices disable` and `ccs acl deny` as processes,
    against the node's keys.db (the time counts from the command's exit)."""
    deployment.enroll_pair()
    deployment.enroll("other", "viewer")

    async def fp(*args):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastpunch", "ccs", *args, "--dir", deployment.dir,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return json.loads(out.decode().splitlines()[0]), json.loads(err.decode().splitlines()[0])

    async def main():
        server = deployment.server()
        async with running(server) as addr:
            cam = await login(deployment, addr, "cam")
            other = await login(deployment, addr, "other")
            viewer = await login(deployment, addr, "viewer")
            ended = asyncio.create_task(fatal(cam))
            out, audit = await fp("devices", "disable", "cam")
            t0 = time.monotonic()
            assert out["state"] == "disabled" and audit["event"] == "audit"
            err = await within(ended, t0, "cli disable: session cut")
            assert err.code == "device-disabled"
            asking = asyncio.create_task(other.rendezvous("viewer", INFO))
            await asyncio.wait_for(viewer.incoming().__anext__(), 5)
            out, audit = await fp("acl", "deny", "other", "viewer")
            t0 = time.monotonic()
            with pytest.raises(RendezvousRefusedError):
                await within(asking, t0, "cli deny: request refused")
            assert [e["seq"] for e in logs("audit")] == [audit["seq"] - 1, audit["seq"]]
            await other.close()
            await viewer.close()
            await cam.close()

    arun(main())


class RecordingServer:
    """What the watcher needs of a CCSServer, recording what it is asked."""
    node = "fake"

    def __init__(self) -> None:
        self.sessions: dict = {}
        self.calls: list = []

    def revoke(self, name, code, reason):
        self.calls.append(("revoke", name, code))

    async def deny(self, a, b):               # (a coroutine is awaited too)
        self.calls.append(("deny", a, b))


def test_a_watcher_whose_store_fails_at_first_starts_anyway(logs, monkeypatch):
    store = KeyStore(":memory:")
    store.add_device("cam", ["viewer"])
    store.add_device("viewer")
    real = store.version

    def broken():
        raise sqlite_error()

    monkeypatch.setattr(store, "version", broken)
    server = RecordingServer()
    watcher = Watcher(store, server)                       # does not raise: logged
    assert watcher.seq is None and logs("audit-watch-error")
    monkeypatch.setattr(store, "version", real)

    async def main():
        assert await watcher.poll() == [] and watcher.seq == store.audit_seq()   # begins now
        store.remove("cam")                # not connected here: its relays here still go
        store.deny("viewer", "other")
        store.disable("viewer")
        store.enable("viewer")             # (undone before the poll, and not connected)
        done = [(row.action, effect) for row, effect in await watcher.poll()]
        assert done == [("remove", "revoked"), ("acl-deny", "denied"),
                        ("disable", "not-connected"), ("enable", "none")]
        assert server.calls == [("revoke", "cam", "device-removed"),
                                ("deny", "viewer", "other")]

    arun(main())
    store.close()
