"""A device without CAP_NET_RAW/CAP_NET_ADMIN (a locked-down container's
root) still connects: it says so in its next-connection info, the CCS plans
a gateway's port mapping (when one side has it), kernel simultaneous open and
the relay only, and those go direct.

(Measured before that rule existed: the privileged side's raw SYNs in slots
the other side sat out left NAT state that made the later simopen fail.)"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from fastpunch import labdemo
from fastpunch.lab import Lab
from tests.conftest import require_root

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("a,b,strategy", [
    ("nat", "nat", "simopen"),
    # a gateway's port mapping needs no privilege either, and beats a random NAPT
    ("upnp", "napt-random", "upnp")])
def test_without_privileges_the_planner_falls_back_to_simopen(tmp_path, a, b, strategy):
    require_root("a punching lab test")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (the camera agent needs it)")
    with Lab(a=a, b=b) as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        camera, _ = story.start_camera()
        viewer = lab.run("b", ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                               sys.executable, "-m", "fastpunch", "connect", "--to", "camera",
                               "--name", "viewer", "--key-file", str(tmp_path / "viewer.json"),
                               "--verbose", "--json", *story.common], timeout=90)
        camera.wait(30)
    assert viewer.returncode == 0, viewer.stderr
    summary = json.loads(viewer.stdout.strip().splitlines()[-1])
    assert (summary["path"], summary["strategy"]) == ("direct", strategy)
    assert summary["keepalive_seconds"] == 10      # the CCS's period; needs no capability
    attempts = [t["strategy"] for t in summary["report"]["attempts"]]
    assert attempts == [strategy]
