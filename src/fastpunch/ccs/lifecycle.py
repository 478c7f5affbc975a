"""Device lifecycle changes, effective at once on a running CCS node.

``fastpunch ccs devices disable|remove|rekey`` and ``ccs acl deny`` change
the key store from another process; every change commits with an audit row
(``fastpunch.ccs.keystore``). A node's :class:`Watcher` polls the store
(``PRAGMA data_version`` first: a query of a few microseconds that only says
whether anything was committed), reads the audit rows it has not seen and
applies each to the devices connected here:

    disable NAME, remove NAME, rekey NAME  ->  server.revoke(NAME, code, reason)
    acl-deny A B                           ->  server.deny(A, B)

It acts on the store as it is when it reads the row, not as it was: a
device disabled and enabled again between two polls is not cut, nor is a
session that already proved the key a rekey set (its ``generation`` is the
device's current one). Each row is logged as one ``audit`` event line
saying what it did. A failure in the watcher is logged and the next poll
goes on; it never stops the server.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Optional

from fastpunch import _loop
from fastpunch.ccs.keystore import AuditRow, KeyStore

log = logging.getLogger("fastpunch.ccs")

# the Error code a session cut for each change carries
REVOKE_CODES = {"disable": "device-disabled", "remove": "device-removed",
                "rekey": "device-rekeyed"}
_REASONS = {"disable": "the device was disabled", "remove": "the device was removed",
            "rekey": "the device was given a new key"}
# what a login that proved its key is refused with, by stale()'s code
REFUSALS = {"device-disabled": "the device is disabled",
            "device-removed": "the device was removed during its login",
            "device-rekeyed": "the device was given a new key during its login"}


def stale(keystore: KeyStore, name: str, generation: Optional[int]) -> Optional[str]:
    """Why a session of ``name`` that logged in at ``generation`` may not
    stay (a code of REVOKE_CODES' values), or None."""
    state = keystore.state(name)
    if state is None:
        return "device-removed"
    if state.disabled:
        return "device-disabled"
    if generation is not None and generation != state.generation:
        return "device-rekeyed"
    return None


class Watcher:
    """Follows ``keystore``'s audit log and applies each change to
    ``server`` (a CCSServer: its ``sessions``, ``revoke``, ``deny``)."""

    def __init__(self, keystore: KeyStore, server, interval: float = 0.25) -> None:
        self.keystore = keystore
        self.server = server
        self.interval = interval
        self.seq: Optional[int] = None
        self._version = None
        self._task: Optional[asyncio.Task] = None
        try:
            self._begin()
        except Exception as exc:            # (a server starts anyway: the task tries again)
            self._event("audit-watch-error", reason=repr(exc))

    def _begin(self) -> None:
        """Start from now: what happened before we started is not ours."""
        self._version = self.keystore.version()
        self.seq = self.keystore.audit_seq()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await _loop.cancel(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception as exc:        # logged; the next poll tries again
                self._event("audit-watch-error", reason=repr(exc))
                log.debug("key store watcher", exc_info=True)

    async def poll(self) -> list[tuple[AuditRow, str]]:
        """Apply what was committed since the last poll; returns each new
        row with its effect."""
        if self.seq is None:
            self._begin()
            return []
        version = self.keystore.version()
        if version == self._version:
            return []
        self._version = version
        done = []
        for row in self.keystore.audit_since(self.seq):
            self.seq = row.seq
            try:
                effect = await self.apply(row)
            except Exception as exc:        # one bad row does not hold up the rest
                effect = "error"
                self._event("audit-watch-error", seq=row.seq, reason=repr(exc))
            self._event("audit", seq=row.seq, action=row.action, device=row.device,
                        other=row.other, actor=row.actor, detail=row.detail, effect=effect)
            done.append((row, effect))
        return done

    async def apply(self, row: AuditRow) -> str:
        """What ``row`` means for this node, done: "revoked", "denied",
        or why nothing was ("current", "not-connected", "allowed", "none")."""
        srv = self.server
        if row.action in REVOKE_CODES:
            session = srv.sessions.get(row.device)
            why = stale(self.keystore, row.device,
                        getattr(session, "generation", None) if session is not None else None)
            if why is None:
                if session is not None:
                    return "current"        # it logged in after the change (new key, enabled)
                if row.action == "disable":
                    return "not-connected"  # and enabled again: nothing of it to end here
                # removed or re-keyed, then re-enrolled / re-keyed since: what the old
                # key got (relay tickets, relays on this node) still goes
            code = REVOKE_CODES[row.action]
            # (the reason reaches the device and its peers: who did it stays in our log)
            await _maybe_await(srv.revoke(row.device, code,
                                          f"{_REASONS[row.action]} (audit {row.seq})"))
            return "revoked"
        if row.action == "acl-deny":
            if row.other is None or self.keystore.may_reach(row.device, row.other):
                return "allowed"            # allowed again since
            await _maybe_await(srv.deny(row.device, row.other))
            return "denied"
        return "none"

    def _event(self, kind: str, **fields) -> None:
        from fastpunch.ccs.events import event

        event(kind, node=getattr(self.server, "node", None), **fields)


async def _maybe_await(result) -> None:
    if inspect.isawaitable(result):
        await result
