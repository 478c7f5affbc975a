"""Where each device is connected, and a way to reach the CCS node that holds it.

Two backends with one interface:

- ``MemoryRegistry``: one node, everything in this process (the default).
- ``RedisRegistry``: several CCS nodes share presence in Redis and pass
  rendezvous messages to each other over pub/sub, one channel per node plus a
  broadcast channel. A node announces itself with a key that expires unless
  refreshed, so a killed node's devices stop being "located" there within
  ``node_ttl`` seconds, and messages to it report no receiver at once.

Node-to-node messages are small JSON objects (``{"op": ..., ...}``); the
server (fastpunch.ccs.server) gives them meaning.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable, Optional

log = logging.getLogger("fastpunch.ccs")
Handler = Callable[[dict], Awaitable[None]]


class MemoryRegistry:
    """A single node. ``locate`` answers from the server's own sessions."""

    shared = False

    def __init__(self, node: str = "ccs") -> None:
        self.node = node
        self._handler: Optional[Handler] = None
        self._local: Callable[[str], bool] = lambda name: False

    async def start(self, handler: Handler, is_local: Callable[[str], bool]) -> None:
        self._handler, self._local = handler, is_local

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        """Readiness: nothing outside this process to ask."""

    async def online(self, name: str) -> None:
        pass

    async def offline(self, name: str) -> None:
        pass

    async def locate(self, name: str) -> Optional[str]:
        return self.node if self._local(name) else None

    async def send(self, node: str, msg: dict) -> bool:
        if node != self.node:
            return False
        await self._handler(msg)
        return True

    async def broadcast(self, msg: dict) -> None:
        await self._handler(msg)


_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisRegistry:
    """Presence and node-to-node messages through one Redis server."""

    shared = True

    def __init__(self, url: str, node: str, *, cluster: str = "fastpunch",
                 node_ttl: float = 6.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise RuntimeError("the Redis registry needs the redis package: "
                               "pip install 'fastpunch[redis]'") from exc
        self._redis = aioredis.from_url(url)
        self.url, self.node, self.cluster, self.node_ttl = url, node, cluster, node_ttl
        self._tasks: list[asyncio.Task] = []
        self._pubsub = None
        self._delete_if = self._redis.register_script(_DELETE_IF)

    def _key(self, *parts: str) -> str:
        return ":".join((self.cluster,) + parts)

    async def start(self, handler: Handler, is_local: Callable[[str], bool]) -> None:
        from redis.exceptions import ConnectionError as RedisDown

        try:
            await self._redis.set(self._key("node", self.node), "1", px=int(self.node_ttl * 1000))
        except RedisDown as exc:
            raise RuntimeError(f"cannot reach redis at {self.url}: {exc}") from exc
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(self._key("to", self.node), self._key("broadcast"))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(handler)), loop.create_task(self._alive())]

    async def ping(self) -> None:
        """Readiness: raises RuntimeError saying why this node cannot use the
        registry (Redis does not answer, or its inbox or presence refresh
        has stopped: it would then miss messages, or vanish for the others)."""
        from redis.exceptions import RedisError

        if not self._tasks:
            raise RuntimeError("the registry is not started")
        for task, what in zip(self._tasks, ("inbox", "presence refresh")):
            if task.done():
                why = "cancelled" if task.cancelled() else repr(task.exception())
                raise RuntimeError(f"this node's {what} stopped: {why}")
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise RuntimeError(f"redis does not answer: {exc}") from exc

    async def _alive(self) -> None:
        while True:
            await asyncio.sleep(self.node_ttl / 3)
            await self._redis.set(self._key("node", self.node), "1", px=int(self.node_ttl * 1000))

    async def _listen(self, handler: Handler) -> None:
        async for item in self._pubsub.listen():
            if item.get("type") != "message":
                continue
            try:
                msg = json.loads(item["data"])
                if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                    raise ValueError("not an op object")
            except ValueError as exc:
                log.warning(json.dumps({"event": "registry-bad-message", "error": str(exc)}))
                continue
            try:
                await handler(msg)
            except Exception:       # one bad message must not stop the node's inbox
                log.exception("registry message %r failed", msg.get("op"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self._redis.delete(self._key("node", self.node))
            if self._pubsub is not None:
                await self._pubsub.aclose() if hasattr(self._pubsub, "aclose") else await self._pubsub.close()
        finally:
            await self._redis.aclose() if hasattr(self._redis, "aclose") else await self._redis.close()

    async def online(self, name: str) -> None:
        await self._redis.set(self._key("dev", name), self.node)

    async def offline(self, name: str) -> None:
        await self._delete_if(keys=[self._key("dev", name)], args=[self.node])

    async def locate(self, name: str) -> Optional[str]:
        node = await self._redis.get(self._key("dev", name))
        if node is None:
            return None
        node = node.decode()
        if node != self.node and not await self._redis.exists(self._key("node", node)):
            return None            # that node is gone; the device will come back elsewhere
        return node

    async def send(self, node: str, msg: dict) -> bool:
        return await self._redis.publish(self._key("to", node), json.dumps(msg)) > 0

    async def broadcast(self, msg: dict) -> None:
        await self._redis.publish(self._key("broadcast"), json.dumps(msg))
