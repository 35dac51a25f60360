"""StateStore contract: MemoryStateStore and RedisStateStore."""

from __future__ import annotations

import asyncio
from typing import Any


async def test_get_set_delete(state: Any) -> None:
    assert await state.get("k") is None
    await state.set("k", b"v")
    assert await state.get("k") == b"v"
    await state.delete("k")
    assert await state.get("k") is None


async def test_set_if_absent_and_ttl(state: Any) -> None:
    assert await state.set_if_absent("n", b"1", ttl=0.3)
    assert not await state.set_if_absent("n", b"2")
    assert await state.get("n") == b"1"
    await asyncio.sleep(0.5)
    assert await state.get("n") is None
    assert await state.set_if_absent("n", b"3")


async def test_incr(state: Any) -> None:
    assert await state.incr("c") == 1
    assert await state.incr("c", 5) == 6
    await state.ping()


async def test_incr_ttl_is_set_on_creation_only(state: Any) -> None:
    assert await state.incr("t", ttl=0.3) == 1
    assert await state.incr("t", ttl=100) == 2  # does not extend the first TTL
    await asyncio.sleep(0.5)
    assert await state.get("t") is None
    await state.set("plain", b"x", ttl=None)
    assert await state.get("plain") == b"x"


async def test_values_are_bytes_and_keys_are_isolated(state: Any) -> None:
    await state.set("a", b"\x00\xff")
    assert await state.get("a") == b"\x00\xff"
    assert await state.get("b") is None
