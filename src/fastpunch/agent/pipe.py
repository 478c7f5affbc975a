"""One mux stream spliced to one local TCP connection, both ways."""

from __future__ import annotations

import asyncio

from fastpunch.mux import MuxStream, StreamResetError

CHUNK = 64 * 1024


async def splice(stream: MuxStream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> str:
    """Carry bytes between ``stream`` and a local connection until both
    directions have ended (each side's end passed on as a half close, so an
    HTTP/1.0 client that shuts its side still gets its answer). A reset on
    either side ends both: a reset stream aborts the local connection (the
    client sees a RST, not a clean but short answer), a local error resets
    the stream. Returns how it ended: "done", "stream-reset" or
    "local-error"."""
    async def up() -> None:                     # local -> peer
        while True:
            data = await reader.read(CHUNK)
            if not data:
                stream.write_eof()
                return
            await stream.write(data)

    async def down() -> None:                   # peer -> local
        while True:
            data = await stream.read(CHUNK)
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    how = "done"
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                if isinstance(exc, StreamResetError):
                    how = "stream-reset"
                    writer.transport.abort()
                else:
                    how = "local-error"
                    stream.reset("local-error")
                    writer.transport.abort()
                break
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if how == "done":
            stream.close()
        if not writer.is_closing():
            writer.close()
    return how
