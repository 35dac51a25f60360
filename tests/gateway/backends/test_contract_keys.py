"""KeyStore contract: FileKeyStore and RedisKeyStore."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.keys_file import FileKeyStore
from gateway.backends.protocols import WrappedKey
from gateway.errors import BackendError, KeyDestroyedError, KeyNotFoundError
from tests.gateway.backends.conftest import MASTER, make_keys


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


async def test_a_destroyed_patient_key_is_replaced_by_a_new_one(
    impl: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue("services") if impl == "production" else None
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    keys = make_keys(impl, tmp_path, s, prefix)
    kid, kek = await keys.kek_for("z" * 64)
    await keys.destroy_kek("z" * 64)
    with pytest.raises(KeyNotFoundError):
        await keys.destroy_kek("z" * 64)  # nothing live left to destroy
    new_kid, new_kek = await keys.kek_for("z" * 64)
    assert new_kid != kid and new_kek != kek
    assert await keys.kek_for("z" * 64) == (new_kid, new_kek)
    with pytest.raises(KeyDestroyedError):
        await keys.kek_by_id(kid)  # the old one stays destroyed
    await keys.close()
    again = make_keys(impl, tmp_path, s, prefix)  # and so after a reload
    assert await again.kek_for("z" * 64) == (new_kid, new_kek)
    with pytest.raises(KeyDestroyedError):
        await again.kek_by_id(kid)
    await again.close()


async def test_destroying_wrapped_data_keys_leaves_the_others(
    impl: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue("services") if impl == "production" else None
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    keys = make_keys(impl, tmp_path, s, prefix)
    kid, _ = await keys.kek_for("w" * 64)
    await keys.put_wrapped_keys([WrappedKey(f"rec{n}", kid, b"wrapped-%d" % n) for n in range(5)])
    assert await keys.destroy_wrapped_keys(["rec1", "rec3", "rec1", "never"]) == 2
    assert await keys.destroy_wrapped_keys(["rec1"]) == 0
    await keys.close()
    again = make_keys(impl, tmp_path, s, prefix)
    for n in (1, 3):
        with pytest.raises(KeyNotFoundError):
            await again.get_wrapped_key(f"rec{n}")
    for n in (0, 2, 4):
        assert (await again.get_wrapped_key(f"rec{n}")).wrapped == b"wrapped-%d" % n
    await again.kek_by_id(kid)  # the patient's KEK is untouched
    if s is None:
        data = (tmp_path / "keys.jsonl").read_bytes()
        assert b'"rec1"' not in data and b'"rec3"' not in data and b'"rec2"' in data
    await again.close()


async def test_kek_ids_do_not_reveal_the_pseudonym(keys: Any) -> None:
    a, _ = await keys.kek_for("a" * 64)
    b, _ = await keys.kek_for("b" * 64)
    assert a != b and "a" * 16 not in a and len(a) >= 32


async def test_file_key_store_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    first = FileKeyStore(path=path, master_key=MASTER)
    kid, kek = await first.kek_for("p" * 64)
    with path.open("ab") as f:
        f.write(b'{"t":"dk","rec":"torn","ke')  # crash in the middle of an append
    again = FileKeyStore(path=path, master_key=MASTER)
    assert await again.kek_for("p" * 64) == (kid, kek)
    await again.put_wrapped_keys([WrappedKey("r2", kid, b"w")])
    third = FileKeyStore(path=path, master_key=MASTER)
    assert await third.get_wrapped_key("r2") == WrappedKey("r2", kid, b"w")
    with pytest.raises(KeyNotFoundError):
        await third.get_wrapped_key("torn")


async def test_wrong_master_key_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    kid, _ = await FileKeyStore(path=path, master_key=MASTER).kek_for("p" * 64)
    with pytest.raises(BackendError, match=kid):
        await FileKeyStore(path=path, master_key=bytes(32)).kek_by_id(kid)
