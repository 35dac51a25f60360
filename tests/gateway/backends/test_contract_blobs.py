"""BlobStore contract: LocalBlobStore and KuboBlobStore behave alike, with identical CIDs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.blobs_kubo import KuboBlobStore
from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.cid import cid_v1_raw, parse_cid
from gateway.errors import BlobNotFoundError


async def test_put_many_then_get(blobs: Any) -> None:
    data = [os.urandom(n) for n in (1, 100, 70_000)] + [b""]
    cids = await blobs.put_many(data)
    assert cids == [cid_v1_raw(d) for d in data]
    for cid, d in zip(cids, data, strict=True):
        assert await blobs.get(cid) == d
    assert await blobs.put_many([data[0]]) == [cids[0]]  # idempotent


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
        assert await local.put_many(ciphertexts) == await kubo.put_many(ciphertexts)
        for cid in await local.put_many(ciphertexts):
            assert await kubo.is_pinned(cid)
    finally:
        await kubo.close()
