"""The event loop: uvloop when installed (the CCS's production loop,
``fastpunch[ccs]``), else asyncio's own, which is what a device install has.
Its own module so a device's commands need not import the CCS server (and
its key store's sqlite3) to get one."""

from __future__ import annotations

import asyncio
from typing import Optional

__all__ = ["new_event_loop", "run", "cancel", "stop"]


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
    """Cancel each task (None: skipped) and wait until it has stopped
    (``stop``, bounded: a task that swallowed its cancellation is cancelled
    again, and given up on after 5 s)."""
    await stop(*tasks)


async def stop(*tasks: Optional[asyncio.Task], timeout: float = 5.0,
               grace: float = 2.0) -> bool:
    """Cancel each task (None: skipped) and wait, ``timeout`` s at most in
    all, until every one has ended; one that runs on is cancelled again
    every ``grace`` s: before Python 3.12, asyncio.wait_for loses a
    cancellation that comes while what it awaits completes (it returns
    that result, or raises that error, instead of CancelledError), so one
    cancel() does not always stop a task. A task's own error is not
    raised; the caller's cancellation is. True: all ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(grace, left))
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()                # retrieved: no "never retrieved" at exit
    return not pending
