"""BlobStore contract: LocalBlobStore and KuboBlobStore behave alike, with identical CIDs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backends.blobs_kubo import KuboBlobStore
from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.car import iter_car
from gateway.backends.cid import cid_v1_raw, parse_cid
from gateway.errors import BackendError, BlobNotFoundError, InvalidInputError


async def test_put_many_then_get(blobs: Any) -> None:
    data = [os.urandom(n) for n in (1, 100, 70_000)] + [b""]
    cids = await blobs.put_many(data)
    assert cids == [cid_v1_raw(d) for d in data]
    for cid, d in zip(cids, data, strict=True):
        assert await blobs.get(cid) == d
    assert await blobs.put_many([data[0]]) == [cids[0]]  # idempotent
    assert await blobs.put_many([b""]) == [cids[-1]]  # a lone block, and an empty one


async def test_missing_block(blobs: Any) -> None:
    with pytest.raises(BlobNotFoundError) as err:
        await blobs.get(cid_v1_raw(os.urandom(16)))
    assert err.value.cid.startswith("b")


async def test_ping(blobs: Any) -> None:
    await blobs.ping()


def test_cid_shape() -> None:
    cid = cid_v1_raw(b"hello")
    assert cid == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert len(parse_cid(cid)) == 32


@pytest.mark.services
async def test_local_and_kubo_give_the_same_cid(services: Any, tmp_path: Path) -> None:
    ciphertexts = [os.urandom(300) for _ in range(20)]
    local = LocalBlobStore(directory=tmp_path / "b")
    kubo = KuboBlobStore(base_url=services.kubo_url)
    try:
        cids = await local.put_many(ciphertexts)
        assert cids == await kubo.put_many(ciphertexts)
        for cid, data in zip(cids, ciphertexts, strict=True):
            assert await kubo.get(cid) == data
        assert await kubo.is_pinned(cids[0], indirect=True)  # through the batch root
    finally:
        await kubo.close()


@pytest.mark.services
async def test_kubo_batches_survive_garbage_collection(services: Any) -> None:
    """Every block of a batch is kept by the batch root's recursive pin, a lone block by its
    own: a ``repo/gc`` (which removes every unpinned block) leaves them all readable, while an
    unpinned block goes."""
    kubo = KuboBlobStore(base_url=services.kubo_url, timeout=120)
    try:
        blocks = [os.urandom(n) for n in (10, 5000, 70_000)]
        cids = await kubo.put_many(blocks)
        lone = os.urandom(90_000)  # a lone block (a pack) is written with a pin of its own
        (lone_cid,) = await kubo.put_many([lone])
        assert await kubo.is_pinned(lone_cid)
        loose = os.urandom(64)
        r = await kubo._client.post(
            "/block/put", params={"cid-codec": "raw", "pin": "false"}, files={"f": loose}
        )
        assert r.status_code == 200 and await kubo.get(cid_v1_raw(loose)) == loose
        gc = await kubo._client.post("/repo/gc", timeout=120)
        assert gc.status_code == 200, gc.text[:200]
        for cid, data in zip(cids, blocks, strict=True):
            assert await kubo.get(cid) == data
        assert await kubo.get(lone_cid) == lone
        assert not await kubo.is_pinned(cids[0]), "a block must not need a pin of its own"
        with pytest.raises(BlobNotFoundError):
            await kubo.get(cid_v1_raw(loose))
    finally:
        await kubo.close()


async def test_duplicates_within_one_batch(blobs: Any) -> None:
    a, b = os.urandom(40), os.urandom(41)
    assert await blobs.put_many([a, b, a]) == [cid_v1_raw(a), cid_v1_raw(b), cid_v1_raw(a)]
    assert await blobs.get(cid_v1_raw(a)) == a


async def test_a_block_over_two_mebibytes(blobs: Any) -> None:
    big = os.urandom(3 * 1024 * 1024)
    (cid,) = await blobs.put_many([big])
    assert await blobs.get(cid) == big


async def test_not_a_cid_is_not_found(blobs: Any) -> None:
    with pytest.raises(BlobNotFoundError):
        await blobs.get("bnot-a-cid")


def test_parse_cid_rejects_other_cids() -> None:
    with pytest.raises(InvalidInputError):
        parse_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")  # CIDv0
    with pytest.raises(InvalidInputError):
        parse_cid("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")  # dag-pb


async def test_car_export_round_trips(tmp_path: Path) -> None:
    store = LocalBlobStore(directory=tmp_path / "b")
    blocks = [os.urandom(n) for n in (0, 5, 300, 70_000)]
    cids = await store.put_many(blocks)
    size = await store.export_car(tmp_path / "x.car", cids)
    data = (tmp_path / "x.car").read_bytes()
    assert size == len(data)
    assert list(iter_car(data)) == list(zip(cids, blocks, strict=True))
    with pytest.raises(BlobNotFoundError):
        await store.export_car(tmp_path / "y.car", [cid_v1_raw(b"absent")])


@pytest.mark.services
async def test_local_car_imports_into_kubo_with_the_same_cids_pinned(
    services: Any, tmp_path: Path
) -> None:
    local = LocalBlobStore(directory=tmp_path / "b")
    kubo = KuboBlobStore(base_url=services.kubo_url)
    try:
        blocks = [os.urandom(200) for _ in range(5)]
        cids = await local.put_many(blocks)
        await local.export_car(tmp_path / "x.car", cids)
        assert sorted(await kubo.import_car((tmp_path / "x.car").read_bytes())) == sorted(cids)
        for cid, data in zip(cids, blocks, strict=True):
            assert await kubo.is_pinned(cid)
            assert await kubo.get(cid) == data
    finally:
        await kubo.close()


async def test_kubo_unreachable_is_a_backend_error() -> None:
    kubo = KuboBlobStore(base_url="http://127.0.0.1:1", timeout=1)
    try:
        with pytest.raises(BackendError) as err:
            await kubo.ping()
        assert err.value.backend == "kubo"
        with pytest.raises(BackendError):
            await kubo.put_many([b"x"])
    finally:
        await kubo.close()


async def test_kubo_storing_a_lone_block_under_another_cid_is_an_error() -> None:
    """A Kubo that reports another CID for a block than the one computed here (another hash,
    another codec) fails the write: such a block is never acknowledged."""

    def kubo(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v0/block/put"
        assert request.url.params["pin"] == "true"
        return httpx.Response(200, json={"Key": cid_v1_raw(b"something else"), "Size": 5})

    store = KuboBlobStore(base_url="http://kubo.invalid", transport=httpx.MockTransport(kubo))
    try:
        with pytest.raises(BackendError, match="instead of"):
            await store.put_many([b"the block"])
    finally:
        await store.close()
