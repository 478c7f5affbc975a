"""``fastpunch camera``: a camera that serves a live MPEG-TS stream (H.264,
encoded by ffmpeg) to every authorized viewer that connects, each on its
own connection (direct whenever the two networks allow it, relayed by the
CCS otherwise), encrypted end to end. The lab demo's camera.

    fastpunch camera --ccs ccs.example.com:7443 --name camera-1 \\
        --key-file camera-1.json --ca ca.pem

A viewer (behind another NAT) watches with any player on stdin:

    fastpunch exec --to camera-1 ... -- ffplay -
    fastpunch recv --to camera-1 ... recording.ts

The picture is ffmpeg's test source (``--source`` takes any ffmpeg input
arguments: a V4L2 device, an RTSP URL, ...). A camera that already serves
RTSP or HTTP itself needs none of this: ``fastpunch agent`` exposes its
port as it is (docs/agent.md). Built on the public API only
(``fastpunch.Device``, ``read_credentials``, ``PeerConnection.secure``), so
it doubles as the example of a program of your own: one JSON line per
event on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import threading

from fastpunch import FastpunchError, read_credentials

ENCODE = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
          "-f", "mpegts", "-"]
TEST_SOURCE = "-f lavfi -i testsrc=size=640x360:rate=25"
READ = 64 * 1024


def log(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def serve_viewer(conn, source: list, ffmpeg: str = "ffmpeg") -> int:
    """One viewer: its own encoder process, piped into its secure channel
    until the viewer hangs up. Returns the bytes sent."""
    secure = conn.secure()
    log("viewer", peer=conn.peer, path=conn.path, strategy=conn.strategy,
        connect_seconds=round(conn.report.seconds, 3), cipher=secure.cipher.name)
    encoder = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-re", *source,
                                *ENCODE], stdout=subprocess.PIPE)
    sent = 0
    try:
        while chunk := encoder.stdout.read1(READ):
            secure.sendall(chunk)
            sent += len(chunk)
    except (ConnectionError, OSError) as exc:       # the viewer left
        log("viewer-gone", peer=conn.peer, bytes=sent, why=str(exc))
    finally:
        encoder.kill()
        encoder.wait()
        secure.close()
    log("viewer-done", peer=conn.peer, bytes=sent)
    return sent


async def run(args: argparse.Namespace) -> None:
    from fastpunch import Device         # (the device API loads asyncio and the protocol)

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FastpunchError("the camera encodes with ffmpeg: apt-get install ffmpeg")
    _, key = read_credentials(args.key_file, args.name)
    source = shlex.split(args.source)
    # standing: next-connection info announced ahead, so a viewer's
    # rendezvous takes one CCS round trip
    async with Device(args.ccs, args.name, key, ca_file=args.ca,
                      server_hostname=args.server_name, nat=args.nat, standing=True) as dev:
        # ready once gathering is: natcheck's evidence (a port mapping, the
        # mapping kind) in what it announces
        nat = await dev.ready(30)
        log("camera-ready", name=args.name, public_addr=list(dev.public_addr),
            nat=(nat or {}).get("nat", args.nat))
        served, viewers = 0, []
        while args.max_viewers is None or served < args.max_viewers:
            conn = await dev.accept()                 # any device the ACL lets in
            viewer = threading.Thread(target=serve_viewer, args=(conn, source, ffmpeg),
                                      daemon=True, name=f"viewer-{conn.peer}")
            viewer.start()
            viewers.append(viewer)
            served += 1
        while any(v.is_alive() for v in viewers):     # let the last viewers finish
            await asyncio.sleep(0.2)


def cmd_camera(args: argparse.Namespace) -> int:
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass
    return 0



