"""KeyStore contract: FileKeyStore and RedisKeyStore."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.protocols import WrappedKey
from gateway.errors import KeyDestroyedError, KeyNotFoundError
from tests.gateway.backends.conftest import make_keys


async def test_kek_is_stable_and_reloads(
    impl: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue("services") if impl == "production" else None
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    first = make_keys(impl, tmp_path, s, prefix)
    kid, kek = await first.kek_for("p" * 64)
    assert len(kek) == 32
    assert await first.kek_for("p" * 64) == (kid, kek)
    await first.put_wrapped_keys([WrappedKey("r1.1", kid, b"wrapped")])
    await first.close()
    again = make_keys(impl, tmp_path, s, prefix)
    assert await again.kek_for("p" * 64) == (kid, kek)
    assert await again.get_wrapped_key("r1.1") == WrappedKey("r1.1", kid, b"wrapped")
    await again.close()


async def test_concurrent_first_use_agrees(keys: Any) -> None:
    results = await asyncio.gather(*(keys.kek_for("q" * 64) for _ in range(10)))
    assert len(set(results)) == 1


async def test_destroy_is_crypto_shredding(keys: Any, tmp_path: Path) -> None:
    kid, _ = await keys.kek_for("d" * 64)
    assert await keys.destroy_kek("d" * 64) == kid
    with pytest.raises(KeyDestroyedError):
        await keys.kek_by_id(kid)
    with pytest.raises(KeyNotFoundError):
        await keys.get_wrapped_key("nothing")
    if hasattr(keys, "path"):
        assert kid.encode() in keys.path.read_bytes()  # only the tombstone is left
        assert b'"t":"kek"' not in keys.path.read_bytes()
