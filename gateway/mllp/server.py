"""The MLLP listener: asyncio streams, many connections, messages in order on each one.

For every complete frame the handler is awaited before the next frame of that connection is
handled, so a connection's messages are processed (and answered) strictly in order; connections
are independent. The handler returns the reply messages, each sent in its own frame (an empty
list: no reply), or ``None`` to close the connection without an answer (what to do when nothing
truthful can be said). A handler that raises is logged and its connection closed; the server
goes on serving the others. An oversize frame is answered by ``on_oversize`` (an AR ACK) and
the decoder resynchronises at the next start block, bytes outside frames are dropped and
logged, an idle connection is closed after ``idle_timeout``. Logs carry the peer and sizes,
never message content.

Who is on the other end: with an ``ssl`` context (mutual TLS) the peer's certificate, and
without one the peer's address, go to ``identify``, which returns the
:class:`gateway.auth.caller.Caller` (passed to the handler in ``ConnectionInfo``) or None to
close the connection at once, before any byte of it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from gateway.auth.caller import Caller
from gateway.mllp.framing import Discarded, Frame, FrameDecoder, Oversize, frame

log = logging.getLogger("gateway.mllp")


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Who is on the other end: the address, and the authenticated caller (None when the
    server runs without ``identify``)."""

    peer: str
    caller: Caller | None = None


Handler = Callable[[bytes, ConnectionInfo], Awaitable[Sequence[bytes] | None]]
OversizeHandler = Callable[[bytes, int], Sequence[bytes]]
#: (peer certificate in DER or None on a plain connection, peer host) -> caller, or None: refuse.
Identify = Callable[[bytes | None, str], Caller | None]


class MLLPServer:
    """An MLLP server around a message handler."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_message_size: int = 4 * 1024 * 1024,
        idle_timeout: float = 300.0,
        on_oversize: OversizeHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
        identify: Identify | None = None,
    ) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self._on_oversize = on_oversize
        self._ssl = ssl_context
        self._identify = identify
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port, readable afterwards from ``.port``."""
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            limit=256 * 1024,
            ssl=self._ssl,
            ssl_handshake_timeout=10.0 if self._ssl is not None else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("mllp listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peername = writer.get_extra_info("peername")
        info = ConnectionInfo(peer=f"{peername[0]}:{peername[1]}" if peername else "unknown")
        if self._identify is not None:
            tls = writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True) if tls is not None else None
            caller = self._identify(der, str(peername[0]) if peername else "")
            if caller is None:
                log.warning("mllp peer refused", extra={"peer": info.peer})
                self._connections.discard(task)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                return
            info = ConnectionInfo(peer=info.peer, caller=caller)
        decoder = FrameDecoder(self.max_message_size)
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: no task per read, and (on Python 3.11)
                    # no cancellation lost when data arrives as the server closes.
                    async with asyncio.timeout(self.idle_timeout):
                        data = await reader.read(65536)
                except TimeoutError:
                    log.info("mllp idle timeout", extra={"peer": info.peer})
                    return
                if not data:
                    if decoder.in_frame:
                        log.warning("mllp peer closed mid-frame", extra={"peer": info.peer})
                    return
                for event in decoder.feed(data):
                    if isinstance(event, Discarded):
                        log.warning(
                            "mllp bytes outside a frame discarded",
                            extra={"peer": info.peer, "bytes": event.count},
                        )
                        continue
                    if isinstance(event, Oversize):
                        log.warning(
                            "mllp message over the size limit",
                            extra={"peer": info.peer, "limit": event.limit},
                        )
                        if self._on_oversize is not None:
                            for reply in self._on_oversize(event.head, event.limit):
                                writer.write(frame(reply))
                            await writer.drain()
                        continue
                    assert isinstance(event, Frame)
                    try:
                        replies = await self._handler(event.data, info)
                    except Exception as exc:
                        log.error(
                            "mllp handler failed: connection closed without an answer",
                            extra={"peer": info.peer, "error": type(exc).__name__},
                        )
                        return
                    if replies is None:
                        log.warning(
                            "mllp no answer possible: connection closed", extra={"peer": info.peer}
                        )
                        return
                    for reply in replies:
                        writer.write(frame(reply))
                    if replies:
                        await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("mllp connection lost", extra={"peer": info.peer})
        except asyncio.CancelledError:
            # Shutting down: end this connection quietly (asyncio's stream callback would
            # otherwise report the cancelled task as an error).
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
