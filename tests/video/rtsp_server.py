"""A real RTSP server (GStreamer's gst-rtsp-server) for the agent's lab
tests: H.264 test video at rtsp://HOST:PORT/test. Run by the system python
(it needs python3-gi), as its own process: ``rtsp_server.py HOST PORT``;
prints "rtsp-ready" once it listens."""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    host, port = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(host)
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,"
                       "height=240,framerate=25/1 ! x264enc tune=zerolatency key-int-max=25 "
                       "speed-preset=ultrafast ! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory("/test", factory)
    if server.attach(None) == 0:
        print("rtsp-failed", flush=True)
        sys.exit(1)
    print("rtsp-ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
