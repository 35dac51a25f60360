"""LogBackend contract: FileLog and JetStreamLog (3 replicas) behave alike."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.log_file import FileLog
from gateway.errors import BackendError, LogConflictError
from tests.gateway.backends.conftest import make_log


async def test_conditional_append_and_read(log: Any) -> None:
    assert await log.last_seq() == 0
    assert await log.append(b"a", expected_last_seq=0, msg_id="m1") == 1
    assert await log.append(b"b", expected_last_seq=1, msg_id="m2") == 2
    with pytest.raises(LogConflictError) as err:
        await log.append(b"c", expected_last_seq=1, msg_id="m3")
    assert err.value.expected == 1
    assert [(e.seq, e.data) async for e in log.read()] == [(1, b"a"), (2, b"b")]
    assert [e.data async for e in log.read(2)] == [b"b"]
    assert [e async for e in log.read(3)] == []
    assert await log.last_seq() == 2


async def test_msg_id_dedup_returns_original_sequence(log: Any) -> None:
    assert await log.append(b"a", expected_last_seq=0, msg_id="same") == 1
    assert await log.append(b"a", expected_last_seq=0, msg_id="same") == 1
    assert await log.last_seq() == 1


async def test_racing_appenders_exactly_one_wins_each_position(
    impl: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue("services") if impl == "production" else None
    first = make_log(impl, tmp_path, s)
    name = getattr(first, "stream", None)
    second = make_log(impl, tmp_path, s, name)
    try:
        await first.append(b"init", expected_last_seq=0, msg_id="init")
        results = await asyncio.gather(
            *(
                b.append(f"w{i}".encode(), expected_last_seq=1, msg_id=f"w{i}")
                for i, b in enumerate([first, second] * 3)
            ),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, int)]
        assert wins == [2]
        assert all(isinstance(r, LogConflictError) for r in results if not isinstance(r, int))
        assert await second.last_seq() == 2
    finally:
        await first.close()
        await second.close()


async def test_many_messages_read_in_order(log: Any) -> None:
    for i in range(300):
        await log.append(f"{i}".encode(), expected_last_seq=i, msg_id=f"id{i}")
    got = [int(e.data) async for e in log.read(101)]
    assert got == list(range(100, 300))


async def test_file_log_torn_tail_is_cut_and_corruption_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    log = FileLog(path=path)
    await log.append(b"first", expected_last_seq=0, msg_id="a")
    await log.append(b"second", expected_last_seq=1, msg_id="b")
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\x00\x00\x01\x00partial")  # a crash in the middle of a write
    reopened = FileLog(path=path)
    assert await reopened.last_seq() == 2
    assert path.stat().st_size == size
    data = bytearray(path.read_bytes())
    data[12] ^= 0x01  # inside the first record's body
    path.write_bytes(bytes(data))
    with pytest.raises(BackendError, match="at byte 0"):
        await FileLog(path=path).last_seq()


@pytest.mark.services
async def test_jetstream_stream_is_replicated_and_append_only(
    services: Any, tmp_path: Path
) -> None:
    log = make_log("production", tmp_path, services)
    try:
        await log.append(b"x", expected_last_seq=0, msg_id="x")
        cfg = await log.stream_info()
        assert cfg.num_replicas == 3 and cfg.deny_delete and cfg.deny_purge
        assert str(getattr(cfg.storage, "value", cfg.storage)) == "file"
    finally:
        await log.close()
