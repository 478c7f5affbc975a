"""fastpunch.mux (the multiplexer on asyncio) over real loopback sockets: a
stream per direction with its own flow control, a hostile peer's frames, a
peer that floods PINGs and never reads (our replies wait in a bounded
buffer, not in memory without end), and the session's end reaching every
stream."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fastpunch.mux import MuxSession, MuxViolation, StreamResetError
from fastpunch.proto.mux import HEADER, FrameType, INITIAL_WINDOW


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def pair():
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return MuxSession(ra, wa, "initiator"), MuxSession(rb, wb, "responder")


def test_streams_both_ways_and_a_stalled_one_holds_back_only_itself():
    async def main():
        a, b = await pair()
        slow = await a.open("slow")
        fast = await a.open("fast")
        blob = bytes(range(256)) * (4 * INITIAL_WINDOW // 256)
        # slow's writer blocks once its window is spent: nobody reads it
        slow_writer = asyncio.ensure_future(slow.write(blob))
        got = {}
        async for s in b:
            s.accept()
            got[s.label] = s
            if len(got) == 2:
                break
        writing = asyncio.ensure_future(a_write_and_close(fast, blob))
        data = bytearray()
        while chunk := await got["fast"].read():
            data += chunk
        await writing
        assert bytes(data) == blob
        assert not slow_writer.done()                  # still waiting for window
        rest = bytearray()
        reader = asyncio.ensure_future(read_all(got["slow"], rest))
        await slow_writer
        slow.write_eof()
        await reader
        assert bytes(rest) == blob
        await a.close()
        await b.close()

    async def a_write_and_close(stream, data):
        await stream.write(data)
        stream.write_eof()

    async def read_all(stream, into):
        while chunk := await stream.read():
            into += chunk

    run(main())


def test_a_hostile_frame_ends_the_session_and_resets_its_streams():
    async def main():
        a_sock, b_sock = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a_sock)
        mine = MuxSession(ra, wa, "initiator")
        stream = await mine.open("x")
        b_sock.setblocking(True)
        b_sock.sendall(HEADER.pack(99, 1, 0))           # no such frame type
        await asyncio.wait_for(mine.wait_closed(), 10)
        with pytest.raises(StreamResetError) as err:
            await stream.read()
        owed = b_sock.recv(4096)                        # OPEN, then the GOAWAY saying why
        b_sock.close()
        return mine.error, err.value, owed

    error, reset, owed = run(main())
    assert isinstance(error, MuxViolation) and error.code == "unknown-frame"
    assert reset.local and reset.reason == "unknown-frame"
    assert owed.endswith(HEADER.pack(FrameType.GOAWAY, 0, 13) + b"unknown-frame")


def test_a_peer_that_floods_pings_and_never_reads_cannot_fill_our_memory():
    async def main():
        a_sock, b_sock = socket.socketpair()
        for s in (a_sock, b_sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        ra, wa = await asyncio.open_connection(sock=a_sock)
        mine = MuxSession(ra, wa, "responder")
        ping = HEADER.pack(FrameType.PING, 0, 8) + b"\0" * 8
        b_sock.setblocking(False)
        burst = ping * 4096                             # 68 KiB of PINGs per send
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while loop.time() < deadline and sent < 64 << 20:
            try:
                sent += b_sock.send(burst)
            except BlockingIOError:                      # we stopped reading: good
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(0)
        buffered = wa.transport.get_write_buffer_size()
        await mine.close()
        b_sock.close()
        return sent, buffered

    sent, buffered = run(main())
    # the peer could push only what the kernel buffers and one read's replies
    # hold; our side stopped reading instead of queueing PONGs without end
    assert sent < 16 << 20, sent
    assert buffered < 1 << 20, buffered
