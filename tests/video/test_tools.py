"""`fastpunch send` and `fastpunch recv` between two NATed sites: a file
crosses a direct, encrypted connection intact, a relay-first session moves
to direct and says so in its path history, and bad usage gets a clear
error."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from fastpunch import labdemo
from fastpunch.lab import Lab
from tests.conftest import require_root

pytestmark = pytest.mark.lab


def test_send_and_recv_a_file(tmp_path):
    require_root("the stream tool tests")
    payload = os.urandom(8 << 20)
    (tmp_path / "in.bin").write_bytes(payload)
    with Lab(a="nat", b="napt-random") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        fp = [sys.executable, "-m", "fastpunch"]
        recv = lab.spawn("a", fp + ["recv", "--from", "viewer", "--name", "camera", "--key-file",
                                    str(tmp_path / "camera.json"), "--json", *story.common,
                                    str(tmp_path / "out.bin")], stdout=-1, stderr=-1, text=True)
        send = lab.run("b", fp + ["send", "--to", "camera", "--name", "viewer", "--key-file",
                                  str(tmp_path / "viewer.json"), "--json", *story.common,
                                  str(tmp_path / "in.bin")], timeout=90)
        out, err = recv.communicate(timeout=60)
        bad = lab.run("b", fp + ["exec", "--to", "camera", "--name", "viewer", "--key-file",
                                 str(tmp_path / "viewer.json"), *story.common])
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, err
    sent, got = json.loads(send.stdout), json.loads(out)
    assert sent["path"] == got["path"] == "direct" and sent["strategy"] == "spray"
    assert sent["sent"] == got["received"] == len(payload)
    digest = hashlib.sha256((tmp_path / "out.bin").read_bytes()).digest()
    assert digest == hashlib.sha256(payload).digest()
    assert bad.returncode != 0 and "exec needs a command" in bad.stderr


def test_a_relay_first_session_sends_a_file_and_reports_its_path_history(tmp_path):
    require_root("the stream tool tests")
    payload = os.urandom(32 << 20)
    (tmp_path / "in.bin").write_bytes(payload)
    with Lab(a="nat", b="nat") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        fp = [sys.executable, "-m", "fastpunch"]
        recv = lab.spawn("a", fp + ["recv", "--from", "viewer", "--name", "camera", "--key-file",
                                    str(tmp_path / "camera.json"), "--json", "--session",
                                    *story.common, str(tmp_path / "out.bin")],
                         stdout=-1, stderr=-1, text=True)
        send = lab.run("b", fp + ["send", "--to", "camera", "--name", "viewer", "--key-file",
                                  str(tmp_path / "viewer.json"), "--relay-first", "--verbose",
                                  *story.common, str(tmp_path / "in.bin")], timeout=90)
        out, err = recv.communicate(timeout=60)
        wrong = lab.run("a", fp + ["recv", "--from", "viewer", "--name", "camera", "--key-file",
                                   str(tmp_path / "camera.json"), "--relay-first", "--quick",
                                   *story.common, str(tmp_path / "x.bin")], timeout=30)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, err
    got = json.loads(out)
    sent = json.loads(send.stderr.strip().splitlines()[-1])     # without --json: on stderr
    assert sent["sent"] == got["received"] == len(payload)
    digest = hashlib.sha256((tmp_path / "out.bin").read_bytes()).digest()
    assert digest == hashlib.sha256(payload).digest()
    # started on the relay, now direct, and the history says how
    assert sent["path"] == got["path"] == "relay"
    assert sent["path_now"] == got["path_now"] == "direct", (sent, got)
    whats = [e["what"] for e in sent["path_history"]]
    assert whats[:3] == ["established", "lost", "resume"], sent["path_history"]
    assert "session path history:" in send.stderr
    assert any("resume" in line and "direct" in line for line in send.stderr.splitlines())
    assert wrong.returncode != 0 and "--relay-first is for the connecting side" in wrong.stderr


# The viewer's child: writes a pattern while it reads the echo back (a
# thread each way), exits 0 only if every byte came back in order.
ECHO_CHECK = """
import hashlib, os, sys, threading
N = 16 << 20
block = hashlib.sha256(b"fastpunch").digest() * 32768
def write():
    out = sys.stdout.buffer
    for off in range(0, N, len(block)):
        out.write(block[:min(len(block), N - off)])
    out.flush()
    os.close(1)          # (sys.stdout's close leaves fd 1 open: no EOF for the peer)
t = threading.Thread(target=write)
t.start()
h, n = hashlib.sha256(), 0
while data := sys.stdin.buffer.read1(1 << 20):
    h.update(data)
    n += len(data)
t.join()
want = hashlib.sha256((block * (N // len(block) + 1))[:N]).digest()
sys.stderr.write(f"echoed {n}\\n")
sys.exit(0 if n == N and h.digest() == want else 1)
"""


def test_exec_with_a_session_echoes_through_cat_across_a_path_move(tmp_path):
    """`exec --session` both ways at once, through a relay-first session
    that moves to the direct path mid-stream: one thread carries the child's
    pipes and the session (records and ACKs in order), every byte echoed."""
    require_root("the stream tool tests")
    with Lab(a="nat", b="nat") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        fp = [sys.executable, "-m", "fastpunch"]
        echo = lab.spawn("a", fp + ["exec", "--from", "viewer", "--name", "camera", "--key-file",
                                    str(tmp_path / "camera.json"), "--json", "--session",
                                    *story.common, "--", "cat"], stdout=-1, stderr=-1, text=True)
        check = lab.run("b", fp + ["exec", "--to", "camera", "--name", "viewer", "--key-file",
                                   str(tmp_path / "viewer.json"), "--relay-first", "--json",
                                   *story.common, "--", sys.executable, "-c", ECHO_CHECK],
                        timeout=120)
        out, err = echo.communicate(timeout=60)
    assert check.returncode == 0, check.stderr
    assert echo.returncode == 0, err
    assert f"echoed {16 << 20}" in check.stderr
    mine = json.loads(check.stdout.strip().splitlines()[-1])
    theirs = json.loads(out.strip().splitlines()[-1])
    assert mine["exit_code"] == 0 and theirs["exit_code"] == 0
    assert mine["sent"] == mine["received"] == theirs["sent"] == theirs["received"] == 16 << 20
    assert mine["path"] == "relay" and mine["path_now"] == "direct", mine
    assert [e["what"] for e in mine["path_history"]][:3] == ["established", "lost", "resume"]
