#!/usr/bin/env python3
"""A camera agent: serves a live MPEG-TS stream to every authorized viewer
that connects, each on its own connection (direct whenever the two networks
allow it, relayed by the CCS otherwise), encrypted end to end.

    python examples/camera.py --ccs ccs.example.com:7443 --name camera-1 \
        --key-file camera-1.json --ca ca.pem

A viewer (behind another NAT) watches with any player on stdin:

    fastpunch exec --to camera-1 ... -- ffplay -
    fastpunch recv --to camera-1 ... recording.ts

The picture is ffmpeg's test source (``--source`` takes any ffmpeg input
arguments: a V4L2 device, an RTSP URL, ...). Only the public API is used:
Device.login / accept, PeerConnection.secure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import threading

from fastpunch import Device
from fastpunch.ccs.cli import read_credentials

ENCODE = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
          "-f", "mpegts", "-"]


def log(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def serve_viewer(conn, source: list) -> None:
    """One viewer: its own encoder process, piped into its secure channel
    until the viewer hangs up."""
    secure = conn.secure()
    log("viewer", peer=conn.peer, path=conn.path, strategy=conn.strategy,
        connect_seconds=round(conn.report.seconds, 3), cipher=secure.cipher.name)
    ffmpeg = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", *source,
                               *ENCODE], stdout=subprocess.PIPE)
    sent = 0
    try:
        while chunk := ffmpeg.stdout.read1(64 * 1024):
            secure.sendall(chunk)
            sent += len(chunk)
    except (ConnectionError, OSError) as exc:       # the viewer left
        log("viewer-gone", peer=conn.peer, bytes=sent, why=str(exc))
    finally:
        ffmpeg.kill()
        ffmpeg.wait()
        secure.close()
    log("viewer-done", peer=conn.peer, bytes=sent)


async def main(args) -> None:
    _, key = read_credentials(args.key_file)
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
            viewer = threading.Thread(target=serve_viewer, args=(conn, source), daemon=True)
            viewer.start()
            viewers.append(viewer)
            served += 1
        while any(v.is_alive() for v in viewers):     # let the last viewers finish
            await asyncio.sleep(0.2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ccs", action="append", required=True, metavar="HOST:PORT")
    ap.add_argument("--name", required=True)
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--server-name")
    ap.add_argument("--nat", default="auto", help="NAT guess (auto: natcheck first)")
    ap.add_argument("--source", default="-f lavfi -i testsrc=size=640x360:rate=25",
                    help="ffmpeg input arguments")
    ap.add_argument("--max-viewers", type=int, help="stop accepting after this many")
    try:
        asyncio.run(main(ap.parse_args()))
    except KeyboardInterrupt:
        pass
