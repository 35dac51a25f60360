"""A small MLLP client: send a message, wait for its ACK. Used by tests, benchmarks, tools.

In enhanced acknowledgement mode a message may be answered by two frames (commit ACK, then
application ACK): :meth:`MLLPClient.send` returns the first, :meth:`MLLPClient.receive` the next.
With an ``ssl`` context the connection is TLS (the context may carry a client certificate:
mutual TLS). Raises ConnectionError when the server closes without answering, TimeoutError on
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl

from gateway.mllp.framing import Frame, FrameDecoder, frame


class MLLPClient:
    """One connection to an MLLP server; messages are sent and answered one at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(64 * 1024 * 1024)
        self._pending: list[bytes] = []

    async def connect(self) -> None:
        """Open the connection."""
        async with asyncio.timeout(self.timeout):
            if self._ssl is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            else:
                self._reader, self._writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname or self.host,
                )

    async def send(self, message: bytes) -> bytes:
        """Send one message and return the content of the next frame received.

        Raises ConnectionError (closed without an answer), TimeoutError.
        """
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(frame(message))
        await self._writer.drain()
        return await self.receive()

    async def receive(self) -> bytes:
        """The content of the next frame from the server. Raises ConnectionError, TimeoutError."""
        async with asyncio.timeout(self.timeout):
            return await self._next_frame()

    async def _next_frame(self) -> bytes:
        assert self._reader is not None
        while not self._pending:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection without an ACK")
            self._pending += [e.data for e in self._decoder.feed(data) if isinstance(e, Frame)]
        return self._pending.pop(0)

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._writer = None

    async def __aenter__(self) -> MLLPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
