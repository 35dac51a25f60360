"""Every test double of the suite, in one place.

Pure unit tests use these in-memory stand-ins; adapters are always tested on the real services
(tests/services). Each double keeps the semantics of the protocol it stands in for:

- :class:`MemoryLog`: ``LogBackend`` in memory (conditional append, msg-id de-duplication);
  :class:`FlakyLog` and :class:`CancellationSwallowingLog` inject failures into it.
- :class:`FailingBlobs`, :class:`FailingLog`: wrap a real backend and fail while ``down``
  (an outage).
- :class:`Router`: an httpx transport that routes ``http://<name>/...`` to that gateway's ASGI
  app (gateways talking to each other in one process).
- :func:`record_fsyncs`: records which files ``os.fsync`` is called on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from gateway.backends.protocols import BlobStore, LogBackend, LogEntry
from gateway.errors import BackendError, LogConflictError, LogUnavailableError


class MemoryLog:
    """Conditional append + msg-id dedup, in memory; ``delay`` widens race windows."""

    name = "memory"

    def __init__(self, delay: float = 0.0) -> None:
        self.messages: list[bytes] = []
        self.ids: dict[str, int] = {}
        self.delay = delay

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Append if the last sequence is ``expected_last_seq``. Raises LogConflictError."""
        await asyncio.sleep(self.delay)
        if msg_id in self.ids:
            return self.ids[msg_id]
        if expected_last_seq != len(self.messages):
            raise LogConflictError(expected_last_seq, len(self.messages), backend="memory")
        self.messages.append(data)
        self.ids[msg_id] = len(self.messages)
        return len(self.messages)

    async def last_seq(self) -> int:
        """The last sequence (0 when empty). Raises nothing."""
        return len(self.messages)

    async def read(self, start_seq: int = 1) -> AsyncIterator[LogEntry]:
        """The messages from ``start_seq`` on. Raises nothing."""
        for i in range(start_seq - 1, len(self.messages)):
            yield LogEntry(i + 1, self.messages[i])

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""


class FlakyLog(MemoryLog):
    """Fails the next ``fail`` appends as unavailable (the sequencer retries); with ``land`` the
    failed append is stored anyway (an acknowledgement lost on the way back); with ``final``
    the failure is another error (the sequencer does not retry it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.land = False
        self.final = False
        self.calls = 0

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Raises LogUnavailableError (BackendError with ``final``) while failing, else as
        :meth:`MemoryLog.append`."""
        self.calls += 1
        if self.fail:
            self.fail -= 1
            if self.land:
                await super().append(data, expected_last_seq=expected_last_seq, msg_id=msg_id)
            if self.final:
                raise BackendError("message refused", backend="flaky")
            raise LogUnavailableError("leader lost", backend="flaky")
        return await super().append(data, expected_last_seq=expected_last_seq, msg_id=msg_id)


class CancellationSwallowingLog(MemoryLog):
    """``last_seq`` swallows a cancellation that arrives while it waits for its answer, as
    Python 3.11's ``wait_for`` inside the NATS client does; ``inside`` is set once it waits."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = asyncio.Event()

    async def last_seq(self) -> int:
        """The last sequence, after a short wait that ignores cancellation. Raises nothing."""
        self.inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        return await super().last_seq()


class FailingBlobs:
    """Wraps a BlobStore; fails every put while ``down`` (a backend outage)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner, self.down, self.name = inner, True, "failing"

    async def put_many(self, blocks: Sequence[bytes]) -> list[str]:
        """Raises BackendError while down, else stores in the wrapped store."""
        if self.down:
            raise BackendError("injected outage", backend="failing")
        return await self.inner.put_many(blocks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FailingLog:
    """Wraps a LogBackend; fails every append while ``down`` (the ledger's log is out)."""

    def __init__(self, inner: LogBackend) -> None:
        self.inner, self.down, self.name = inner, False, "failing-log"

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Raises BackendError while down, else appends to the wrapped log."""
        if self.down:
            raise BackendError("injected outage", backend="failing-log")
        return await self.inner.append(data, expected_last_seq=expected_last_seq, msg_id=msg_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Router(httpx.AsyncBaseTransport):
    """Routes ``http://<name>/...`` to that gateway's ASGI app; unknown or 'down' hosts fail."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()
        self.delay: dict[str, float] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The app's answer. Raises httpx.ConnectError for a host that is down or unknown."""
        host = request.url.host
        if host in self.down or host not in self.apps:
            raise httpx.ConnectError(f"{host} is down", request=request)
        if host in self.delay:
            await asyncio.sleep(self.delay[host])
        return await self.apps[host].handle_async_request(request)


Inode = tuple[int, int]


def inode(path: str | os.PathLike[str]) -> Inode:
    """(device, inode) of a path, to compare with :func:`record_fsyncs`. Raises OSError."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Inode]:
    """From now on, the (device, inode) of every descriptor ``os.fsync`` is called on, in
    order (the fsync itself still happens). Raises nothing."""
    calls: list[Inode] = []
    real: Callable[[int], None] = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        calls.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls
