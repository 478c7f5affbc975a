"""The whole story in the lab: a CCS on the lab's internet, a camera behind
one NAT, a viewer behind another; the viewer connects, the two devices punch
a direct TCP connection, the camera streams live video through the secure
channel, the viewer records ten seconds of it, ffprobe decodes every frame,
and the CCS's own metrics show how many video bytes it carried (zero on a
direct path). Everything runs as separate processes, as a deployment would:
``fastpunch ccs serve``, ``fastpunch camera``, ``fastpunch exec``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

from fastpunch import _caps
from fastpunch.errors import FastpunchError

CCS = "203.0.113.1"
FPS = 25


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FastpunchError(f"the lab demo needs {name}: apt-get install ffmpeg")
    return path


def _wait_line(proc: subprocess.Popen, want: str, timeout: float) -> dict:
    """Read JSON lines from proc.stderr until one has event == want."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise FastpunchError(f"process exited before {want!r} (rc={proc.poll()})")
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == want:
            return ev
    raise FastpunchError(f"no {want!r} within {timeout:g} s")


def relay_bytes(lab, port: int = 9464) -> int:
    with lab.inside("inet"):
        s = socket.create_connection((CCS, port), timeout=5)
    with s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: ccs\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    for line in body.decode().splitlines():
        if line.startswith("fastpunch_ccs_relay_bytes_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise FastpunchError("the CCS's metrics lack fastpunch_ccs_relay_bytes_total")


class Story:
    """The demo's cast in a lab: a deployment, the CCS process in the core,
    the camera agent in site a, viewers anywhere. Used by the demo and the
    end-to-end tests; ``work`` holds keys, logs and recordings."""

    def __init__(self, lab, work: str, viewers=("viewer",)) -> None:
        self.lab, self.work = lab, work
        self.py = [sys.executable, "-m", "fastpunch"]
        self.dir = os.path.join(work, "ccs")
        cmds = [["ccs", "init", "--dir", self.dir, "--ip", CCS],
                ["ccs", "add-device", "camera", "--dir", self.dir,
                 "--key-file", os.path.join(work, "camera.json")]]
        for v in viewers:
            cmds.append(["ccs", "add-device", v, "--may-reach", "camera", "--dir", self.dir,
                         "--key-file", os.path.join(work, f"{v}.json")])
        for argv in cmds:
            subprocess.run(self.py + argv, check=True, capture_output=True, timeout=60)
        self.common = ["--ccs", f"{CCS}:7443", "--ca", os.path.join(self.dir, "ca.pem"),
                       "--server-name", "localhost"]

    def start_ccs(self) -> None:
        ready = os.path.join(self.work, "ccs-ready.json")
        with open(os.path.join(self.work, "ccs.log"), "w") as log:
            self.lab.spawn("inet", self.py + ["ccs", "serve", "--dir", self.dir, "--listen",
                                              f"{CCS}:7443", "--relay-port", "7444", "--probe-port", "7445", "--metrics",
                                              f"{CCS}:9464", "--ready-file", ready], stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            if time.monotonic() > deadline:
                raise FastpunchError("the CCS did not start (see its log)")
            time.sleep(0.05)

    def start_camera(self, max_viewers: int = 1, site: str = "a") -> tuple:
        camera = self.lab.spawn(site, self.py + ["camera", "--name", "camera",
                                       "--key-file", os.path.join(self.work, "camera.json"),
                                       "--max-viewers", str(max_viewers), *self.common],
                                stderr=subprocess.PIPE, text=True)
        return camera, _wait_line(camera, "camera-ready", 30)

    def viewer_argv(self, name: str, out: str, frames: int) -> list:
        return self.py + ["exec", "--to", "camera", "--name", name, "--key-file",
                          os.path.join(self.work, f"{name}.json"), "--json", *self.common, "--",
                          "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "-",
                          "-frames:v", str(frames), "-c", "copy", "-y", out]

    def relay_bytes(self) -> int:
        return relay_bytes(self.lab)


def probe(path: str) -> dict:
    """ffprobe decodes every frame: frame count, codec, size, and any error."""
    out = subprocess.run([_tool("ffprobe"), "-v", "error", "-count_frames", "-select_streams",
                          "v:0", "-show_entries", "stream=codec_name,width,height,nb_read_frames",
                          "-of", "json", path], capture_output=True, text=True, timeout=60)
    streams = json.loads(out.stdout or "{}").get("streams") or [{}]
    s = streams[0]
    return {"frames": int(s.get("nb_read_frames", 0)), "codec": s.get("codec_name"),
            "size": f"{s.get('width')}x{s.get('height')}",
            "errors": out.stderr.strip().splitlines()}


def run(echo: Callable[[str], None] = print, *, a: str = "nat", b: str = "nat",
        seconds: int = 10) -> dict:
    from fastpunch.lab import Lab

    _caps.require("the lab demo (namespaces, raw sockets, nftables, TCP_REPAIR)",
                  _caps.CAP_SYS_ADMIN, _caps.CAP_NET_ADMIN, _caps.CAP_NET_RAW)
    _tool("ffprobe")
    _tool("ffmpeg")
    work = tempfile.mkdtemp(prefix="fastpunch-demo-")
    out = os.path.join(work, "received.ts")
    try:
        with Lab(a=a, b=b) as lab:
            echo(f"lab: camera behind {a} ({lab.sites['a'].host_addr} -> "
                 f"{lab.sites['a'].public_addr}), viewer behind {b} "
                 f"({lab.sites['b'].host_addr} -> {lab.sites['b'].public_addr}), CCS {CCS}")
            story = Story(lab, work)
            story.start_ccs()
            echo(f"ccs: listening on {CCS}:7443 (relay 7444, probes 7444 and 7445, metrics 9464)")
            camera, cam_ready = story.start_camera()
            echo(f"camera: logged in, the CCS sees it at {cam_ready['public_addr']}")
            frames = seconds * FPS
            echo(f"viewer: connecting to the camera and recording {seconds} s ({frames} frames)")
            viewer = lab.run("b", story.viewer_argv("viewer", out, frames), timeout=seconds + 90)
            if viewer.returncode != 0:
                raise FastpunchError(f"the viewer failed: {viewer.stderr.strip()[-500:]}")
            summary = json.loads(viewer.stdout.strip().splitlines()[-1])
            viewer_cam = _wait_line(camera, "viewer", 10)
            camera.wait(30)
            carried = story.relay_bytes()
        video = probe(out)
        report = {
            "camera": f"behind {a}", "viewer": f"behind {b}",
            "path": summary["path"], "strategy": summary["strategy"],
            "connect_seconds": summary["connect_seconds"], "cipher": viewer_cam["cipher"],
            "video_bytes": summary["received"],
            "video_MB_per_s": round(summary["received"] / max(summary["seconds"], 1e-9) / 1e6, 3),
            "frames": video["frames"], "frames_expected": frames, "codec": video["codec"],
            "size": video["size"], "decode_errors": video["errors"],
            "bytes_through_ccs": carried,
        }
        for line in summary_lines(report, frames):
            echo(line)
        if report["frames"] != frames or report["decode_errors"]:
            raise FastpunchError(f"the received video is not intact: {report}")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary_lines(report: dict, frames: int) -> list:
    """What the demo prints of its report. The video's rate is the
    stream's own (the camera sends in real time), not what the path can
    carry; a relayed connection says so instead of "relay via relay"."""
    how = "through the CCS relay" if report["path"] == "relay" else \
        f"directly, by {report['strategy']}"
    mbit = report["video_MB_per_s"] * 8
    return [
        f"connected {how} in {report['connect_seconds'] * 1000:.0f} ms "
        f"(encrypted, {report['cipher']})",
        f"video: {report['frames']}/{frames} frames of {report['codec']} {report['size']} "
        f"decoded by ffprobe, {len(report['decode_errors'])} errors; "
        f"{report['video_bytes'] / 1e6:.2f} MB, the stream's bitrate {mbit:.2f} Mbit/s "
        f"(real time, not the path's capacity)",
        f"bytes of video through the CCS: {report['bytes_through_ccs']}",
    ]
