"""The lean HTTP/1.1 transport against a scripted server: framing, reuse, failures.

(Its production use, Kubo's RPC, is covered by the blob store contract tests on real Kubo.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway.backends.http1 import StreamTransport

Reply = Callable[[bytes], bytes | None]  # request bytes -> raw response (None: close)


@pytest.fixture
async def server() -> AsyncIterator[tuple[list[Reply], list[bytes], int]]:
    """A server answering each request with the next scripted reply; records requests."""
    replies: list[Reply] = []
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                request = head + await reader.readexactly(length)
                seen.append(request)
                answer = replies.pop(0)(request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield replies, seen, port
    srv.close()
    await srv.wait_closed()


def fixed(raw: bytes) -> Reply:
    return lambda _request: raw


async def test_content_length_chunked_and_reuse(
    server: tuple[list[Reply], list[bytes], int],
) -> None:
    replies, seen, port = server
    replies += [
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        fixed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\nX-Stream-Error: \r\n\r\n"
        ),
    ]
    async with httpx.AsyncClient(
        transport=StreamTransport(), base_url=f"http://127.0.0.1:{port}"
    ) as c:
        r1 = await c.post("/api/v0/id", params={"arg": "x y"}, content=b"body!")
        r2 = await c.post("/api/v0/dag/import", files={"file": b"\x00\x01"})
    assert (r1.status_code, r1.content) == (200, b"hello")
    assert (r2.status_code, r2.content) == (200, b"Wikipedia ")
    assert seen[0].startswith(b"POST /api/v0/id?arg=x+y HTTP/1.1\r\n")
    assert seen[0].endswith(b"\r\n\r\nbody!") and b"content-length: 5\r\n" in seen[0].lower()
    assert b"multipart/form-data; boundary=" in seen[1] and b"\x00\x01" in seen[1]
    assert len(seen) == 2  # both on one kept-alive connection (one handler served both)


async def test_a_stale_pooled_connection_is_replaced_once(
    server: tuple[list[Reply], list[bytes], int],
) -> None:
    replies, seen, port = server
    replies += [
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
        lambda _r: None,  # the server drops the kept-alive connection on the next request
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
    ]
    async with httpx.AsyncClient(
        transport=StreamTransport(), base_url=f"http://127.0.0.1:{port}"
    ) as c:
        assert (await c.get("/one")).content == b"a"
        assert (await c.get("/two")).content == b"b"
    assert len(seen) == 3


async def test_connections_closed_by_the_server_while_idle_are_released(
    server: tuple[list[Reply], list[bytes], int],
) -> None:
    """A pooled connection the server closed is dropped and closed, not leaked (a leak
    would surface as a ResourceWarning, an error under this suite's warning filter)."""
    replies, _seen, port = server
    replies += [
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
        lambda _r: None,
    ]
    transport = StreamTransport()
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.get("/one")).content == b"a"
        (conn,) = transport._idle[("127.0.0.1", port)]
        conn[1].write(b"GET /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n")  # server closes
        for _ in range(100):
            if conn[0].at_eof():
                break
            await conn[0].read(1)
        assert transport._take("127.0.0.1", port) is None
        assert conn[1].is_closing()


async def test_until_close_body_and_protocol_errors(
    server: tuple[list[Reply], list[bytes], int],
) -> None:
    replies, _seen, port = server
    replies += [
        fixed(b"HTTP/1.1 500 Internal\r\nConnection: close\r\n\r\nboom"),
        fixed(b"SMTP ready\r\n\r\n"),
    ]
    transport = StreamTransport()
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as c:
        r = await c.get("/fails")
        assert (r.status_code, r.content) == (500, b"boom")
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get("/garbage")


async def test_refused_and_timeout_are_httpx_errors(
    server: tuple[list[Reply], list[bytes], int],
) -> None:
    replies, _seen, port = server

    def never(_request: bytes) -> bytes:
        return b""  # nothing: the client waits for a status line

    replies.append(never)
    async with httpx.AsyncClient(transport=StreamTransport(), timeout=0.3) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("http://127.0.0.1:1/")
        with pytest.raises(httpx.TimeoutException):
            await c.get(f"http://127.0.0.1:{port}/slow")
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.get("https://127.0.0.1:1/")
