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


async def test_claim_many_sets_only_the_absent_and_returns_what_was_there(state: Any) -> None:
    await state.set("taken", b"old")
    got = await state.claim_many([("free", b"a", 0.3), ("taken", b"b", None), ("free", b"c", None)])
    # The second claim of "free" in the same batch sees the first one's value.
    assert got == [None, b"old", b"a"]
    assert await state.get("free") == b"a" and await state.get("taken") == b"old"
    await asyncio.sleep(0.5)
    assert await state.get("free") is None, "the TTL of a claim was not applied"
    assert await state.claim_many([]) == []


async def test_set_many_overwrites_with_ttls(state: Any) -> None:
    await state.set("x", b"0")
    await state.set_many([("x", b"1", None), ("y", b"2", 0.3)])
    assert (await state.get("x"), await state.get("y")) == (b"1", b"2")
    await asyncio.sleep(0.5)
    assert await state.get("y") is None and await state.get("x") == b"1"


async def test_replace_if_is_a_compare_and_set(state: Any) -> None:
    assert not await state.replace_if("cas", b"x", b"y"), "an absent key was replaced"
    assert await state.get("cas") is None
    await state.set("cas", b"old")
    assert not await state.replace_if("cas", b"other", b"new")
    assert await state.get("cas") == b"old"
    assert await state.replace_if("cas", b"old", b"new", ttl=0.3)
    assert await state.get("cas") == b"new"
    assert not await state.replace_if("cas", b"old", b"newer"), "replaced twice"
    await asyncio.sleep(0.5)
    assert await state.get("cas") is None, "the TTL of a replacement was not applied"


async def test_replace_if_is_guarded_by_the_absence_of_another_key(state: Any) -> None:
    await state.set("claim", b"owner-a")
    await state.set("alive:a", b"1", ttl=0.3)
    assert not await state.replace_if("claim", b"owner-a", b"owner-b", unless_exists="alive:a")
    assert await state.get("claim") == b"owner-a"
    await asyncio.sleep(0.5)  # the owner's liveness lock lapsed
    assert await state.replace_if("claim", b"owner-a", b"owner-b", unless_exists="alive:a")
    assert await state.get("claim") == b"owner-b"


async def test_replace_if_lets_exactly_one_of_concurrent_takers_win(state: Any) -> None:
    await state.set("race", b"dead")
    won = await asyncio.gather(
        *(state.replace_if("race", b"dead", b"t%d" % i, unless_exists="gone") for i in range(8))
    )
    assert sum(won) == 1
    assert await state.get("race") == b"t%d" % won.index(True)
