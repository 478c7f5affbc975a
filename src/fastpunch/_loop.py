"""The event loop: uvloop when installed (the CCS's production loop,
``fastpunch[ccs]``), else asyncio's own, which is what a device install has.
Its own module so a device's commands need not import the CCS server (and
its key store's sqlite3) to get one."""

from __future__ import annotations

import asyncio
from typing import Optional

__all__ = ["new_event_loop", "run", "cancel"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro):
    """Run ``coro`` to its end on a new loop (as above), then close the loop:
    the body of a long-running command."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def cancel(*tasks: Optional[asyncio.Task]) -> None:
    """Cancel each task (None: skipped) and wait until it has stopped."""
    for task in tasks:
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
