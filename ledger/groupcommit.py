"""Group commit: one backend call for the items of many concurrent callers.

:class:`GroupCommitter` queues the items of concurrent callers and hands them to a batch
function together (at most ``max_items`` items, waiting at most ``max_delay`` seconds for more
while a call is already in flight there is nothing to wait for: the next batch forms meanwhile).
Each caller gets back the results of its own items, or the exception of the batch call.
With ``concurrency`` above 1, up to that many batch calls run at once (for backends whose
writes are independent, like blob and key stores; never for the ledger, whose appends are
ordered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ledger.errors import GroupCommitStoppedError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]


def _expire(wake: asyncio.Future[bool]) -> None:
    if not wake.done():
        wake.set_result(False)


class GroupCommitter(Generic[T, R]):
    """Batches concurrent submissions into calls of ``fn``; ``fn`` returns one result per item."""

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        name: str,
        max_items: int = 256,
        max_delay: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._fn = fn
        self._slots = asyncio.Semaphore(concurrency)
        self._calls: set[asyncio.Task[None]] = set()
        self.name = name
        self._max_items = max_items
        self._max_delay = max_delay
        self._on_batch = on_batch
        self._pending: deque[_Waiting[T, R]] = deque()
        self._pending_items = 0
        self._wake: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching task (inside a running loop)."""
        self._task = asyncio.create_task(self._run(), name=f"group-commit-{self.name}")

    async def stop(self) -> None:
        """Stop the task; queued submissions and calls in flight fail with
        GroupCommitStoppedError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for call in list(self._calls):
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
        while self._pending:
            w = self._pending.popleft()
            if not w.future.done():
                w.future.set_exception(GroupCommitStoppedError(self.name))
        self._pending_items = 0

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue items and wait for their results. Raises whatever the batch call raised."""
        return await self.enqueue(items)

    def enqueue(self, items: Sequence[T]) -> asyncio.Future[list[R]]:
        """Queue items; the future gets their results or the batch call's exception. For a
        caller that waits on several things at once: no task per wait, as ``submit`` inside
        ``gather`` would cost. Raises GroupCommitStoppedError when the group commit is not
        running."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[R]] = loop.create_future()
        if not items:
            fut.set_result([])
            return fut
        if self._task is None or self._task.done():
            raise GroupCommitStoppedError(self.name)
        self._pending.append(_Waiting(list(items), fut))
        self._pending_items += len(items)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(True)
        return fut

    async def _more(self, timeout: float | None) -> bool:
        """Wait until something is submitted (True) or ``timeout`` seconds pass (False).
        A future and a timer rather than ``wait_for``: no task per wait."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[bool] = loop.create_future()
        self._wake = wake
        timer = None if timeout is None else loop.call_later(timeout, _expire, wake)
        try:
            return await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._more(None)
            # Wait at most max_delay for more, unless a full batch is already there.
            deadline = loop.time() + self._max_delay
            while self._pending_items < self._max_items:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._more(remaining):
                    break
            group = [self._pending.popleft()]
            count = len(group[0].items)
            while self._pending and count + len(self._pending[0].items) <= self._max_items:
                w = self._pending.popleft()
                group.append(w)
                count += len(w.items)
            self._pending_items -= count
            await self._slots.acquire()
            call = asyncio.create_task(self._call(group), name=f"group-commit-{self.name}-call")
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            if self._slots.locked():
                # Every slot busy: wait for one before forming the next batch, so that it
                # grows meanwhile (and with concurrency 1 batches are strictly sequential).
                await self._slots.acquire()
                self._slots.release()

    async def _call(self, group: list[_Waiting[T, R]]) -> None:
        try:
            items = [item for w in group for item in w.items]
            try:
                results = list(await self._fn(items))
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: batch returned {len(results)} results")
            except asyncio.CancelledError:
                for w in group:
                    if not w.future.done():
                        w.future.set_exception(GroupCommitStoppedError(self.name))
                raise
            except Exception as exc:
                for w in group:
                    if not w.future.done():
                        w.future.set_exception(exc)
                return
            if self._on_batch is not None:
                self._on_batch(len(items))
            pos = 0
            for w in group:
                if not w.future.done():
                    w.future.set_result(results[pos : pos + len(w.items)])
                pos += len(w.items)
        finally:
            self._slots.release()
