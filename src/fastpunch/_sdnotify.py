"""sd_notify(3) for systemd's Type=notify services (``ccs serve``, ``agent``):
no libsystemd, one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional


def notify(state: str, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Send ``state`` ("READY=1", "STOPPING=1", "RELOADING=1"...); returns
    None when sent or not under systemd, else why it could not be."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        path = "\0" + path[1:]                # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        return str(exc)
    return None
