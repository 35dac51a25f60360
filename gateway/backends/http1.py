"""A small HTTP/1.1 transport for httpx over asyncio streams, for the busiest local RPC (Kubo).

httpx's default transport (httpcore over anyio) costs about 1-2 ms of CPU per request here,
which at a few dozen Kubo calls a second is a tenth of the gateway's core. This transport
speaks just what a local RPC needs: one request at a time per connection, keep-alive with a
small pool, request bodies sent whole, responses framed by ``Content-Length``, chunked transfer
coding or connection close. It plugs into ``httpx.AsyncClient(transport=...)``, so callers keep
httpx's API and exception tree: connection failures raise ``httpx.ConnectError``, timeouts
``httpx.TimeoutException`` subclasses, malformed answers ``httpx.RemoteProtocolError``.
Plain ``http://`` only. A request sent on a pooled connection that the server had closed
meanwhile is sent once more on a new connection, so use it for idempotent requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import httpx

MAX_HEADER_BYTES = 64 * 1024

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class StreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with a pool of at most ``max_idle`` idle connections."""

    def __init__(self, *, timeout: float = 10.0, max_idle: int = 8) -> None:
        self._timeout = timeout
        self._max_idle = max_idle
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the whole response. Raises httpx.TransportError."""
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only http:// is supported, not {url.scheme}://")
        host, port = url.host, url.port or 80
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1"]
        headers = request.headers.copy()
        headers["Content-Length"] = str(len(body))
        headers["Accept-Encoding"] = "identity"  # bodies are returned as received
        headers.setdefault("Host", f"{host}:{port}")
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "transfer-encoding"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        timeout = _timeout_of(request, self._timeout)
        pooled = self._take(host, port)
        try:
            if pooled is not None:
                try:
                    return await self._exchange(pooled, data, request, host, port, timeout)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass  # the server closed an idle connection: one fresh attempt below
            conn = await self._connect(host, port, timeout)
            return await self._exchange(conn, data, request, host, port, timeout)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no complete answer within {timeout} s") from exc
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc

    def _take(self, host: str, port: int) -> _Conn | None:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn
            conn[1].close()  # closed by the server meanwhile: release it
        return None

    async def _connect(self, host: str, port: int, timeout: float) -> _Conn:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc

    async def _exchange(
        self,
        conn: _Conn,
        data: bytes,
        request: httpx.Request,
        host: str,
        port: int,
        timeout: float,
    ) -> httpx.Response:
        reader, writer = conn
        keep = False
        try:
            async with asyncio.timeout(timeout):
                writer.write(data)
                await writer.drain()
                status, headers = await _read_head(reader)
                content, keep = await _read_body(reader, headers, request.method)
        finally:
            if keep and len(self._idle.setdefault((host, port), deque())) < self._max_idle:
                self._idle[(host, port)].append(conn)
            else:
                writer.close()
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            while idle:
                _, writer = idle.pop()
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()


def _timeout_of(request: httpx.Request, default: float) -> float:
    timeouts = request.extensions.get("timeout") or {}
    values = [v for v in timeouts.values() if isinstance(v, int | float)]
    return float(max(values)) if values else default


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("response header too long") from exc
    if len(raw) > MAX_HEADER_BYTES:
        raise httpx.RemoteProtocolError("response header too long")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
            headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], method: str
) -> tuple[bytes, bool]:
    """The body and whether the connection may be reused."""
    fields = {k.lower(): v for k, v in headers}
    keep = fields.get("connection", "").lower() != "close"
    if method == "HEAD":
        return b"", keep
    if "chunked" in fields.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise httpx.RemoteProtocolError("malformed chunk size") from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks), keep
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")
    if "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError as exc:
            raise httpx.RemoteProtocolError("malformed Content-Length") from exc
        return await reader.readexactly(length), keep
    return await reader.read(), False
