"""`fastpunch send` and `fastpunch recv` between two NATed sites: a file
crosses a direct, encrypted connection intact, and bad usage gets a clear
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
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def test_send_and_recv_a_file(tmp_path):
    require_root("the stream tool tests")
    payload = os.urandom(8 << 20)
    (tmp_path / "in.bin").write_bytes(payload)
    with Lab(a="nat", b="napt-random") as lab:
        story = labdemo.Story(lab, str(tmp_path), EXAMPLES)
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
