"""`fastpunch lab up | exec | status | down` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from fastpunch.lab.topology import lab_namespaces

pytestmark = pytest.mark.lab


def tags():
    return {name.split("-")[0] for name, _ in lab_namespaces()}


def test_up_exec_status_down(cli):
    before = tags()
    state = json.loads(cli("lab", "up", "--a", "nat", "--b", "napt-random", "--delay", "5",
                           "--json").stdout)
    assert state["sites"]["a"]["public"] == "203.0.113.10"
    assert state["sites"]["b"]["delay_ms"] == 5.0
    assert state["tag"] in tags()
    out = cli("lab", "exec", "a", "--", sys.executable, "-c",
              "import socket; s = socket.socket(); s.connect(('203.0.113.2', 9))",
              check=False)
    assert "ConnectionRefusedError" in out.stderr          # reached the relay address
    text = cli("lab", "status").stdout
    assert "site a: nat" in text and "gw-b:" in text and "public 203.0.113.20" in text
    cli("lab", "down")
    assert tags() == before


def test_down_sweeps_a_lab_whose_keeper_was_killed(cli):
    state = json.loads(cli("lab", "up", "--a", "cgn", "--json").stdout)
    os.kill(state["keeper"], signal.SIGKILL)
    time.sleep(0.2)
    assert state["tag"] in tags()                        # the crash left it behind
    out = cli("lab", "down").stdout
    assert "crashed labs" in out and state["tag"] not in tags()


def test_sigint_to_the_keeper_tears_down(cli, tmp_path):
    state = json.loads(cli("lab", "up", "--a", "open", "--json").stdout)
    os.kill(state["keeper"], signal.SIGINT)
    deadline = time.monotonic() + 30
    while state["tag"] in tags() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["tag"] not in tags()
    assert not list(tmp_path.glob("*.json"))


def test_errors_are_one_line(cli):
    proc = cli("lab", "exec", "a", "--", "true", check=False)
    assert proc.returncode == 1 and "no lab is up" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("lab", "up", check=False)
    assert proc.returncode == 1 and "give at least one site" in proc.stderr
