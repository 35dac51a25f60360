"""GroupCommitter: batching, per-caller results, errors, and calls in flight."""

from __future__ import annotations

import asyncio

import pytest

from ledger.errors import GroupCommitStoppedError
from ledger.groupcommit import GroupCommitter


async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    gc: GroupCommitter[int, int] = GroupCommitter(double, name="t", max_delay=0.005)
    gc.start()
    try:
        results = await asyncio.gather(*(gc.submit([i, i + 100]) for i in range(20)))
    finally:
        await gc.stop()
    assert results == [[2 * i, 2 * (i + 100)] for i in range(20)]
    assert len(batches) < 20, "callers were not grouped"
    assert sorted(i for b in batches for i in b) == sorted([*range(20), *range(100, 120)])


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_calls_in_flight_never_exceed_concurrency(concurrency: int) -> None:
    in_flight = peak = 0

    async def slow(items: list[int]) -> list[int]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(
        slow, name="t", max_items=2, max_delay=0.001, concurrency=concurrency
    )
    gc.start()
    try:
        results = await asyncio.gather(*(gc.submit([i]) for i in range(24)))
    finally:
        await gc.stop()
    assert results == [[i] for i in range(24)]
    assert peak == concurrency


async def test_a_failing_batch_fails_only_its_callers() -> None:
    async def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(fn, name="t", max_items=1, concurrency=2)
    gc.start()
    try:
        results = await asyncio.gather(
            *(gc.submit([i]) for i in (1, 13, 2)), return_exceptions=True
        )
    finally:
        await gc.stop()
    assert results[0] == [1] and results[2] == [2]
    assert isinstance(results[1], ValueError)


async def test_stop_fails_calls_in_flight_and_rejects_new_ones() -> None:
    started = asyncio.Event()

    async def never(items: list[int]) -> list[int]:
        started.set()
        await asyncio.sleep(3600)
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(never, name="t", concurrency=2)
    gc.start()
    pending = asyncio.create_task(gc.submit([1]))
    await started.wait()
    await gc.stop()
    with pytest.raises(GroupCommitStoppedError):
        await pending
    with pytest.raises(GroupCommitStoppedError, match="not running"):
        await gc.submit([2])
    with pytest.raises(ValueError):
        GroupCommitter(never, name="t", concurrency=0)


async def test_enqueue_gives_a_future_per_caller() -> None:
    async def square(items: list[int]) -> list[int]:
        return [i * i for i in items]

    gc: GroupCommitter[int, int] = GroupCommitter(square, name="t", max_delay=0.001)
    with pytest.raises(GroupCommitStoppedError, match="not running"):
        gc.enqueue([1])
    gc.start()
    try:
        futures = [gc.enqueue([i]) for i in range(10)]
        assert all(isinstance(f, asyncio.Future) for f in futures)
        empty = gc.enqueue([])
        assert empty.done() and empty.result() == []
        assert await asyncio.gather(*futures) == [[i * i] for i in range(10)]
    finally:
        await gc.stop()
