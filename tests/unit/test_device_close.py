"""Device.close() ends, even when its cancellation of a reconnect is lost:
before Python 3.12 asyncio.wait_for returns the awaited result (or raises
its error) instead of CancelledError when the cancel lands as it completes,
so a login in progress went on, logged in again and served the new session
for good (seen once: a lab test's teardown waited 120 s). No network: the
login and the session are stand-ins, the timing is the one that lost it."""

from __future__ import annotations

import asyncio

import pytest

from fastpunch import _loop
from fastpunch.client import CCSError, Device
from fastpunch.proto.backoff import Backoff


@pytest.mark.parametrize("login", ["succeeds", "fails"])
def test_close_ends_though_the_reconnect_swallowed_its_cancel(login):
    async def main():
        loop = asyncio.get_running_loop()
        dev = Device(("127.0.0.1", 1), "viewer", b"k" * 32, ca_file="/dev/null",
                     backoff=Backoff(uniform=lambda a, b: 0.0))
        serves, closing, logins = [], [], []

        async def serve(reader):
            serves.append(reader)
            if len(serves) == 1:
                return CCSError("closed", "the CCS closed the connection")
            await asyncio.Event().wait()              # a healthy session, for ever

        async def log_in(addr, version):
            fut = loop.create_future()

            def arrive():
                if login == "succeeds":
                    fut.set_result("reader")
                else:
                    fut.set_exception(ConnectionResetError("reset"))
                if not closing:                       # close() in that very iteration
                    closing.append(loop.create_task(dev.close()))
                logins.append(1)

            loop.call_later(0.05, arrive)
            return await asyncio.wait_for(fut, 10)

        dev._serve, dev._login = serve, log_in
        dev._supervisor = loop.create_task(dev._supervise("first"))
        await asyncio.sleep(0.2)
        done, _ = await asyncio.wait(closing, timeout=3.0)
        assert done, f"close() still waiting; {len(logins)} logins, {len(serves)} sessions"
        assert dev._supervisor.done() and len(logins) <= 2
        await asyncio.gather(*closing)

    _loop.run(main())


def test_stop_cancels_again_and_gives_up_in_bounded_time():
    async def stubborn(times):
        for _ in range(times):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass                                   # (as a lost cancellation does)

    async def main():
        loop = asyncio.get_running_loop()
        two = loop.create_task(stubborn(2))
        never = loop.create_task(stubborn(10 ** 6))
        await asyncio.sleep(0)
        t0 = loop.time()
        assert await _loop.stop(two, None, grace=0.1, timeout=2.0)
        assert loop.time() - t0 < 1.0
        assert not await _loop.stop(never, grace=0.1, timeout=0.3)
        never.cancel()

    _loop.run(main())


def test_an_accept_still_waiting_ends_when_the_device_closes():
    async def main():
        dev = Device(("127.0.0.1", 1), "viewer", b"k" * 32, ca_file="/dev/null")

        async def first_offer():
            async for offer in dev.incoming():
                return offer

        waiting = asyncio.get_running_loop().create_task(first_offer())
        await asyncio.sleep(0.05)
        await dev.close()
        with pytest.raises(CCSError) as err:
            await asyncio.wait_for(waiting, 2)
        assert err.value.code == "closed"

    _loop.run(main())
