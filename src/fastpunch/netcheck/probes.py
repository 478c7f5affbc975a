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
from typing import Optional

from fastpunch.errors import FastpunchError
from fastpunch.proto.kinds import Filtering, parse
from fastpunch._addr import family
from fastpunch.proto.probe import FILTERING, PAD, TOKEN, VERDICT_BYTES, WHOAMI, parse_reply

__all__ = ["ProbeError", "whoami", "filtering"]

TIMEOUT = 5.0


class ProbeError(FastpunchError):
    """A probe got no proper answer; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


def _socket(local_port: int = 0, reuseport: bool = False, family: int = 4) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if family == 6:         # the port's IPv6 side only: its IPv4 one is another socket's
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # SO_REUSEADDR: the punch's own port, probed just before the punch
        # (and handed to a repaired socket after it)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setblocking(False)
        s.bind(("::" if family == 6 else "0.0.0.0", local_port))
    except BaseException:
        s.close()
        raise
    return s


async def whoami(ccs_ip: str, probe_port: int, local_port: int = 0,
                 timeout: float = TIMEOUT, token: Optional[bytes] = None) -> tuple:
    """(address, port) the CCS saw for a connection from ``local_port`` (0:
    any) to its probe port, over the family of ``ccs_ip``. The CCS closes
    first, so our side of the 4-tuple leaves no TIME_WAIT behind (the
    gateway's entry for it stays, keeping the mapping warm for the punch
    that follows). ``token``: this device's probe token (AuthOk), so the
    CCS ties the address to us."""
    if token is not None and len(token) != TOKEN:
        raise ValueError(f"a probe token is {TOKEN} bytes, not {len(token)}")
    loop = asyncio.get_running_loop()
    fam = family(ccs_ip)
    size = (16 if fam == 6 else 4) + 2
    sock = _socket(local_port, family=fam)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ccs_ip, probe_port)), timeout)
        await loop.sock_sendall(sock, WHOAMI + (token or b"").ljust(PAD, b"\0"))
        data = b""
        while len(data) < size:
            part = await asyncio.wait_for(loop.sock_recv(sock, size - len(data)), timeout)
            if not part:
                raise ProbeError("bad-probe", "the CCS closed the probe early")
            data += part
        await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)     # its FIN first
    except asyncio.TimeoutError:
        raise ProbeError("probe-timeout", f"no answer from {ccs_ip}:{probe_port} "
                                          f"within {timeout:g} s") from None
    finally:
        sock.close()
    return parse_reply(data)


async def filtering(ccs_ip: str, probe_port: int, timeout: float = TIMEOUT) -> Filtering:
    """The filtering verdict (see the module docstring); UNKNOWN when the
    CCS is busy. A listener on the probed port tells a let-in SYN from a
    RST of our own kernel."""
    loop = asyncio.get_running_loop()
    fam = family(ccs_ip)
    sock = _socket(0, reuseport=True, family=fam)
    listener = None
    try:
        listener = _socket(sock.getsockname()[1], reuseport=True, family=fam)
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
