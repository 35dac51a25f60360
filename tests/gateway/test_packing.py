"""Packs: several ciphertexts in one block (pure helpers), and the pipeline's use of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends.blobs_local import LocalBlobStore
from gateway.errors import IntegrityError
from gateway.packing import PACK_MAX_BYTES, build_packs, cut, plan_packs
from gateway.pipeline import RecordInput
from gateway.runtime import Gateway
from tests.gateway.conftest import settings_for


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=40), st.integers(1, 1000))
def test_packs_hold_every_blob_once_in_order_within_the_limit(
    blobs: list[bytes], limit: int
) -> None:
    packs, where = build_packs(blobs, limit)
    assert len(where) == len(blobs)
    for blob, (n, byte_range) in zip(blobs, where, strict=True):
        assert cut(packs[n], byte_range) == blob
        if byte_range is None:
            assert packs[n] == blob
    for n, pack in enumerate(packs):
        members = [i for i, (m, _) in enumerate(where) if m == n]
        assert members == sorted(members) and members
        assert len(pack) <= limit or len(members) == 1
    # Order is kept across packs too.
    assert [n for n, _ in where] == sorted(n for n, _ in where)


def test_plan_packs_starts_a_new_pack_at_the_limit() -> None:
    assert plan_packs([400, 400, 400, 1500, 10], limit=1000) == [[0, 1], [2], [3], [4]]
    assert plan_packs([], limit=10) == []
    assert PACK_MAX_BYTES == 1024 * 1024


@pytest.mark.parametrize("byte_range", [(6, 10), (-1, 2), (0, 0), (14, 2)])
def test_cut_refuses_ranges_outside_the_block(byte_range: tuple[int, int]) -> None:
    assert cut(b"x" * 15, byte_range) is None


async def test_a_batch_is_one_block_and_each_record_reads_back(tmp_path: Path) -> None:
    gw = Gateway(settings_for("embedded", tmp_path / "gw"))
    await gw.start()
    try:
        patient = "ab" * 32
        inputs = [
            RecordInput(
                {"resourceType": "Observation", "id": f"o{i}", "status": "final", "x": "y" * i},
                patient,
            )
            for i in range(12)
        ]
        stored = await gw.pipeline.store(inputs)
        assert len({s.cid for s in stored}) == 1
        ranges = [s.byte_range for s in stored]
        assert all(r is not None for r in ranges)
        assert [r[0] for r in ranges if r] == sorted(r[0] for r in ranges if r)
        for i in range(12):
            read = await gw.pipeline.read("Observation", f"o{i}")
            assert read.resource["x"] == "y" * i
            assert read.anchor.byte_range == stored[i].byte_range
        # A range that no longer fits its block (the block was cut short) is an integrity
        # failure naming the record and the range, never a silent wrong read.
        store = gw.backends.blobs
        assert isinstance(store, LocalBlobStore)
        path = store.path_of(stored[0].cid)
        path.write_bytes(path.read_bytes()[: stored[-1].byte_range[0]])  # type: ignore[index]
        with pytest.raises(IntegrityError, match=rf"{stored[-1].cid} bytes \d+\+\d+"):
            await gw.pipeline.read("Observation", "o11")
        assert (await gw.pipeline.read("Observation", "o0")).resource["id"] == "o0"
    finally:
        await gw.stop()
