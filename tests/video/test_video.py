"""End to end in the lab: live video from a camera behind one NAT to viewers
behind others, each on its own direct, encrypted connection; ffprobe decodes
every frame and the CCS carries no video byte."""

from __future__ import annotations

import json
import shutil

import pytest

from fastpunch import labdemo
from fastpunch.lab import Lab
from tests.conftest import require_root

pytestmark = pytest.mark.lab


def need_tools():
    require_root("the video tests")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install ffmpeg)")


def test_the_lab_demo_end_to_end():
    need_tools()
    lines = []
    report = labdemo.run(lines.append, seconds=4)
    assert report["path"] == "direct" and report["strategy"] == "symmetric"
    assert report["frames"] == report["frames_expected"] == 100
    assert report["decode_errors"] == [] and report["codec"] == "h264"
    assert report["bytes_through_ccs"] == 0
    assert any("decoded by ffprobe" in line for line in lines)


def test_several_viewers_each_on_its_own_direct_connection(tmp_path):
    need_tools()
    with Lab(a="nat", b="nat", c="nat-rst") as lab:
        story = labdemo.Story(lab, str(tmp_path), viewers=("phone", "laptop"))
        story.start_ccs()
        camera, _ = story.start_camera(max_viewers=2)
        procs = {}
        for site, name in (("b", "phone"), ("c", "laptop")):
            procs[name] = lab.spawn(site, story.viewer_argv(name, str(tmp_path / f"{name}.ts"), 75),
                                    stdout=-1, stderr=-1, text=True)
        summaries = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            summaries[name] = json.loads(out.strip().splitlines()[-1])
        camera.wait(30)
        carried = story.relay_bytes()
    for name, summary in summaries.items():
        assert summary["path"] == "direct", summary
        video = labdemo.probe(str(tmp_path / f"{name}.ts"))
        assert video["frames"] == 75 and video["errors"] == [], video
    assert carried == 0


def test_two_random_napts_get_the_video_through_the_relay(tmp_path):
    need_tools()
    with Lab(a="napt-random", b="napt-random") as lab:
        story = labdemo.Story(lab, str(tmp_path))
        story.start_ccs()
        camera, _ = story.start_camera()
        out = str(tmp_path / "relayed.ts")
        viewer = lab.run("b", story.viewer_argv("viewer", out, 50), timeout=120)
        assert viewer.returncode == 0, viewer.stderr
        summary = json.loads(viewer.stdout.strip().splitlines()[-1])
        camera.wait(30)
        carried = story.relay_bytes()
    assert summary["path"] == "relay"
    video = labdemo.probe(out)
    assert video["frames"] == 50 and video["errors"] == []
    assert carried >= summary["received"] > 0        # every video byte crossed the CCS
