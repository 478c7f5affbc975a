"""The agent and `fastpunch forward` as a camera maker ships them, between two
NATed lab sites, with real unmodified clients and servers: curl fetching a
100 MiB file from `python -m http.server` byte-exact; 20 downloads over one
session, one of them stalled, the others finishing meanwhile; a real RTSP
server (gst-rtsp-server) read by ffmpeg through the forward, every frame
decoded; SIGHUP adding and removing a service without dropping the live
session; SIGTERM leaving no nftables table and no socket behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fastpunch import labdemo
from fastpunch.lab import Lab
from tests.conftest import require_root

pytestmark = pytest.mark.lab
HERE = os.path.dirname(__file__)
FP = [sys.executable, "-m", "fastpunch"]


def wait_log(path, event: str, timeout: float = 60.0, after: int = 0) -> dict:
    """The first JSON line of the log file with that event (past line ``after``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = open(path).read().splitlines()[after:]
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == event:
                return ev
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} in {path} within {timeout} s:\n"
                         + (open(path).read()[-3000:] if os.path.exists(path) else ""))


def log_lines(path) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def start_agent(lab, story, tmp_path, config: str):
    (tmp_path / "agent.toml").write_text(config)
    log = open(tmp_path / "agent.log", "w")
    proc = lab.spawn("a", FP + ["agent", "run", "--config", str(tmp_path / "agent.toml"),
                                "--name", "camera",
                                "--key-file", str(tmp_path / "camera.json"),
                                "--ccs", labdemo.CCS + ":7443", "--ca",
                                os.path.join(story.dir, "ca.pem"), "--server-name", "localhost",
                                "--status-socket", str(tmp_path / "agent.sock")],
                     stderr=log)
    wait_log(tmp_path / "agent.log", "logged-in")
    return proc


def start_forward(lab, story, tmp_path, service: str, port: int, tag: str = "fwd",
                  name: str = "viewer"):
    log = open(tmp_path / f"{tag}.log", "w")
    proc = lab.spawn("b", FP + ["forward", "--to", "camera", "--service", service,
                                "--listen", f"127.0.0.1:{port}", "--name", name,
                                "--key-file", str(tmp_path / f"{name}.json"), *story.common],
                     stderr=log)
    wait_log(tmp_path / f"{tag}.log", "listening", timeout=90)
    return proc


def agent_status(lab, tmp_path) -> dict:
    out = lab.run("a", FP + ["agent", "status", "--status-socket", str(tmp_path / "agent.sock")])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop(proc, timeout: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def tables(lab, site: str) -> str:
    return lab.run(site, ["nft", "list", "tables"]).stdout


def test_curl_through_forward_and_twenty_downloads_with_one_stalled(tmp_path):
    require_root("the agent lab tests")
    www = tmp_path / "www"
    www.mkdir()
    big = os.urandom(1 << 20) * 100                     # 100 MiB
    (www / "big.bin").write_bytes(big)
    (www / "small.bin").write_bytes(big[:8 << 20])
    with Lab(a="nat", b="nat") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        lab.spawn("a", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                        "--directory", str(www), "8080"], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        agent = start_agent(lab, story, tmp_path, '[services]\nweb = "127.0.0.1:8080"\n')
        fwd = start_forward(lab, story, tmp_path, "web", 18080)
        curl = lab.run("b", ["curl", "-sS", "-f", "-o", str(tmp_path / "got.bin"), "-w",
                             "%{size_download} %{speed_download}",
                             "http://127.0.0.1:18080/big.bin"], timeout=300)
        # 19 downloads at once and one client that sends its request and
        # then reads nothing for a while: the 19 finish meanwhile
        stalled_out: dict = {}

        def stalled_client():
            with lab.inside("b"):
                s = socket.create_connection(("127.0.0.1", 18080), timeout=120)
            with s:
                s.sendall(b"GET /small.bin HTTP/1.0\r\n\r\n")
                time.sleep(8)
                stalled_out["began"] = time.monotonic()
                data = b""
                while chunk := s.recv(1 << 20):
                    data += chunk
                stalled_out["data"] = data

        t = threading.Thread(target=stalled_client)
        t.start()
        time.sleep(0.5)
        many = lab.run("b", ["bash", "-c", " ".join(
            f"curl -sS -f -o {tmp_path}/many{i}.bin http://127.0.0.1:18080/small.bin &"
            for i in range(19)) + " wait; date +%s.%N"], timeout=300)
        many_done = time.monotonic()
        t.join(120)
        status = agent_status(lab, tmp_path)
        fwd_rc = stop(fwd)
        agent_rc = stop(agent)
        left_a, left_b = tables(lab, "a"), tables(lab, "b")
    assert curl.returncode == 0, curl.stderr
    size, speed = curl.stdout.split()
    assert int(size) == len(big)
    assert hashlib.sha256((tmp_path / "got.bin").read_bytes()).digest() == \
        hashlib.sha256(big).digest()
    assert many.returncode == 0, many.stderr
    small = hashlib.sha256(big[:8 << 20]).digest()
    for i in range(19):
        assert hashlib.sha256((tmp_path / f"many{i}.bin").read_bytes()).digest() == small, i
    assert many_done < stalled_out["began"], "the 19 waited for the stalled client"
    body = stalled_out["data"].split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).digest() == small
    [peer] = status["peers"]
    assert peer["peer"] == "viewer" and peer["path"] == "direct", status
    assert peer["streams"] >= 21                        # one session carried every client
    assert fwd_rc == 0 and agent_rc == 0
    fwd_log = open(tmp_path / "fwd.log").read()
    assert fwd_log.count('"event": "session"') == 1, fwd_log[-2000:]
    assert "fastpunch" not in left_a and "fastpunch" not in left_b, (left_a, left_b)
    assert not os.path.exists(tmp_path / "agent.sock")
    (tmp_path / "www" / "big.bin").unlink()
    (tmp_path / "got.bin").unlink()


def test_rtsp_from_a_real_server_through_forward_every_frame_decoded(tmp_path):
    require_root("the agent lab tests")
    system_python = shutil.which("python3", path="/usr/bin")
    with Lab(a="nat", b="napt-random") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        rtsp = lab.spawn("a", [system_python, os.path.join(HERE, "rtsp_server.py"), "127.0.0.1",
                               "8554"], stdout=subprocess.PIPE, text=True)
        assert rtsp.stdout.readline().strip() == "rtsp-ready"
        agent = start_agent(lab, story, tmp_path,
                            '[services]\ncamera-rtsp = "127.0.0.1:8554"\n')
        fwd = start_forward(lab, story, tmp_path, "camera-rtsp", 18554)
        out = str(tmp_path / "rtsp.mkv")
        grab = lab.run("b", [labdemo._tool("ffmpeg"), "-hide_banner", "-loglevel", "error",
                             "-rtsp_transport", "tcp", "-i", "rtsp://127.0.0.1:18554/test",
                             "-frames:v", "100", "-c", "copy", "-y", out], timeout=120)
        stop(fwd)
        stop(agent)
    assert grab.returncode == 0, grab.stderr
    info = labdemo.probe(out)
    assert info["codec"] == "h264" and info["size"] == "320x240", info
    assert info["frames"] == 100 and not info["errors"], info


def test_sighup_swaps_services_without_dropping_the_session_sigterm_cleans_up(tmp_path):
    require_root("the agent lab tests")
    www1, www2 = tmp_path / "one", tmp_path / "two"
    for d, text in ((www1, b"one\n"), (www2, b"two\n")):
        d.mkdir()
        (d / "who").write_bytes(text)
    with Lab(a="nat", b="nat") as lab:
        # one login per device name (a second one replaces the first): the
        # second viewer process has its own
        story = labdemo.Story(lab, str(tmp_path), viewers=("viewer", "viewer2"))
        story.start_ccs()
        for d, port in ((www1, 8081), (www2, 8082)):
            lab.spawn("a", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", str(d), str(port)], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        agent = start_agent(lab, story, tmp_path, '[services]\none = "127.0.0.1:8081"\n')
        fwd = start_forward(lab, story, tmp_path, "one", 18081)
        first = lab.run("b", ["curl", "-sS", "-f", "http://127.0.0.1:18081/who"])
        before = agent_status(lab, tmp_path)
        mark = log_lines(tmp_path / "agent.log")
        (tmp_path / "agent.toml").write_text('[services]\ntwo = "127.0.0.1:8082"\n')
        agent.send_signal(signal.SIGHUP)
        reloaded = wait_log(tmp_path / "agent.log", "config-reloaded", after=mark)
        # the session stays; "one" is gone for new streams, "two" is there
        gone = lab.run("b", ["curl", "-sS", "http://127.0.0.1:18081/who"])
        listed = lab.run("b", FP + ["forward", "--to", "camera", "--list", "--name", "viewer2",
                                    "--key-file", str(tmp_path / "viewer2.json"), "--quick",
                                    *story.common], timeout=90)
        fwd2 = start_forward(lab, story, tmp_path, "two", 18082, tag="fwd2", name="viewer2")
        second = lab.run("b", ["curl", "-sS", "-f", "http://127.0.0.1:18082/who"])
        after = agent_status(lab, tmp_path)
        mark = log_lines(tmp_path / "agent.log")
        (tmp_path / "agent.toml").write_text('[services]\ntwo = "127.0.0.1:notaport"\n')
        agent.send_signal(signal.SIGHUP)
        refused = wait_log(tmp_path / "agent.log", "config-reload-failed", after=mark)
        still = lab.run("b", ["curl", "-sS", "-f", "http://127.0.0.1:18082/who"])
        stop(fwd)
        stop(fwd2)
        agent_rc = stop(agent)
        left = tables(lab, "a")
        stopped = wait_log(tmp_path / "agent.log", "stopped", timeout=5)
    assert first.returncode == 0 and first.stdout == "one\n", first.stderr
    assert reloaded["changed"] == ["services"] and reloaded["services"] == ["two"]
    assert gone.returncode != 0                         # the client's connection is reset
    assert "no service 'one'" in open(tmp_path / "fwd.log").read()
    assert listed.returncode == 0 and listed.stdout.split() == ["two"], listed.stderr
    assert second.returncode == 0 and second.stdout == "two\n", second.stderr
    viewer_before = [p for p in before["peers"] if p["peer"] == "viewer"]
    assert len(viewer_before) == 1
    assert [p["since"] for p in after["peers"] if p["peer"] == "viewer"] == \
        [viewer_before[0]["since"]], "the reload dropped the first forward's session"
    assert any(p["peer"] == "viewer2" for p in after["peers"])
    assert "notaport" in refused["reason"] and still.stdout == "two\n"
    assert agent_rc == 0 and stopped["reason"] == "signal"
    assert "fastpunch" not in left, left
    assert not os.path.exists(tmp_path / "agent.sock")


def gateway_mappings(lab, host: str) -> list:
    """The port mappings the upnp gateway (miniupnpd: PCP, NAT-PMP and UPnP
    alike) holds for ``host``: its DNAT rules."""
    out = lab.run("gw-a", ["nft", "list", "ruleset"]).stdout
    return [line.strip() for line in out.splitlines() if f"dnat ip to {host}:" in line]


def test_sigterm_deletes_the_port_mappings_the_agent_asked_its_gateway_for(tmp_path):
    # behind a gateway that grants mappings, the agent's standing info holds
    # a mapped candidate; a stop must not leave that hole in the firewall
    # until its lifetime runs out
    require_root("the agent lab tests")
    with Lab(a="upnp", b="nat") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        host = lab.sites["a"].host_addr
        agent = start_agent(lab, story, tmp_path, '[services]\nweb = "127.0.0.1:8081"\n')
        deadline, held = time.monotonic() + 30, []
        while time.monotonic() < deadline and not held:
            held = gateway_mappings(lab, host)
            time.sleep(0.2)
        rc = stop(agent)
        left = gateway_mappings(lab, host)
        stopped = wait_log(tmp_path / "agent.log", "stopped", timeout=5)
    assert held, "the agent never asked the upnp gateway for a mapping"
    assert rc == 0 and stopped["reason"] == "signal"
    assert left == [], left
