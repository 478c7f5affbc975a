"""`fastpunch ccs ...` and `fastpunch device run` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from .conftest import free_port


def fp(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastpunch", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def deploy(tmp_path):
    d = tmp_path / "ccs"
    r = fp("ccs", "init", "--dir", str(d), "--sealed")
    assert r.returncode == 0, r.stderr
    return d


def test_init_creates_private_files_and_refuses_to_overwrite(deploy):
    for name in ("ca.key", "server.key", "keys.db", "master.key", "cluster.key"):
        assert mode(deploy / name) == 0o600, name
    r = fp("ccs", "init", "--dir", str(deploy))
    assert r.returncode == 1 and "already holds a deployment" in r.stderr


def test_add_device_prints_credentials_and_seals_them(deploy, tmp_path):
    r = fp("ccs", "add-device", "cam-1", "--may-reach", "viewer", "--dir", str(deploy))
    assert r.returncode == 0, r.stderr
    creds = json.loads(r.stdout)
    assert creds["name"] == "cam-1" and len(bytes.fromhex(creds["key"])) == 32
    assert bytes.fromhex(creds["key"]) not in (deploy / "keys.db").read_bytes()   # sealed
    # with a key file the credentials go there (0600), and the key not on stdout
    r = fp("ccs", "add-device", "cam-2", "--dir", str(deploy), "--key-file", str(tmp_path / "cam.key"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"name": "cam-2", "key_file": str(tmp_path / "cam.key")}
    creds = json.loads((tmp_path / "cam.key").read_text())
    assert mode(tmp_path / "cam.key") == 0o600 and creds["name"] == "cam-2"
    assert creds["key"] not in r.stdout + r.stderr
    again = fp("ccs", "add-device", "cam-1", "--dir", str(deploy))
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = fp("ccs", "add-device", "../etc", "--dir", str(deploy))
    assert bad.returncode == 1 and "device names" in bad.stderr


def test_commands_without_a_deployment_say_what_to_do(tmp_path):
    r = fp("ccs", "add-device", "cam", "--dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "fastpunch ccs init" in r.stderr


def test_serve_and_two_device_agents_rendezvous(deploy, tmp_path):
    for name, reach in (("cam", ["--may-reach", "viewer"]), ("viewer", [])):
        assert fp("ccs", "add-device", name, *reach, "--dir", str(deploy),
                  "--key-file", str(tmp_path / f"{name}.key")).returncode == 0
    ready = tmp_path / "ready.json"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fastpunch", "ccs", "serve", "--dir",
                               str(deploy), "--listen", f"127.0.0.1:{port}", "--relay-port", "0", "--probe-port", "0",
                               "--metrics", "127.0.0.1:0", "--ready-file", str(ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.05)
        common = ["--ccs", f"127.0.0.1:{port}", "--ca", str(deploy / "ca.pem"),
                  "--server-name", "localhost"]
        agent = subprocess.Popen([sys.executable, "-m", "fastpunch", "device", "run", "--name",
                                  "viewer", "--key-file", str(tmp_path / "viewer.key"),
                                  "--nat", "nat", *common], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert json.loads(agent.stdout.readline())["event"] == "connected"
        r = fp("device", "run", "--name", "cam", "--key-file", str(tmp_path / "cam.key"),
               "--rendezvous", "viewer", *common)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert lines[0]["event"] == "connected" and lines[0]["public_addr"][0] == "127.0.0.1"
        assert lines[1]["event"] == "ready" and lines[1]["peer"] == "viewer"
        assert lines[1]["nat"] == "nat" and lines[1]["key"] == "(32 bytes)"
        offer, answered = (json.loads(agent.stdout.readline()) for _ in range(2))
        assert offer == {"event": "offer", "peer": "cam"}
        assert answered["event"] == "ready" and answered["role"] == "responder"
        # both sides got the same rendezvous: one key (not shown), one plan, one start
        assert answered["peer"] == "cam" and answered["key"] == "(32 bytes)"
        assert (answered["plan"], answered["start_at"]) == (lines[1]["plan"], lines[1]["start_at"])
        # a refused rendezvous is an error exit with the reason (as cam, which is not
        # running now: a second "viewer" would fight the agent for its login)
        r = fp("device", "run", "--name", "cam", "--key-file", str(tmp_path / "cam.key"),
               "--rendezvous", "cam", *common)
        assert r.returncode == 1 and "(self)" in r.stderr
        # bad credentials: a clear error, no retry loop
        (tmp_path / "bad.key").write_text(os.urandom(32).hex())
        r = fp("device", "run", "--name", "cam", "--key-file", str(tmp_path / "bad.key"), *common)
        assert r.returncode == 1 and "auth-failed" in r.stderr
        r = fp("device", "run", "--name", "viewer", "--key-file", str(tmp_path / "cam.key"),
               *common)
        assert r.returncode == 1 and "credentials of 'cam'" in r.stderr
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        log = [json.loads(line) for line in server.stderr.read().splitlines() if line.startswith("{")]
        kinds = {e["event"] for e in log}
        assert {"listening", "online", "rendezvous", "rendezvous-refused", "auth-failed"} <= kinds
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
