"""De-duplication of HL7 v2 messages (gateway/hl7/dedup.py) on both state stores: copies during
the recording of an acceptance, and claims left behind by a dead gateway process.

The production parameter runs on the real Redis (each test under its own key prefix).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from gateway.backends.protocols import StateItem
from gateway.backends.state_memory import MemoryStateStore
from gateway.backends.state_redis import RedisStateStore
from gateway.hl7.dedup import (
    Conflict,
    Deduplicator,
    InProgress,
    New,
    Replay,
    _key,
    liveness_key,
)

STORES = [pytest.param("memory"), pytest.param("redis", marks=pytest.mark.services)]


@pytest.fixture(params=STORES)
async def state(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        store: Any = MemoryStateStore()
    else:
        services = request.getfixturevalue("services")
        store = RedisStateStore(url=services.redis_url, prefix=f"dd{uuid.uuid4().hex[:8]}:")
    yield store
    await store.close()


class SlowSets:
    """Wraps a StateStore; ``set_many`` (the recording of acceptances) waits for ``go``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.go = inner, asyncio.Event()

    async def set_many(self, items: Sequence[StateItem]) -> None:
        await asyncio.wait_for(self.go.wait(), 10)
        await self.inner.set_many(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_copy_during_the_recording_of_the_acceptance_is_answered_from_memory(
    state: Any,
) -> None:
    """Before the fix ``_recording`` was filled but never read: the copy got InProgress (AE)."""
    slow = SlowSets(state)
    dedup = Deduplicator(slow, instance="gw-a")
    await dedup.start()
    try:
        assert await dedup.begin("HOSPA", "C-1", "h1") == New()
        acks = (b"MSH|...\rMSA|AA|C-1\r",)
        recorded = dedup.record("HOSPA", "C-1", "h1", acks)
        await asyncio.sleep(0.05)
        assert not recorded.done(), "the acceptance was recorded before the copy arrived"
        assert await dedup.begin("HOSPA", "C-1", "h1") == Replay(acks)
        assert await dedup.begin("HOSPA", "C-1", "other") == Conflict()
        slow.go.set()
        await asyncio.wait_for(recorded, 10)
        assert await dedup.begin("HOSPA", "C-1", "h1") == Replay(acks)  # now from the store
    finally:
        slow.go.set()
        await dedup.stop()


async def test_own_claim_of_an_earlier_boot_is_taken_over_at_once(state: Any) -> None:
    """A gateway killed (no stop, its liveness lock still fresh) and restarted under the same
    instance id takes over its own claims without waiting for them or the lock to expire."""
    before = Deduplicator(state, instance="gw-a", epoch=1, liveness_ttl=60)
    await before.start()
    assert await before.begin("HOSPA", "C-2", "h") == New()
    # SIGKILL: nothing is released; the lock would live on for a minute.
    assert await state.get(liveness_key("gw-a", 1)) is not None
    after = Deduplicator(state, instance="gw-a", epoch=2)
    await after.start()
    try:
        assert await after.begin("HOSPA", "C-2", "h") == New(taken_over=True)
        # Taken over once: a further copy now sees the new owner's (live) claim.
        assert await after.begin("HOSPA", "C-2", "h") == InProgress()
        claim = orjson.loads(await state.get(_key("HOSPA", "C-2")))
        assert (claim["i"], claim["e"]) == ("gw-a", 2)
    finally:
        await after.stop()
        await before.stop()


async def test_claim_of_another_live_gateway_is_respected_and_of_a_dead_one_taken(
    state: Any,
) -> None:
    other = Deduplicator(state, instance="gw-b", epoch=5, liveness_ttl=0.6)
    await other.start()
    assert await other.begin("HOSPA", "C-3", "h") == New()
    me = Deduplicator(state, instance="gw-a", epoch=7)
    await me.start()
    try:
        # gw-b is alive (its heartbeat refreshes the lock): its message is in progress.
        await asyncio.sleep(1.0)
        assert await me.begin("HOSPA", "C-3", "h") == InProgress()
        assert await me.begin("HOSPA", "C-3", "different") == Conflict()
        # gw-b dies without a word: its heartbeat stops and its lock lapses.
        assert other._heartbeat is not None
        other._heartbeat.cancel()
        await asyncio.sleep(1.0)
        assert await state.get(liveness_key("gw-b", 5)) is None
        assert await me.begin("HOSPA", "C-3", "h") == New(taken_over=True)
    finally:
        await me.stop()
        await other.stop()


async def test_one_of_two_gateways_takes_over_a_dead_claim(state: Any) -> None:
    dead = Deduplicator(state, instance="gw-dead", epoch=1)
    await dead.start()
    assert await dead.begin("HOSPA", "C-4", "h") == New()
    await dead.stop()  # a clean stop drops the lock: its claims can be taken over at once
    a = Deduplicator(state, instance="gw-a", epoch=2)
    b = Deduplicator(state, instance="gw-b", epoch=3)
    await a.start()
    await b.start()
    try:
        results = await asyncio.gather(a.begin("HOSPA", "C-4", "h"), b.begin("HOSPA", "C-4", "h"))
        assert sorted(map(repr, results)) == sorted(
            [repr(New(taken_over=True)), repr(InProgress())]
        )
    finally:
        await a.stop()
        await b.stop()


async def test_stop_releases_the_liveness_lock(state: Any) -> None:
    dedup = Deduplicator(state, instance="gw-a", epoch=9)
    await dedup.start()
    assert await state.get(liveness_key("gw-a", 9)) == b"1"
    await dedup.stop()
    assert await state.get(liveness_key("gw-a", 9)) is None
