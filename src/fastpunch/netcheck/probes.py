"""The CCS's two address probes, from the device's side (the server side is
in ``fastpunch.ccs.relay``; the wire form is documented there):

* ``whoami``: the address and port the CCS saw for a fresh TCP connection
  from a given local port (what STUN does for UDP): a server-reflexive
  candidate when the port is the one a punch will use;
* ``filtering``: how our gateway treats an unsolicited SYN, from another
  port of the CCS's address, to the mapping a connection of ours just
  opened: "open", "drop", "rst", or "unknown".
"""

from __future__ import annotations

import asyncio
import socket

from fastpunch.errors import FastpunchError
from fastpunch.proto.kinds import Filtering, parse
from fastpunch.proto.probe import FILTERING, PAD, VERDICT_BYTES, WHOAMI

__all__ = ["ProbeError", "whoami", "filtering"]

TIMEOUT = 5.0


class ProbeError(FastpunchError):
    """A probe got no proper answer; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


def _socket(local_port: int = 0, reuseport: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: the punch's own port, probed just before the punch
        # (and handed to a repaired socket after it)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setblocking(False)
        s.bind(("0.0.0.0", local_port))
    except BaseException:
        s.close()
        raise
    return s


async def whoami(ccs_ip: str, probe_port: int, local_port: int = 0,
                 timeout: float = TIMEOUT) -> tuple:
    """(address, port) the CCS saw for a connection from ``local_port`` (0:
    any) to its probe port. The CCS closes first, so our side of the
    4-tuple leaves no TIME_WAIT behind (the gateway's entry for it stays,
    keeping the mapping warm for the punch that follows)."""
    loop = asyncio.get_running_loop()
    sock = _socket(local_port)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ccs_ip, probe_port)), timeout)
        await loop.sock_sendall(sock, WHOAMI + bytes(PAD))
        data = b""
        while len(data) < 6:
            part = await asyncio.wait_for(loop.sock_recv(sock, 6 - len(data)), timeout)
            if not part:
                raise ProbeError("bad-probe", "the CCS closed the probe early")
            data += part
        await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)     # its FIN first
    except asyncio.TimeoutError:
        raise ProbeError("probe-timeout", f"no answer from {ccs_ip}:{probe_port} "
                                          f"within {timeout:g} s") from None
    finally:
        sock.close()
    return socket.inet_ntoa(data[:4]), int.from_bytes(data[4:], "big")


async def filtering(ccs_ip: str, probe_port: int, timeout: float = TIMEOUT) -> Filtering:
    """The filtering verdict (see the module docstring); UNKNOWN when the
    CCS is busy. A listener on the probed port tells a let-in SYN from a
    RST of our own kernel."""
    loop = asyncio.get_running_loop()
    sock = _socket(0, reuseport=True)
    listener = None
    try:
        listener = _socket(sock.getsockname()[1], reuseport=True)
        listener.listen(1)
        await asyncio.wait_for(loop.sock_connect(sock, (ccs_ip, probe_port)), timeout)
        await loop.sock_sendall(sock, FILTERING + bytes(PAD))
        verdict = await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)
    except asyncio.TimeoutError:
        return Filtering.UNKNOWN
    finally:
        sock.close()
        if listener is not None:
            listener.close()
    return parse(Filtering, VERDICT_BYTES.get(verdict, "unknown"))
