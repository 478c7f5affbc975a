"""The device agent and `forward` end to end on loopback: a real CCS, two real
devices (the relay path: both sit on this host), a real local TCP service
behind the agent, real TCP clients on the forwarded port. Many clients share
one session; a stalled client does not slow the others; refusals say why;
a reload adds and removes services without touching live streams; the
status socket tells what runs; stopping leaves nothing behind."""

from __future__ import annotations

import asyncio
import configparser
import hashlib
import json
import os
import socket
import subprocess
import time
import sys
from pathlib import Path

import pytest

from fastpunch.agent import Agent, ForwardError, Forwarder
from fastpunch.agent import config as agent_config
from fastpunch.agent.service import read_status

from .conftest import arun, running

RELAY = ["relay"]


class Blob:
    """A local service: sends ``size`` bytes of a pattern to each client
    (``GET`` first if asked), or echoes with ``echo``; counts its clients."""

    def __init__(self, size: int = 0, echo: bool = False) -> None:
        self.size, self.echo = size, echo
        self.clients = 0
        self.server = None

    def payload(self) -> bytes:
        return hashlib.sha256(b"blob").digest() * (self.size // 32 + 1)

    async def handle(self, reader, writer) -> None:
        self.clients += 1
        try:
            if self.echo:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            else:
                await reader.readline()
                writer.write(self.payload()[:self.size])
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]


def creds(tmp_path, deployment, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "key": deployment.keys[name].hex()}))
    return str(path)


def agent_cfg(tmp_path, deployment, addr, services: str, **more) -> agent_config.AgentConfig:
    flags = {"ccs": f"{addr[0]}:{addr[1]}", "name": "cam",
             "key_file": creds(tmp_path, deployment, "cam"), "ca": deployment.ca,
             "server_name": "localhost", "services": services, "strategies": "relay",
             "status_socket": str(tmp_path / "agent.sock"), **more}
    return agent_config.load(flags, {})


def enroll(deployment) -> None:
    deployment.enroll("cam", "viewer", "other")
    deployment.enroll("viewer", "cam")
    deployment.enroll("other", "cam")


async def fetch(port: int, want: int, *, stall: float = 0.0, began=None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET\n")
    await writer.drain()
    if stall:
        await asyncio.sleep(stall)
    if began is not None:
        began.append(time.monotonic())          # when this client starts reading
    data = bytearray()
    while len(data) < want + 1:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        data += chunk
    writer.close()
    return bytes(data)


async def forwarder(deployment, addr, service: str, name: str = "viewer"):
    dev = deployment.device(addr, name)
    await dev.login()
    fw = Forwarder(dev, "cam", service, strategies=RELAY, connect_timeout=30)
    return dev, fw


def test_many_clients_share_one_session_and_a_stalled_one_slows_no_other(deployment, tmp_path):
    enroll(deployment)
    size = 8 << 20

    async def main():
        blob = Blob(size)
        port = await blob.start()
        async with running(deployment.server()) as addr:
            agent = Agent(agent_cfg(tmp_path, deployment, addr, f"files=127.0.0.1:{port}"))
            await agent.start()
            dev, fw = await forwarder(deployment, addr, "files")
            try:
                assert await fw.list_services() == ["files"]
                _, local = await fw.serve("127.0.0.1", 0)
                # one client that takes nothing for a while, 8 that read at once
                stalled_began: list = []
                stalled = asyncio.ensure_future(fetch(local, size, stall=4.0,
                                                      began=stalled_began))
                fast = await asyncio.gather(*(fetch(local, size) for _ in range(8)))
                fast_done = time.monotonic()
                assert not stalled.done()          # still stalled: the others did not wait
                slow = await stalled
                fast_first = fast_done < stalled_began[0]
                status = await asyncio.get_running_loop().run_in_executor(
                    None, read_status, str(tmp_path / "agent.sock"))
            finally:
                await fw.close()
                await dev.close()
                await agent.stop()
            blob.server.close()
        return blob, port, fw, fast, fast_first, slow, status

    blob, port, fw, fast, fast_first, slow, status = arun(main(), 180)
    want = blob.payload()[:size]
    assert all(f == want for f in fast) and slow == want
    assert fast_first, "the 8 waited for the stalled client"   # done before it read a byte
    assert fw.sessions == 1 and fw.clients == 9        # one punch served every client
    assert blob.clients == 9
    assert status["name"] == "cam" and status["ccs"]["connected"]
    assert status["services"] == {"files": {"target": f"127.0.0.1:{port}"}}
    [peer] = status["peers"]
    assert peer["peer"] == "viewer" and peer["path"] == "relay" and peer["streams"] >= 9
    assert not os.path.exists(tmp_path / "agent.sock")   # stop() removed it


def test_refusals_say_why(deployment, tmp_path):
    enroll(deployment)

    async def main():
        blob = Blob(echo=True)
        port = await blob.start()
        with socket.socket() as s:                         # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        toml = tmp_path / "agent.toml"
        toml.write_text(f'[services]\necho = "127.0.0.1:{port}"\n'
                        f'private = {{ target = "127.0.0.1:{port}", peers = ["other"] }}\n'
                        f'gone = "127.0.0.1:{dead}"\n')
        async with running(deployment.server()) as addr:
            cfg = agent_cfg(tmp_path, deployment, addr, None, config=str(toml))
            agent = Agent(cfg)
            await agent.start()
            errors = {}
            dev, fw = await forwarder(deployment, addr, "echo")
            try:
                offered = await fw.list_services()
                for name in ("nothing", "private", "gone"):
                    fw.service = name
                    try:
                        await fw.open()
                    except ForwardError as exc:
                        errors[name] = (exc.reason, str(exc))
                fw.service = "echo"
                stream = await fw.open()
                await stream.write(b"still works")
                echoed = await stream.readexactly(11)
                stream.close()
            finally:
                await fw.close()
                await dev.close()
                await agent.stop()
            blob.server.close()
        return offered, errors, echoed

    offered, errors, echoed = arun(main(), 120)
    assert offered == ["echo", "gone"]                     # private is not offered to viewer
    assert errors["nothing"][0] == "no-such-service"
    assert "exposes no service 'nothing'" in errors["nothing"][1]
    assert errors["private"][0] == "not-allowed"
    assert errors["gone"][0] == "connect-failed"
    assert echoed == b"still works"                        # refusals cost the session nothing


def test_reload_adds_and_removes_services_and_live_streams_go_on(deployment, tmp_path):
    enroll(deployment)

    async def main():
        a, b = Blob(echo=True), Blob(echo=True)
        pa, pb = await a.start(), await b.start()
        async with running(deployment.server()) as addr:
            agent = Agent(agent_cfg(tmp_path, deployment, addr, f"one=127.0.0.1:{pa}"))
            await agent.start()
            dev, fw = await forwarder(deployment, addr, "one")
            try:
                live = await fw.open()
                await live.write(b"before")
                assert await live.readexactly(6) == b"before"
                later = agent.reload(agent_cfg(tmp_path, deployment, addr,
                                               f"two=127.0.0.1:{pb}", name="cam",
                                               max_streams="8"))
                await live.write(b"after")                 # the removed service's stream
                after = await live.readexactly(5)
                offered = await fw.list_services()
                fw.service = "one"
                try:
                    await fw.open()
                    gone = None
                except ForwardError as exc:
                    gone = exc.reason
                fw.service = "two"
                new = await fw.open()
                await new.write(b"new")
                got_new = await new.readexactly(3)
                needs_restart = agent.reload(agent_cfg(tmp_path, deployment, addr,
                                                       f"two=127.0.0.1:{pb}", nat="nat"))
                live.close()
                new.close()
            finally:
                await fw.close()
                await dev.close()
                await agent.stop()
            a.server.close()
            b.server.close()
        return later, after, offered, gone, got_new, fw.sessions, needs_restart, agent

    later, after, offered, gone, got_new, sessions, needs_restart, agent = arun(main(), 120)
    assert later == set()
    assert after == b"after" and offered == ["two"] and gone == "no-such-service"
    assert got_new == b"new" and sessions == 1              # the reload dropped no session
    assert needs_restart == {"nat"} and agent.config["nat"] == "auto"


def test_stop_tells_the_forwarder_and_leaves_nothing(deployment, tmp_path):
    enroll(deployment)

    async def main():
        blob = Blob(echo=True)
        port = await blob.start()
        async with running(deployment.server()) as addr:
            agent = Agent(agent_cfg(tmp_path, deployment, addr, f"echo=127.0.0.1:{port}"))
            await agent.start()
            dev, fw = await forwarder(deployment, addr, "echo")
            try:
                stream = await fw.open()
                await stream.write(b"x")
                await stream.readexactly(1)
                session = await fw.session()
                await agent.stop()
                await asyncio.wait_for(session.wait_closed(), 10)
                try:
                    await stream.read()
                    ended = "clean"
                except ConnectionResetError as exc:
                    ended = getattr(exc, "reason", "")
                try:
                    await asyncio.wait_for(fw.open(), 3)
                    reopened = True
                except (ForwardError, asyncio.TimeoutError, OSError):
                    reopened = False               # (the CCS holds it for cam to come back)
            finally:
                await fw.close()
                await dev.close()
            blob.server.close()
        return ended, reopened

    ended, reopened = arun(main(), 120)
    assert ended == "session-lost"
    assert not reopened                                    # nobody serves cam any more
    assert not os.path.exists(tmp_path / "agent.sock")


def test_bad_configurations_are_named(tmp_path):
    with pytest.raises(agent_config.ConfigError) as err:
        agent_config.load({"ccs": "127.0.0.1:7443", "name": "cam", "key_file": "k"}, {})
    assert err.value.setting == "ca" and "--ca" in str(err.value)
    base = {"ccs": "127.0.0.1:7443", "name": "cam", "key_file": "k", "ca": "c"}
    for services, words in [("web", "NAME=HOST:PORT"), ("web=127.0.0.1", "HOST:PORT"),
                            ("web=127.0.0.1:0", "a port 1-65535"),
                            ("bad name=127.0.0.1:80", "service names"),
                            ("?services=127.0.0.1:80", "service names"),
                            ("a=127.0.0.1:1,a=127.0.0.1:2", "each service once")]:
        with pytest.raises(agent_config.ConfigError) as err:
            agent_config.load({**base, "services": services}, {})
        assert err.value.setting == "services" and words in str(err.value), str(err.value)
    toml = tmp_path / "a.toml"
    toml.write_text('[services]\nweb = { target = "127.0.0.1:80", peer = ["x"] }\n')
    with pytest.raises(agent_config.ConfigError) as err:
        agent_config.load({**base, "config": str(toml)}, {})
    assert "unknown: peer" in str(err.value)
    toml.write_text('servics = {}\n')
    with pytest.raises(agent_config.ConfigError) as err:
        agent_config.load({**base, "config": str(toml)}, {})
    assert "did you mean 'services'" in str(err.value)
    with pytest.raises(agent_config.ConfigError) as err:
        agent_config.load({**base, "strategies": "teleport"}, {})
    assert err.value.setting == "strategies"
    got = agent_config.load(base, {"FASTPUNCH_AGENT_SERVICES": "web=127.0.0.1:80",
                                   "FASTPUNCH_AGENT_PEERS": "viewer"})
    assert got.services["web"].port == 80 and got["peers"] == ("viewer",)
    assert got.sources["services"] == "environment FASTPUNCH_AGENT_SERVICES"
    assert got.allows(got.services["web"], "viewer") and not got.allows(got.services["web"], "x")
    # concurrent punches: 2 unless told, 1-64
    assert got["punches"] == 2
    assert agent_config.load({**base, "punches": "8"}, {})["punches"] == 8
    for bad in ("0", "65", "two"):
        with pytest.raises(agent_config.ConfigError) as err:
            agent_config.load({**base, "punches": bad}, {})
        assert err.value.setting == "punches"


def test_a_second_agent_does_not_take_a_live_status_socket(tmp_path):
    from fastpunch.agent.service import _serve_status
    from fastpunch.errors import FastpunchError

    async def main():
        path = str(tmp_path / "s" / "agent.sock")
        first = await _serve_status(path, lambda: {"ok": 1})
        mode = os.stat(path).st_mode & 0o777
        try:
            await _serve_status(path, lambda: {})
        except FastpunchError as exc:
            taken = str(exc)
        else:
            taken = ""
        answer = await asyncio.get_running_loop().run_in_executor(None, read_status, path)
        first[0].close()
        await first[0].wait_closed()
        # the first one died without cleaning up: a stale socket is replaced
        again = await _serve_status(path, lambda: {"ok": 2})
        answer2 = await asyncio.get_running_loop().run_in_executor(None, read_status, path)
        again[0].close()
        os.unlink(path)
        return mode, taken, answer, answer2

    mode, taken, answer, answer2 = arun(main(), 30)
    assert mode == 0o600
    assert "another agent is running there" in taken
    assert answer == {"ok": 1} and answer2 == {"ok": 2}
    with pytest.raises(Exception) as err:
        read_status(str(tmp_path / "nothing.sock"))
    assert "is the agent running" in str(err.value)


# -- installing it as a service -------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_the_agent_unit_verifies_and_is_hardened(tmp_path):
    from .test_ops import verify_unit, with_real_binary

    text = (ROOT / "packaging" / "systemd" / "fastpunch-agent.service").read_text()
    assert verify_unit(with_real_binary(text), tmp_path, "fastpunch-agent.service") == []
    broken = with_real_binary(text).replace("Type=notify", "Type=notfy")
    assert verify_unit(broken, tmp_path, "fastpunch-agent.service")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                      ("Type", "notify"), ("RuntimeDirectory", "fastpunch"),
                      ("AmbientCapabilities", "CAP_NET_RAW CAP_NET_ADMIN"),
                      ("CapabilityBoundingSet", "CAP_NET_RAW CAP_NET_ADMIN")):
        assert service[key] == want, key
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("agent run --config /etc/fastpunch/agent.toml")
    # the status socket the unit's RuntimeDirectory holds is the agent's default one
    assert agent_config.DEFAULT_STATUS_SOCKET == "/run/fastpunch/agent.sock"


def test_the_openwrt_init_script_is_valid_shell_and_uses_procd():
    path = ROOT / "packaging" / "openwrt" / "fastpunch-agent.init"
    assert os.access(path, os.X_OK)
    r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common") and "USE_PROCD=1" in text
    assert "agent run --config" in text and "procd_set_param respawn" in text
    assert "procd_send_signal fastpunch-agent '*' HUP" in text


def test_the_example_agent_config_loads(tmp_path):
    example = ROOT / "packaging" / "agent.toml.example"
    cfg = agent_config.load({"config": str(example)}, {})
    assert cfg["name"] == "camera-1" and len(cfg["ccs"]) == 2
    assert cfg.services["camera-rtsp"].port == 554
    assert cfg.services["web"].peers == ("installer-laptop",)
    assert cfg.offered_to("installer-laptop") == ["camera-rtsp", "web"]
    assert cfg.offered_to("nvr-1") == ["camera-rtsp"]
    # every commented optional setting is a real one, at the top level
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line
                            for line in example.read_text().splitlines())
    (tmp_path / "all.toml").write_text(uncommented)
    full = agent_config.load({"config": str(tmp_path / "all.toml")}, {})
    assert full["peers"] == ("nvr-1", "viewer-app") and full["max_streams"] == 64


def test_the_agent_docs_list_every_setting():
    rows = {line.split("|")[1].strip(): line for line in
            (ROOT / "docs" / "agent.md").read_text().splitlines() if line.startswith("| `")}
    for s in agent_config.SETTINGS:
        row = rows.get(f"`{s.key}`")
        assert row is not None, s.key
        assert f"`{s.env}`" in row and s.default_text in row, row


def test_a_misspelt_agent_variable_is_reported_not_silently_ignored(tmp_path):
    env = {"FASTPUNCH_AGENT_SERVICS": "web=127.0.0.1:80", "FASTPUNCH_AGENT_PEERS": "viewer",
           "FASTPUNCH_AGENT_CONFIG": "", "FASTPUNCH_CCS_PORT": "1", "PATH": "/usr/bin"}
    assert agent_config.unknown_environment(env) == ["FASTPUNCH_AGENT_SERVICS"]
    # and the agent says so when it starts (its login to a closed loopback
    # port then fails: the run ends with the reason, after the warning)
    key = tmp_path / "cam.json"
    key.write_text(json.dumps({"name": "cam", "key": "00" * 32}))
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    r = subprocess.run([sys.executable, "-m", "fastpunch", "agent", "run", "--ccs",
                        "127.0.0.1:1", "--name", "cam", "--key-file", str(key), "--ca", str(ca),
                        "--status-socket", ""],
                       env={**os.environ, "FASTPUNCH_AGENT_SERVICS": "web=127.0.0.1:80"},
                       capture_output=True, text=True, timeout=60)
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    unknown = [e for e in events if e.get("event") == "config-unknown-variable"]
    assert unknown and unknown[0]["variable"] == "FASTPUNCH_AGENT_SERVICS", r.stderr
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


def test_a_misspelt_required_variable_is_named_in_the_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastpunch", "agent", "run", "--ccs",
                        "127.0.0.1:1", "--name", "cam", "--ca", "ca.pem", "--status-socket", ""],
                       env={**os.environ, "FASTPUNCH_AGENT_KEY_FIEL": "cam.json"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "key_file is required" in r.stderr and "FASTPUNCH_AGENT_KEY_FIEL" in r.stderr, r.stderr
