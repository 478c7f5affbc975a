"""``fastpunch agent``: a device that stays logged in and exposes local TCP
services to the peers allowed to use them.

Every peer that connects gets one secure session with the stream
multiplexer over it (fastpunch.mux); each stream it opens names a service
(its label), and the agent splices it to a fresh TCP connection to that
service's local address. One punch serves every connection an RTSP or HTTP
client makes. The label ``?services`` answers with the names this peer may
use (``fastpunch forward --list``).

The configuration (fastpunch.agent.config) can be reloaded while running:
new streams see the new services and peer lists at once, streams already
spliced go on (an exposed port removed stops taking new streams, not the
old ones).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from fastpunch.agent.config import AgentConfig, RELOADABLE
from fastpunch._loop import cancel
from fastpunch.agent.pipe import splice
from fastpunch.errors import FastpunchError
from fastpunch.mux import MuxSession, MuxStream, MuxUsageError, StreamResetError

__all__ = ["Agent", "log", "event"]

log = logging.getLogger("fastpunch.agent")
LIST_LABEL = "?services"


def event(kind: str, **fields) -> None:
    """One JSON line on the fastpunch.agent logger."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"ts": round(time.time(), 3), "event": kind, **fields}, default=str))


@dataclass
class _Peer:
    name: str
    path: str
    strategy: str
    since: float
    session: MuxSession
    streams: int = 0                      # opened over this session, in all
    refused: int = 0
    bytes_in: int = 0                     # from the peer to our services
    bytes_out: int = 0
    live: Dict[int, MuxStream] = field(default_factory=dict)

    def as_dict(self) -> dict:
        live_in = sum(s.bytes_in for s in self.live.values())
        live_out = sum(s.bytes_out for s in self.live.values())
        return {"peer": self.name, "path": self.path, "strategy": self.strategy,
                "since": round(self.since, 3), "streams_live": len(self.live),
                "streams": self.streams, "refused": self.refused,
                "bytes_in": self.bytes_in + live_in, "bytes_out": self.bytes_out + live_out}


class Agent:
    """Run with ``await agent.start()`` then ``await agent.stop()``;
    ``reload(config)`` swaps the configuration in."""

    def __init__(self, config: AgentConfig, *, device=None, emit: Callable = event) -> None:
        self.config = config
        self.device = device
        self.emit = emit
        self.started = time.time()
        self.peers: Dict[int, _Peer] = {}          # by id(session)
        self._tasks: set = set()
        self._acceptors: list = []
        self._slots = asyncio.Semaphore(config["max_peers"])
        self._status = None
        self._stopping = False
        self.failed: Optional[BaseException] = None     # why the agent gave up, if it did
        self.done = asyncio.Event()

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Log in (errors raise), start accepting, serve the status socket."""
        cfg = self.config
        if self.device is None:
            from fastpunch.client import Device
            from fastpunch.credentials import read_credentials

            _, key = read_credentials(cfg["key_file"], cfg["name"])
            self.device = Device(list(cfg["ccs"]), cfg["name"], key, ca_file=cfg["ca"],
                                 server_hostname=cfg["server_name"], nat=cfg["nat"],
                                 standing=True, keepalive=cfg["keepalive"])
        if cfg["status_socket"]:
            self._status = await _serve_status(cfg["status_socket"], self.status)
        try:
            if not self.device.connected:        # (a Device given logged in already)
                await self.device.login()
        except BaseException:
            self._close_status()
            raise
        self.emit("logged-in", name=self.device.name, node=self.device.node,
                  ccs=self.device.ccs, services=sorted(cfg.services))
        for _ in range(cfg["punches"]):
            self._acceptors.append(asyncio.ensure_future(self._accept_loop()))

    async def stop(self, reason: str = "stopping") -> None:
        """Tell every peer (GOAWAY), end every session, log out; leaves no
        table, socket or mapping behind (Device.close releases them)."""
        if self._stopping:
            await self.done.wait()
            return
        self._stopping = True
        await cancel(*self._acceptors)
        for p in list(self.peers.values()):
            p.session.go_away(reason)
        await asyncio.gather(*(p.session.close() for p in list(self.peers.values())),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.device is not None:
            await self.device.close()
        self._close_status()
        self.emit("stopped", reason=reason)
        self.done.set()

    def _close_status(self) -> None:
        if self._status is not None:
            server, path = self._status
            server.close()
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
            self._status = None

    def reload(self, config: AgentConfig) -> set:
        """Take ``config`` for everything new; returns the settings that
        changed but need a restart to take effect (they keep their old
        values until then)."""
        changed = self.config.changed(config)
        later = changed - RELOADABLE
        values = dict(config.values)
        for key in later:
            values[key] = self.config.values[key]
        self.config = AgentConfig(values, config.sources, config.file)
        self.emit("config-reloaded", changed=sorted(changed - later),
                  services=sorted(self.config.services))
        if later:
            self.emit("config-needs-restart", settings=sorted(later))
        return later

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- peers -----------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        from fastpunch.client import AuthenticationError, CCSError

        while True:
            await self._slots.acquire()
            try:
                conn = await self.device.accept(strategies=self.config["strategies"])
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except AuthenticationError as exc:      # removed, disabled or re-keyed: final
                self._slots.release()
                self.failed = exc
                self.emit("agent-failed", code=exc.code, reason=str(exc))
                self._spawn(self.stop(f"credentials refused: {exc.code}"))
                return
            except (CCSError, OSError, FastpunchError) as exc:
                self._slots.release()
                self.emit("accept-failed", reason=str(exc))
                await asyncio.sleep(1.0)            # (the device logs in again on its own)
                continue
            self._spawn(self._serve_peer(conn))

    async def _serve_peer(self, conn) -> None:
        try:
            try:
                reader, writer = await asyncio.wait_for(conn.secure_streams(), 30)
            except (OSError, asyncio.TimeoutError, FastpunchError) as exc:
                self.emit("peer-failed", peer=conn.peer, reason=f"secure channel: {exc}")
                conn.close()
                return
            session = MuxSession(reader, writer, conn.role,
                                 max_streams=self.config["max_streams"],
                                 max_window=self.config["stream_window"], name=conn.peer)
            peer = _Peer(conn.peer, conn.path, conn.strategy, time.time(), session)
            self.peers[id(session)] = peer
            self.emit("peer-connected", peer=conn.peer, path=conn.path, strategy=conn.strategy)
            try:
                async for stream in session:
                    self._spawn(self._serve_stream(peer, stream))
                await session.wait_closed()
            finally:
                await session.close()
                conn.close()
                self.peers.pop(id(session), None)
                self.emit("peer-gone", peer=peer.name, streams=peer.streams,
                          bytes_in=peer.bytes_in, bytes_out=peer.bytes_out,
                          reason=str(session.error) if session.error else "closed")
        finally:
            self._slots.release()

    async def _serve_stream(self, peer: _Peer, stream: MuxStream) -> None:
        cfg = self.config
        label = stream.label
        if label == LIST_LABEL:
            try:
                stream.accept()
                await stream.write(json.dumps({"services": cfg.offered_to(peer.name)}).encode())
                stream.write_eof()
            except (OSError, FastpunchError):
                pass
            return
        service = cfg.services.get(label)
        why = None
        if service is None:
            why = "no-such-service"
        elif not cfg.allows(service, peer.name):
            why = "not-allowed"
        if why is not None:
            peer.refused += 1
            stream.refuse(why)
            self.emit("stream-refused", peer=peer.name, service=label, reason=why)
            return
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(service.host, service.port),
                                          cfg["connect_timeout"])
        except (OSError, asyncio.TimeoutError) as exc:
            peer.refused += 1
            stream.refuse("connect-failed")
            self.emit("stream-refused", peer=peer.name, service=label, reason="connect-failed",
                      detail=str(exc) or type(exc).__name__)
            return
        sock = w.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            stream.accept()
        except (StreamResetError, MuxUsageError):    # the peer gave up meanwhile
            w.close()
            return
        peer.streams += 1
        peer.live[stream.id] = stream
        self.emit("stream-open", peer=peer.name, service=label, stream=stream.id)
        try:
            how = await splice(stream, r, w)
        finally:
            peer.live.pop(stream.id, None)
            peer.bytes_in += stream.bytes_in
            peer.bytes_out += stream.bytes_out
        self.emit("stream-closed", peer=peer.name, service=label, stream=stream.id, how=how,
                  bytes_in=stream.bytes_in, bytes_out=stream.bytes_out)

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict:
        dev = self.device
        return {
            "name": self.config["name"],
            "pid": os.getpid(),
            "started": round(self.started, 3),
            "ccs": {"connected": bool(dev is not None and dev.connected),
                    "node": getattr(dev, "node", None),
                    "address": list(dev.ccs) if dev is not None and dev.ccs else None,
                    "logins": getattr(dev, "connections", 0)},
            "services": {n: s.as_dict() for n, s in self.config.services.items()},
            "peers": [p.as_dict() for p in self.peers.values()],
            "config": self.config.file,
        }


async def _serve_status(path: str, status: Callable[[], dict]):
    """A unix socket (owner only) that answers every connection with the
    status as one JSON document. A stale socket of a dead agent is
    replaced; a live agent's is not taken over."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FastpunchError(f"status socket {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)                       # nobody answers: a dead agent's
        else:
            raise FastpunchError(f"status socket {path}: another agent is running there "
                                 "(give each its own --status-socket)")
        finally:
            probe.close()

    async def answer(reader, writer) -> None:
        try:
            writer.write(json.dumps(status(), default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(answer, path)
    finally:
        os.umask(old)
    return server, path


def read_status(path: str, timeout: float = 5.0) -> dict:
    """What a running agent says about itself (``fastpunch agent status``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise FastpunchError(f"no agent status at {path}: is the agent running "
                                 "(with this --status-socket)?") from None
        except ConnectionRefusedError:
            raise FastpunchError(f"no agent answers at {path} (a stale socket)") from None
        except PermissionError:
            raise FastpunchError(f"{path}: permission denied (the status socket is its "
                                 "owner's only)") from None
        data = b""
        while len(data) < 1 << 22:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError:
        raise FastpunchError(f"{path}: not an agent's status") from None
