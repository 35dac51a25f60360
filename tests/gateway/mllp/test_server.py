"""The MLLP server over real sockets on 127.0.0.1 (port 0), with small handlers.

Covers what does not need a gateway behind it: order on one connection (also when frames are
pipelined), many concurrent connections, idle timeout, bytes before a start block, oversize
frames, a peer that disconnects mid-frame, a handler that fails or has nothing to say, and
several reply frames for one message.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence

import pytest

from gateway.mllp.client import MLLPClient
from gateway.mllp.framing import END, START, frame
from gateway.mllp.server import ConnectionInfo, MLLPServer


async def echo(data: bytes, conn: ConnectionInfo) -> Sequence[bytes] | None:
    """Replies ``ACK:<data>``; ``close`` -> no answer; ``boom`` -> raises; ``two`` -> 2 frames."""
    if data == b"close":
        return None
    if data == b"boom":
        raise RuntimeError("handler defect")
    if data == b"two":
        return [b"first", b"second"]
    if data == b"none":
        return []
    await asyncio.sleep(random.random() / 200)  # out-of-order completion would show
    return [b"ACK:" + data]


@pytest.fixture
async def server() -> AsyncIterator[MLLPServer]:
    srv = MLLPServer(
        echo,
        host="127.0.0.1",
        port=0,
        max_message_size=1000,
        idle_timeout=0.5,
        on_oversize=lambda head, limit: [b"TOO-BIG:" + head[:8] + b":" + str(limit).encode()],
    )
    await srv.start()
    yield srv
    await srv.close()


async def open_raw(server: MLLPServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    data = await asyncio.wait_for(reader.readuntil(END), 5)
    assert data.startswith(START)
    return data[1:-2]


async def test_port_zero_picks_a_free_port(server: MLLPServer) -> None:
    assert server.port > 0
    async with MLLPClient("127.0.0.1", server.port, timeout=5) as c:
        assert await c.send(b"hello") == b"ACK:hello"


async def test_pipelined_frames_are_answered_in_order(server: MLLPServer) -> None:
    reader, writer = await open_raw(server)
    writer.write(b"".join(frame(f"m{i}".encode()) for i in range(40)))
    await writer.drain()
    got = [await read_frame(reader) for _ in range(40)]
    assert got == [f"ACK:m{i}".encode() for i in range(40)]
    writer.close()


async def test_fifty_concurrent_connections_each_in_order(server: MLLPServer) -> None:
    async def one(n: int) -> list[bytes]:
        async with MLLPClient("127.0.0.1", server.port, timeout=10) as c:
            return [await c.send(f"{n}-{i}".encode()) for i in range(5)]

    results = await asyncio.gather(*(one(n) for n in range(50)))
    assert results == [[f"ACK:{n}-{i}".encode() for i in range(5)] for n in range(50)]


async def test_bytes_before_start_block_are_discarded_and_logged(
    server: MLLPServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.mllp")
    reader, writer = await open_raw(server)
    writer.write(b"\r\nnoise before" + frame(b"real"))
    await writer.drain()
    assert await read_frame(reader) == b"ACK:real"
    discarded = [r for r in caplog.records if "discarded" in r.getMessage()]
    assert discarded and discarded[0].bytes == len(b"\r\nnoise before")  # type: ignore[attr-defined]
    assert "noise" not in caplog.text  # sizes are logged, never content
    writer.close()


async def test_oversize_frame_is_answered_and_connection_kept(server: MLLPServer) -> None:
    reader, writer = await open_raw(server)
    writer.write(START + b"MSH|big|" + b"x" * 5000 + END + frame(b"after"))
    await writer.drain()
    assert await read_frame(reader) == b"TOO-BIG:MSH|big|:1000"
    assert await read_frame(reader) == b"ACK:after"
    writer.close()


async def test_idle_connection_is_closed(server: MLLPServer) -> None:
    reader, writer = await open_raw(server)
    writer.write(frame(b"one"))
    await writer.drain()
    assert await read_frame(reader) == b"ACK:one"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await asyncio.wait_for(reader.read(100), 5) == b""  # EOF: the server closed
    assert 0.3 < loop.time() - t0 < 4
    writer.close()


async def test_peer_disconnecting_mid_frame_does_not_disturb_others(
    server: MLLPServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.mllp")
    _, writer = await open_raw(server)
    writer.write(START + b"MSH|half a mess")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(50):
        if "mid-frame" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "mid-frame" in caplog.text
    async with MLLPClient("127.0.0.1", server.port, timeout=5) as c:
        assert await c.send(b"still there") == b"ACK:still there"


async def test_no_answer_or_handler_failure_closes_only_that_connection(
    server: MLLPServer,
) -> None:
    for trigger in (b"close", b"boom"):
        async with MLLPClient("127.0.0.1", server.port, timeout=5) as c:
            with pytest.raises(ConnectionError):
                await c.send(trigger)
    async with MLLPClient("127.0.0.1", server.port, timeout=5) as c:
        assert await c.send(b"ok") == b"ACK:ok"


async def test_each_reply_gets_its_own_frame(server: MLLPServer) -> None:
    async with MLLPClient("127.0.0.1", server.port, timeout=5) as c:
        assert await c.send(b"two") == b"first"
        assert await c.receive() == b"second"
        # A message that asks for no answer gets none; the next one is answered.
        reader, writer = await open_raw(server)
        writer.write(frame(b"none") + frame(b"next"))
        await writer.drain()
        assert await read_frame(reader) == b"ACK:next"
        writer.close()


async def test_close_ends_open_connections(server: MLLPServer) -> None:
    reader, writer = await open_raw(server)
    writer.write(frame(b"x"))
    await writer.drain()
    assert await read_frame(reader) == b"ACK:x"
    await server.close()
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
