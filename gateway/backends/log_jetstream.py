"""Production log: a NATS JetStream stream, replicated by Raft across the cluster.

The stream is file-backed with ``num_replicas`` (3) replicas, ``deny_delete`` and ``deny_purge``;
the servers run with ``jetstream { sync_interval: always }`` so a publish acknowledgement means
the message is fsynced on a quorum. Appends carry ``Nats-Expected-Last-Sequence`` (exactly one
writer wins each position) and ``Nats-Msg-Id`` (a retried append inside the duplicate window
returns the original sequence). A publish that times out (a leader election, a lost
connection) is retried with the same message id until ``timeout`` has passed, which is safe
because of that de-duplication. Raises LogConflictError, BackendError (backend "jetstream").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from gateway.backends.protocols import LogEntry
from gateway.errors import BackendError, LogConflictError, LogUnavailableError

NAME = "jetstream"
WRONG_LAST_SEQUENCE = 10071
#: What the server answers a retried message while its first attempt (same ``Nats-Msg-Id``) is
#: still being replicated, as after a leader change: retried like an unavailable stream (the
#: answer is then the first attempt's sequence, or a store).
DUPLICATE_IN_PROCESS = "duplicate message id is in process"
DUPLICATE_WINDOW_S = 120.0
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_HEADROOM = 512  # headers (message id, expected sequence) travel in the same frame
_TRANSIENT = (
    NatsTimeoutError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionClosedError,
    asyncio.TimeoutError,
)


class JetStreamLog:
    """The ledger's log as a JetStream stream."""

    name = NAME

    def __init__(
        self,
        *,
        servers: list[str],
        stream: str = "ALLIANCE_LEDGER",
        subject: str | None = None,
        replicas: int = 3,
        timeout: float = 10.0,
    ) -> None:
        self.servers = servers
        self.stream = stream
        # One subject per stream by default, so that test streams never overlap.
        self.subject = subject or f"alliance.ledger.{stream.lower()}"
        self.replicas = replicas
        self.timeout = timeout
        self._nc: NATS | None = None
        self._ready = False
        self._connect_lock = asyncio.Lock()

    async def _js(self) -> nats.js.JetStreamContext:
        async with self._connect_lock:
            if self._nc is None or self._nc.is_closed:
                nc = NATS()
                try:
                    # Reconnect forever once connected (a node restarting is routine), but bound
                    # the first connection so an unreachable cluster is reported, not waited on.
                    async with asyncio.timeout(self.timeout):
                        await nc.connect(
                            servers=self.servers,
                            connect_timeout=2,
                            max_reconnect_attempts=-1,
                            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # typed int, used as float
                            allow_reconnect=True,
                            name="alliance-gateway",
                        )
                except (TimeoutError, NoServersError, OSError, NatsTimeoutError) as exc:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    raise LogUnavailableError(
                        f"cannot connect to {self.servers}: {type(exc).__name__} {exc}",
                        backend=NAME,
                    ) from exc
                self._nc = nc
            js = self._nc.jetstream(timeout=min(self.timeout, 5.0))
            if not self._ready:
                await self._ensure_stream(js)
                self._ready = True
            return js

    @property
    def max_message_bytes(self) -> int:
        """The largest payload :meth:`append` accepts (server ``max_payload`` less headers)."""
        server = self._nc.max_payload if self._nc is not None else MAX_MESSAGE_BYTES
        return min(server, MAX_MESSAGE_BYTES) - _HEADROOM

    def config(self) -> StreamConfig:
        """The stream's configuration."""
        return StreamConfig(
            name=self.stream,
            subjects=[self.subject],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            deny_delete=True,
            deny_purge=True,
            discard=DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_msg_size=MAX_MESSAGE_BYTES,
            allow_direct=True,
        )

    async def _ensure_stream(self, js: nats.js.JetStreamContext) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                try:
                    info = await js.stream_info(self.stream)
                except NotFoundError:
                    info = await js.add_stream(self.config())
                cfg = info.config
                if (
                    (cfg.num_replicas or 1) != self.replicas
                    or not cfg.deny_delete
                    or not cfg.deny_purge
                    or self.subject not in (cfg.subjects or [])
                    or cfg.storage != StorageType.FILE
                ):
                    raise BackendError(
                        f"stream {self.stream} exists with replicas={cfg.num_replicas} "
                        f"deny_delete={cfg.deny_delete} deny_purge={cfg.deny_purge} "
                        f"storage={cfg.storage} subjects={cfg.subjects}; expected "
                        f"replicas={self.replicas}, append-only, file storage, {self.subject}",
                        backend=NAME,
                    )
                return
            except (*_TRANSIENT, APIError) as exc:
                if isinstance(exc, APIError) and exc.err_code not in (None, 10008, 10074):
                    raise BackendError(f"stream {self.stream}: {exc}", backend=NAME) from exc
                if time.monotonic() > deadline:
                    raise LogUnavailableError(
                        f"stream {self.stream} unavailable: {exc!r}", backend=NAME
                    ) from exc
                await asyncio.sleep(0.25)

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Conditional, de-duplicated append; durable on a quorum when it returns.

        Raises LogConflictError when another writer took the position, LogUnavailableError
        when the stream cannot be reached in time, BackendError otherwise.
        """
        js = await self._js()
        if len(data) + len(msg_id) > self.max_message_bytes:
            raise BackendError(
                f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}",
                backend=NAME,
            )
        headers = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Sequence": str(expected_last_seq)}
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                ack = await js.publish(
                    self.subject,
                    data,
                    headers=headers,
                    stream=self.stream,
                    timeout=min(2.0, self.timeout),
                )
                return int(ack.seq)
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    actual = _actual_seq(exc.description)
                    raise LogConflictError(expected_last_seq, actual, backend=NAME) from exc
                in_process = DUPLICATE_IN_PROCESS in str(exc.description or "")
                if exc.code not in (503,) and not in_process:
                    raise BackendError(f"publish refused: {exc.description}", backend=NAME) from exc
                if time.monotonic() > deadline:
                    raise LogUnavailableError(
                        f"publish refused: {exc.description}", backend=NAME
                    ) from exc
            except _TRANSIENT as exc:
                # Retried with the same Nats-Msg-Id: if the first attempt was stored after all,
                # the server answers with its original sequence instead of storing it twice.
                if time.monotonic() > deadline:
                    raise LogUnavailableError(
                        f"publish not acknowledged within {self.timeout:.0f} s "
                        f"({type(exc).__name__})",
                        backend=NAME,
                    ) from exc
            await asyncio.sleep(0.1)
            if self._nc is None or self._nc.is_closed:
                js = await self._js()  # the client gave up on its connection: open a new one

    async def last_seq(self) -> int:
        """The stream's last sequence. Raises BackendError."""
        js = await self._js()
        try:
            info = await js.stream_info(self.stream)
        except (*_TRANSIENT, APIError) as exc:
            raise BackendError(f"stream info: {exc!r}", backend=NAME) from exc
        return int(info.state.last_seq)

    async def read(self, start_seq: int = 1) -> AsyncIterator[LogEntry]:
        """Every message from ``start_seq`` to the end at call time, via an ordered consumer.

        Raises BackendError.
        """
        last = await self.last_seq()
        start = max(start_seq, 1)
        if start > last:
            return
        js = await self._js()
        try:
            sub = await js.subscribe(
                self.subject,
                stream=self.stream,
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                ),
                pending_msgs_limit=4096,
            )
        except (*_TRANSIENT, APIError) as exc:
            raise BackendError(f"cannot read stream: {exc!r}", backend=NAME) from exc
        try:
            seq = start - 1
            while seq < last:
                try:
                    msg = await sub.next_msg(timeout=self.timeout)
                except NatsTimeoutError as exc:
                    raise BackendError(
                        f"stream read stalled after sequence {seq}", backend=NAME
                    ) from exc
                seq = int(msg.metadata.sequence.stream)
                yield LogEntry(seq, bytes(msg.data))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def stream_info(self) -> StreamConfig:
        """The stream's configuration as the server reports it. Raises BackendError."""
        js = await self._js()
        try:
            return (await js.stream_info(self.stream)).config
        except (*_TRANSIENT, APIError) as exc:
            raise BackendError(f"stream info: {exc!r}", backend=NAME) from exc

    async def ping(self) -> None:
        """Raise BackendError unless the stream answers."""
        await self.last_seq()

    async def close(self) -> None:
        """Drain and close the connection."""
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None


def _actual_seq(description: str | None) -> int | None:
    try:
        return int(str(description).rsplit(" ", 1)[-1])
    except ValueError:
        return None
