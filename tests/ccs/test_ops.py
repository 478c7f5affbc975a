"""Operating a CCS node: `ccs serve` settings (flag > environment > TOML file >
default, bad values refused by name), /healthz and /readyz, the Prometheus
exposition, certificate renewal and SIGHUP reload, the CA key kept out of the
serving directory, sd_notify, and the shipped systemd unit. Real `fastpunch`
processes and sockets on 127.0.0.1, every wait bounded."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpunch.ccs import config, metrics, pki
from fastpunch.client import Device
from fastpunch.credentials import client_context

from .conftest import arun, free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "fastpunch-ccs.service"
EXAMPLE = ROOT / "packaging" / "ccs.toml.example"


def fp(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "fastpunch", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def clean_env(**extra) -> dict:
    """This process's environment without any FASTPUNCH_CCS_* (a developer's
    shell must not change what a test sees), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


@pytest.fixture
def deploy(tmp_path):
    d = tmp_path / "ccs"
    r = fp("ccs", "init", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    return d


def enroll(deploy, tmp_path, name: str, *reach: str) -> bytes:
    creds = tmp_path / f"{name}.json"
    args = [a for other in reach for a in ("--may-reach", other)]
    r = fp("ccs", "add-device", name, *args, "--dir", str(deploy), "--key-file", str(creds))
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(json.loads(creds.read_text())["key"])


class Node:
    """A `fastpunch ccs serve` process; its log goes to a file read as it grows."""

    def __init__(self, tmp_path: Path, args, env=None, name="node") -> None:
        self.ready_path = tmp_path / f"{name}.ready.json"
        self.log_path = tmp_path / f"{name}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastpunch", "ccs", "serve", *args,
             "--ready-file", str(self.ready_path)],
            stdout=subprocess.DEVNULL, stderr=self.log_file, env=env or clean_env())
        deadline = time.monotonic() + 20
        while not self.ready_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ccs serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.ready = json.loads(self.ready_path.read_text())

    def events(self) -> list:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_event(self, kind: str, after: int = 0, seconds: float = 10) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [e for e in self.events()[after:] if e.get("event") == kind]
            if found:
                return found[0]
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {kind!r} event in {seconds} s:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture
def nodes():
    started = []

    def start(*args, **kw) -> Node:
        node = Node(*args, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def serve_args(deploy, *extra) -> list:
    return ["--dir", str(deploy), "--listen", "127.0.0.1:0", "--relay-port", "0",
            "--probe-port", "0", "--metrics", "127.0.0.1:0", *extra]


def http_get(port: int, path: str, headers: str = "") -> tuple:
    """(status, headers dict, body) of one GET on loopback, no proxies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def served_cert(port: int, ca: Path):
    """The certificate a TLS handshake with the node presents (pinned to ``ca``)."""
    from cryptography import x509

    ctx = client_context(str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def file_cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


# -- settings ----------------------------------------------------------------------------

def test_flag_beats_environment_beats_file_beats_default(deploy, tmp_path, nodes):
    """Each source wins where it should, in a running node: the file's
    listen port and heartbeat (a device is told 7), the environment's "no
    probe port" over the file's "any", the flag's node name over the
    environment's and the file's; the log names each value's source."""
    key = enroll(deploy, tmp_path, "cam")
    port = free_port()
    cfg = tmp_path / "ccs.toml"
    cfg.write_text(f'dir = "{deploy}"\nlisten = "127.0.0.1:{port}"\nrelay_port = 0\n'
                   f'probe_port = 0\nnode = "file-node"\nheartbeat = 7\n')
    env = clean_env(FASTPUNCH_CCS_PROBE_PORT="-1", FASTPUNCH_CCS_NODE="env-node",
                    FASTPUNCH_CCS_RELAY_PROT="1")
    node = nodes(tmp_path, ["--config", str(cfg), "--node", "flag-node"], env=env)
    assert node.ready["port"] == port and node.ready["relay_port"] > 0
    assert node.ready["probe_port"] == 0              # -1 from the environment: none
    assert node.ready["node"] == "flag-node"

    async def login():
        async with Device(("127.0.0.1", port), "cam", key, ca_file=str(deploy / "ca.pem"),
                          server_hostname="localhost") as dev:
            return dev.heartbeat, dev.node

    assert arun(login(), 20) == (7, "flag-node")
    settings = node.wait_event("config")["settings"]
    assert settings["listen"] == {"value": ["127.0.0.1", port], "from": f"config file {cfg}"}
    assert settings["heartbeat"]["from"] == f"config file {cfg}"
    assert settings["probe_port"] == {"value": -1,
                                      "from": "environment FASTPUNCH_CCS_PROBE_PORT"}
    assert settings["node"] == {"value": "flag-node", "from": "flag --node"}
    assert "relay_max" not in settings                    # at its default: not listed
    unknown = node.wait_event("config-unknown-variable")
    assert unknown["variable"] == "FASTPUNCH_CCS_RELAY_PROT"


def test_config_file_from_the_environment_and_precedence_in_load(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("relay_port = 1001\nrelay_max = 9\nmessages_per_second = 5\n")
    env = {"FASTPUNCH_CCS_CONFIG": str(cfg), "FASTPUNCH_CCS_RELAY_PORT": "1002",
           "FASTPUNCH_CCS_RELAY_QUOTA": ""}
    got = config.load({"relay_port": "1003"}, env)
    assert got.file == str(cfg)
    assert (got["relay_port"], got.sources["relay_port"]) == (1003, "flag --relay-port")
    assert got["relay_max"] == 9 and got.sources["relay_max"] == f"config file {cfg}"
    assert got["relay_quota"] is None                     # empty variable: unset
    assert got.budgets()["messages_per_second"] == 5.0
    assert (got["heartbeat"], got.sources["heartbeat"]) == (15, "default")
    got = config.load({}, {k: v for k, v in env.items() if k != "FASTPUNCH_CCS_CONFIG"})
    assert got["relay_port"] == 1002 and got["relay_max"] == 256 and got.file is None
    # the log's view of the settings shows no Redis password
    got = config.load({"redis": "redis://:hunter2@10.0.0.5:6379/0"}, {})
    assert got["redis"] == "redis://:hunter2@10.0.0.5:6379/0"
    assert got.shown()["redis"] == {"value": "redis://***@10.0.0.5:6379/0",
                                    "from": "flag --redis"}


TOML_FILE = "(from the file)"


@pytest.mark.parametrize("source,setting,value,expect", [
    ("flag", "listen", "127.0.0.1:99999", "flag --listen: listen = 127.0.0.1:99999: expected "
                                          "HOST:PORT with a port 0-65535"),
    ("flag", "metrics", "127.0.0.1:65536", "flag --metrics: metrics = 127.0.0.1:65536"),
    ("flag", "listen", "no-port", "expected HOST:PORT"),
    ("env", "relay_port", "70000", "environment FASTPUNCH_CCS_RELAY_PORT: relay_port = 70000: "
                                   "expected a port 0-65535 (0 = any), or -1 for none"),
    ("env", "heartbeat", "fast", "environment FASTPUNCH_CCS_HEARTBEAT: heartbeat = fast"),
    ("flag", "heartbeat", "0", "flag --heartbeat: heartbeat = 0: expected whole seconds"),
    ("flag", "rendezvous_timeout", "nan", "rendezvous_timeout = nan: expected a number of "
                                          "seconds above 0"),
    ("flag", "public_addr", "ccs.example.com", "public_addr = ccs.example.com: expected an "
                                               "IPv4 address"),
    ("flag", "redis", "http://cache:6379", "expected a redis://, rediss:// or unix:// URL"),
    ("env", "messages_per_second", "-1", "FASTPUNCH_CCS_MESSAGES_PER_SECOND: "
                                         "messages_per_second = -1: expected a number above 0"),
    ("file", "relay_port", "99999", "relay_port = 99999: expected a port 0-65535"),
    ("file", "relay_port", "true", "relay_port = true: expected a port"),
    ("file", "heartbeat", '"15"', 'heartbeat = "15": expected whole seconds'),
    ("file", "listen", "7443", "listen = 7443: expected HOST:PORT"),
    ("file", "relay_max", "{ a = 1 }", "relay_max = a TOML table: expected an integer"),
    ("file", "relay_prot", "1", "unknown setting 'relay_prot' (did you mean 'relay_port'?)"),
    ("file", "handshake_timeout", "0", "handshake_timeout = 0: expected a number of seconds"),
])
def test_a_bad_setting_is_refused_by_name_and_source(tmp_path, source, setting, value, expect):
    """Before anything starts (the --dir given does not exist, so a bad
    value let through would fail differently), with the setting and where
    it came from named, and no traceback."""
    args = ["ccs", "serve", "--dir", str(tmp_path / "none")]
    env = clean_env()
    if source == "flag":
        args += ["--" + setting.replace("_", "-"), value]
    elif source == "env":
        env["FASTPUNCH_CCS_" + setting.upper()] = value
    else:
        cfg = tmp_path / "ccs.toml"
        cfg.write_text(f"{setting} = {value}\n")
        args += ["--config", str(cfg)]
        expect = f"config file {cfg}: {expect}"
    r = fp(*args, env=env)
    assert r.returncode == 1, r.stderr
    assert expect in r.stderr
    assert "Traceback" not in r.stderr and "no deployment" not in r.stderr


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    ("listen = \n", "not valid TOML"),
    (b"\xff\xfe = 1\n", "not UTF-8 text"),
])
def test_an_unreadable_config_file_is_a_clear_error(tmp_path, content, expect):
    cfg = tmp_path / "ccs.toml"
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    elif content is not None:
        cfg.write_text(content)
    for args, env in ((["--config", str(cfg)], clean_env()),
                      ([], clean_env(FASTPUNCH_CCS_CONFIG=str(cfg)))):
        r = fp("ccs", "serve", "--dir", str(tmp_path / "none"), *args, env=env)
        assert r.returncode == 1 and f"config file {cfg}: {expect}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_without_tomllib_or_tomli_the_error_says_what_to_install(tmp_path, monkeypatch):
    cfg = tmp_path / "ccs.toml"
    cfg.write_text("heartbeat = 5\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)      # import now raises ImportError
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(config.ConfigError, match="pip install tomli"):
        config.read_file(str(cfg))


def test_every_option_of_serve_shows_its_default_and_variable():
    from fastpunch.cli import build_parser

    parser = build_parser()
    ccs = next(a for a in parser._subparsers._group_actions[0].choices["ccs"]._actions
               if a.dest == "ccs_command")
    serve = ccs.choices["serve"]
    helps = {a.dest: a.help for a in serve._actions if a.dest != "help"}
    assert set(helps) == {s.key for s in config.SETTINGS} | {"config"}
    for dest, text in helps.items():
        assert re.search(r"\(default: [^()]+\)$", text), (dest, text)
    for s in config.SETTINGS:
        assert f"[env {s.env}]" in helps[s.key], s.key
        if s.key != "node":
            assert helps[s.key].endswith(f"(default: {s.default_text})"), s.key
    assert helps["relay_port"].endswith("(default: 7444)")
    r = fp("ccs", "serve", "--help")
    assert r.returncode == 0 and "FASTPUNCH_CCS_RELAY_PORT" in r.stdout


def test_budgets_reach_the_server(deploy, tmp_path, nodes):
    """--message-burst 2 --messages-per-second 1: a device sending a burst
    of heartbeats is cut by the server's budget, so the setting reached it."""
    from fastpunch.proto import wire
    from fastpunch.proto.connection import Connection, Role, State

    key = enroll(deploy, tmp_path, "cam")
    node = nodes(tmp_path, serve_args(deploy, "--message-burst", "2",
                                      "--messages-per-second", "1"))

    async def flood():
        ctx = client_context(str(deploy / "ca.pem"))
        reader, writer = await asyncio.open_connection("127.0.0.1", node.ready["port"],
                                                       ssl=ctx, server_hostname="localhost")
        m = Connection(Role.CLIENT)
        writer.write(m.hello("cam", key, os.urandom))
        while m.state is not State.READY:
            m.receive_data(await reader.read(65536))
            while isinstance(ev := m.next_event(), wire.Message):
                if isinstance(ev, wire.Challenge):
                    writer.write(m.respond())
        for seq in range(20):
            writer.write(wire.encode(wire.Heartbeat(seq=seq)))
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
        writer.close()
        out = []
        while (msg := wire.decode_frame(buf)) is not None:
            out.append(msg)
        return out

    frames = arun(flood(), 20)
    errors = [f for f in frames if isinstance(f, wire.Error)]
    assert errors and errors[-1].code == "rate-limited", frames
    assert "(bursts of 2)" in node.wait_event("closed")["reason"]


# -- health, readiness, metrics ----------------------------------------------------------

def families(body: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_health_readiness_and_metrics_of_a_running_node(deploy, tmp_path, nodes):
    node = nodes(tmp_path, serve_args(deploy, "--node", "n1"))
    port = node.ready["metrics"]
    status, _, body = http_get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, head, body = http_get(port, "/readyz")
    assert status == 200 and head["content-type"] == "application/json"
    assert json.loads(body) == {"ready": True, "node": "n1", "checks": {
        "listener": "ok", "registry": "ok", "keystore": "ok"}}
    status, head, body = http_get(port, "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain; version=")
    got = families(body)
    for name in ("fastpunch_ccs_connected_devices", "fastpunch_ccs_auth_failures",
                 "fastpunch_ccs_protocol_errors", "fastpunch_ccs_rendezvous",
                 "fastpunch_ccs_rendezvous_seconds", "fastpunch_ccs_relay_bytes",
                 "fastpunch_ccs_relays_active", "fastpunch_ccs_relays"):
        assert name in got, name
    assert [s.labels for s in got["fastpunch_ccs_connected_devices"].samples] == [{"node": "n1"}]
    assert "process_open_fds" in got or "process_cpu_seconds" in got    # ProcessCollector
    assert "python_info" in got                                         # PlatformCollector
    status, head, body = http_get(port, "/metrics",
                                  "Accept: application/openmetrics-text; version=1.0.0\r\n")
    assert status == 200 and head["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert http_get(port, "/nothing")[0] == 404


def test_the_node_label_is_escaped(deploy, tmp_path, nodes):
    """A node name with a quote, a backslash and a newline cannot forge a
    sample: the exposition escapes it and parses back to the same name."""
    name = 'evil"} 1\nfastpunch_ccs_forged{x="\\'
    node = nodes(tmp_path, serve_args(deploy, "--node", name))
    status, _, body = http_get(node.ready["metrics"], "/metrics")
    assert status == 200
    text = body.decode()
    assert 'node="evil\\"} 1\\nfastpunch_ccs_forged{x=\\"\\\\"' in text
    assert not any(line.startswith("fastpunch_ccs_forged") for line in text.splitlines())
    got = families(body)
    assert "fastpunch_ccs_forged" not in got
    assert got["fastpunch_ccs_relays_active"].samples[0].labels == {"node": name}
    ready = json.loads(http_get(node.ready["metrics"], "/readyz")[2])
    assert ready["node"] == name


def test_metrics_without_prometheus_client_say_so(deploy, tmp_path, nodes):
    """prometheus_client not importable: /metrics is a 503 saying why, the
    node runs, /healthz and /readyz answer."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH")) if p)
    node = nodes(tmp_path, serve_args(deploy), env=clean_env(PYTHONPATH=path))
    port = node.ready["metrics"]
    status, _, body = http_get(port, "/metrics")
    assert status == 503 and b"prometheus_client is not installed" in body
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz")[0] == 200
    assert "prometheus_client" in node.wait_event("metrics-unavailable")["reason"]
    assert node.proc.poll() is None


def test_metrics_use_a_private_registry(deployment):
    import prometheus_client

    async def main():
        server = deployment.server()
        await server.start("127.0.0.1", 0, None)
        try:
            mserver = await metrics.serve(server, "127.0.0.1", 0)
            mserver.close()
        finally:
            await server.close()

    arun(main(), 20)
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("fastpunch_") for n in names)


def test_readyz_is_503_once_the_device_listener_is_down(deployment):
    async def get(port, path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def main():
        server = deployment.server()
        await server.start("127.0.0.1", 0, None)
        mserver = await metrics.serve(server, "127.0.0.1", 0)
        mport = mserver.sockets[0].getsockname()[1]
        try:
            before = await get(mport, "/readyz")
            await server.close()
            after = await get(mport, "/readyz")
            health = await get(mport, "/healthz")
        finally:
            mserver.close()
        return before, after, health

    before, after, health = arun(main(), 30)
    assert before[0] == 200
    assert after[0] == 503 and health[0] == 200
    body = json.loads(after[1])
    assert body["ready"] is False and body["checks"]["listener"].startswith("not listening")
    assert body["checks"]["keystore"] == "ok"


@pytest.mark.parametrize("fault", ["corrupt-store", "wrong-master-key"])
def test_readyz_is_503_when_the_key_store_does_not_read(tmp_path, nodes, fault):
    d = tmp_path / "ccs"
    assert fp("ccs", "init", "--dir", str(d), "--sealed").returncode == 0
    enroll(d, tmp_path, "cam")
    if fault == "wrong-master-key":
        (d / "master.key").write_text(os.urandom(32).hex() + "\n")
    node = nodes(tmp_path, serve_args(d))
    port = node.ready["metrics"]
    if fault == "corrupt-store":
        assert http_get(port, "/readyz")[0] == 200
        with open(d / "keys.db", "r+b") as f:         # the same file the node has open
            f.write(b"\0not a database, not any more" * 200)
    status, _, body = http_get(port, "/readyz")
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["listener"] == "ok" and checks["registry"] == "ok"
    want = "DatabaseError" if fault == "corrupt-store" else "does not open with this master key"
    assert want in checks["keystore"], checks
    assert http_get(port, "/healthz")[0] == 200


def test_readyz_is_503_when_redis_is_gone(deploy, tmp_path, nodes, redis_proc):
    url, redis = redis_proc
    node = nodes(tmp_path, serve_args(deploy, "--redis", url, "--node", "r1"))
    port = node.ready["metrics"]
    assert http_get(port, "/readyz")[0] == 200
    redis.kill()
    redis.wait(10)
    status, _, body = http_get(port, "/readyz")
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["registry"] != "ok" and checks["keystore"] == "ok", checks
    assert http_get(port, "/healthz")[0] == 200


# -- certificates and the CA key ---------------------------------------------------------

def test_write_sets_the_mode_of_an_existing_file_and_refuses_symlinks(tmp_path):
    old = tmp_path / "server.key"
    old.write_text("old and long " * 100)
    os.chmod(old, 0o644)
    pki._write(str(old), b"secret", 0o600)
    assert mode(old) == 0o600 and old.read_bytes() == b"secret"
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(pki.PKIError, match="symbolic link"):
        pki._write(str(link), b"secret", 0o600)
    assert target.read_text() == "untouched" and link.is_symlink()
    old_umask = os.umask(0o077)
    try:
        pki._write(str(tmp_path / "ca.pem"), b"public", 0o644)   # exact, whatever the umask
    finally:
        os.umask(old_umask)
    assert mode(tmp_path / "ca.pem") == 0o644


def test_init_over_world_readable_leftovers_makes_them_private(tmp_path):
    d = tmp_path / "ccs"
    d.mkdir()
    for name in ("ca.key", "server.key"):
        (d / name).write_text("left over")
        os.chmod(d / name, 0o666)
    pki.init(str(d))
    assert mode(d / "ca.key") == 0o600 and mode(d / "server.key") == 0o600
    assert b"PRIVATE KEY" in (d / "server.key").read_bytes()
    (d / "server.pem").unlink()
    (d / "server.pem").symlink_to(tmp_path / "planted")
    with pytest.raises(pki.PKIError, match="symbolic link"):
        pki.init(str(d))
    assert not (tmp_path / "planted").exists()


def test_init_ca_key_out_keeps_the_ca_key_out_of_the_serving_dir(tmp_path):
    d, vault = tmp_path / "ccs", tmp_path / "vault"
    vault.mkdir()
    r = fp("ccs", "init", "--dir", str(d), "--ca-key-out", str(vault / "ca.key"))
    assert r.returncode == 0, r.stderr
    assert not (d / "ca.key").exists() and mode(vault / "ca.key") == 0o600
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key((vault / "ca.key").read_bytes(), None)
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert ca_key.public_key().public_bytes(*der) == \
        file_cert(d / "ca.pem").public_key().public_bytes(*der)
    # never over an existing key, never inside the serving directory
    r = fp("ccs", "init", "--dir", str(tmp_path / "b"), "--ca-key-out", str(vault / "ca.key"))
    assert r.returncode == 1 and "exists: not overwriting it" in r.stderr
    r = fp("ccs", "init", "--dir", str(tmp_path / "c"),
           "--ca-key-out", str(tmp_path / "c" / "sub" / "ca.key"))
    assert r.returncode == 1 and "inside --dir" in r.stderr
    assert not (tmp_path / "c" / "ca.pem").exists()


def test_renew_cert_keeps_the_names_and_writes_a_private_key(deploy, tmp_path):
    vault = tmp_path / "vault"
    vault.mkdir()
    shutil.move(str(deploy / "ca.key"), str(vault / "ca.key"))
    os.chmod(deploy / "server.key", 0o644)                  # a careless copy left it so
    before = file_cert(deploy / "server.pem")
    old_key = (deploy / "server.key").read_bytes()
    r = fp("ccs", "renew-cert", "--dir", str(deploy))
    assert r.returncode == 1 and "--ca-key" in r.stderr and "Traceback" not in r.stderr
    r = fp("ccs", "renew-cert", "--dir", str(deploy), "--ca-key", str(vault / "ca.key"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    after = file_cert(deploy / "server.pem")
    assert after.serial_number != before.serial_number
    assert (deploy / "server.key").read_bytes() != old_key and mode(deploy / "server.key") == 0o600
    assert mode(deploy / "server.pem") == 0o644
    assert pki.names_of(after) == pki.names_of(before) == (["localhost"], ["127.0.0.1"])
    assert (out["names"], out["ips"]) == (["localhost"], ["127.0.0.1"])
    after.verify_directly_issued_by(file_cert(deploy / "ca.pem"))
    assert sorted(p.name for p in deploy.iterdir()) == \
        ["ca.pem", "cluster.key", "keys.db", "server.key", "server.pem"]   # no temp files
    # --ip replaces the addresses, the names stay
    r = fp("ccs", "renew-cert", "--dir", str(deploy), "--ca-key", str(vault / "ca.key"),
           "--ip", "127.0.0.1", "--ip", "192.0.2.7")
    assert r.returncode == 0, r.stderr
    assert pki.names_of(file_cert(deploy / "server.pem")) == \
        (["localhost"], ["127.0.0.1", "192.0.2.7"])


@pytest.mark.parametrize("bad,expect", [
    ("other-ca", "is not the key of"),
    ("bad-ip", "not an IP address: 'nine'"),
    ("bad-name", "not a DNS name"),
    ("garbage-key", "is not an unencrypted PEM private key"),
    ("days", "--days must be 1-3650"),
])
def test_renew_cert_refuses_bad_input(deploy, tmp_path, bad, expect):
    before = (deploy / "server.pem").read_bytes(), (deploy / "server.key").read_bytes()
    args = ["ccs", "renew-cert", "--dir", str(deploy)]
    if bad == "other-ca":
        other = pki.init(str(tmp_path / "other"))
        args += ["--ca-key", other["ca_key"]]
    elif bad == "bad-ip":
        args += ["--ip", "nine"]
    elif bad == "bad-name":
        args += ["--name", "two words"]
    elif bad == "garbage-key":
        (tmp_path / "junk.key").write_text("not a key")
        args += ["--ca-key", str(tmp_path / "junk.key")]
    else:
        args += ["--days", "0"]
    r = fp(*args)
    assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ((deploy / "server.pem").read_bytes(), (deploy / "server.key").read_bytes()) == before


def test_sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old(tmp_path, nodes):
    """A node serving a directory without ca.key; renew-cert with the CA key
    kept elsewhere, SIGHUP: new handshakes present the new certificate.
    Then a key that does not match: the reload fails, is logged, and the
    node goes on presenting the certificate it had."""
    d, vault = tmp_path / "ccs", tmp_path / "vault"
    vault.mkdir()
    assert fp("ccs", "init", "--dir", str(d), "--ca-key-out", str(vault / "ca.key")).returncode == 0
    node = nodes(tmp_path, serve_args(d))
    ca, port = d / "ca.pem", node.ready["port"]
    first = served_cert(port, ca)
    assert first.serial_number == file_cert(d / "server.pem").serial_number
    r = fp("ccs", "renew-cert", "--dir", str(d), "--ca-key", str(vault / "ca.key"))
    assert r.returncode == 0, r.stderr
    renewed = file_cert(d / "server.pem")
    assert served_cert(port, ca).serial_number == first.serial_number   # until told
    seen = len(node.events())
    node.proc.send_signal(signal.SIGHUP)
    reloaded = node.wait_event("cert-reloaded", after=seen)
    assert reloaded["serial"] == format(renewed.serial_number, "x")
    assert served_cert(port, ca).serial_number == renewed.serial_number
    # another pair's certificate beside this key: refused and logged, and the
    # renewed certificate serves on (loaded straight into the live context,
    # OpenSSL would take the certificate, drop the key that does not match
    # it, and every handshake after would fail)
    other = pki.init(str(tmp_path / "other"))
    shutil.copy(other["cert"], d / "server.pem")
    seen = len(node.events())
    node.proc.send_signal(signal.SIGHUP)
    failed = node.wait_event("cert-reload-failed", after=seen)
    assert "server.key" in failed["reason"] and "KEY_VALUES_MISMATCH" in failed["reason"]
    assert served_cert(port, ca).serial_number == renewed.serial_number
    (d / "server.pem").write_text("garbage")
    seen = len(node.events())
    node.proc.send_signal(signal.SIGHUP)
    assert "not a PEM certificate" in node.wait_event("cert-reload-failed", after=seen)["reason"]
    assert served_cert(port, ca).serial_number == renewed.serial_number
    assert node.stop() == 0
    assert "ca.key" not in node.log_path.read_text()


def test_serve_never_reads_the_ca_key(tmp_path, nodes):
    """ca.key in the serving directory made unreadable to everyone (as a
    file, even root opens it: so it is replaced by a directory) and a
    device still logs in."""
    d = tmp_path / "ccs"
    assert fp("ccs", "init", "--dir", str(d)).returncode == 0
    key = enroll(d, tmp_path, "cam")
    (d / "ca.key").unlink()
    (d / "ca.key").mkdir(mode=0)        # any open() of it as a file fails
    node = nodes(tmp_path, serve_args(d))

    async def login():
        async with Device(("127.0.0.1", node.ready["port"]), "cam", key,
                          ca_file=str(d / "ca.pem"), server_hostname="localhost") as dev:
            return dev.node

    assert arun(login(), 20) == node.ready["node"]
    os.rmdir(d / "ca.key")


def test_sd_notify_ready_once_listening_and_stopping(deploy, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        node = Node(tmp_path, serve_args(deploy), env=clean_env(NOTIFY_SOCKET=str(path)))
        try:
            ready = sock.recv(4096).decode()
            assert "READY=1" in ready and f"MAINPID={node.proc.pid}" in ready
            with socket.create_connection(("127.0.0.1", node.ready["port"]), timeout=5):
                pass                                   # listening when it said so
            node.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            # TERM again and again while it finishes (an impatient operator;
            # stop() sends one when it is still running): the clean exit stays
            # one, never a kill half way through (-15, seen once under load)
            deadline = time.monotonic() + 10
            while node.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGTERM)
                time.sleep(0.002)
        finally:
            assert node.stop() == 0


# -- the systemd unit and the example configuration ---------------------------------------

def verify_unit(text: str, tmp_path: Path, name: str = "fastpunch-ccs.service") -> list:
    """systemd-analyze verify's complaints about the unit (it exits 0 on a
    misspelt or misvalued key, so its output is read too)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / "units" / name
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(text)
    r = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if name in line]
    if r.returncode != 0 and not problems:
        problems = [f"exit {r.returncode}: {r.stderr.strip()}"]
    return problems


def with_real_binary(text: str) -> str:
    """The unit with ExecStart pointing at a binary that exists here (verify
    insists): this venv's `fastpunch` script, else its Python."""
    script = Path(sys.executable).with_name("fastpunch")
    real = str(script if script.exists() else Path(sys.executable))
    assert "/opt/fastpunch/bin/fastpunch" in text
    return text.replace("/opt/fastpunch/bin/fastpunch", real)


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path):
    text = UNIT.read_text()
    assert verify_unit(with_real_binary(text), tmp_path) == []
    # the check itself catches a bad key, a bad value and a missing binary
    broken = with_real_binary(text).replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    assert any("NoNewPrivilege" in p for p in verify_unit(broken, tmp_path))
    broken = with_real_binary(text).replace("ProtectSystem=strict", "ProtectSystem=very")
    assert verify_unit(broken, tmp_path)
    assert any("not executable" in p for p in verify_unit(text.replace(
        "/opt/fastpunch/bin/fastpunch", str(tmp_path / "missing")), tmp_path))
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                      ("StateDirectory", "fastpunch/ccs"), ("Restart", "on-failure"),
                      ("AmbientCapabilities", "CAP_NET_ADMIN"),
                      ("CapabilityBoundingSet", "CAP_NET_ADMIN"), ("Type", "notify")):
        assert service[key] == want, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("ccs serve --config /etc/fastpunch/ccs.toml")


def test_the_example_config_is_valid_and_matches_the_unit():
    got = config.read_file(str(EXAMPLE))
    assert got["dir"] == "/var/lib/" + "fastpunch/ccs"            # the unit's StateDirectory
    assert got["listen"] == ("0.0.0.0", 7443) and got["metrics"] == ("127.0.0.1", 9464)
    assert set(got) <= set(config.BY_KEY)


def test_the_operations_docs_list_every_setting():
    """docs/ccs.md's table: a row per setting with its variable and default."""
    rows = {line.split("|")[1].strip(): line for line in
            (ROOT / "docs" / "ccs.md").read_text().splitlines() if line.startswith("| `")}
    for s in config.SETTINGS:
        row = rows.get(f"`{s.key}`")
        assert row is not None, s.key
        assert f"`{s.env}`" in row and s.default_text in row, row
