"""LogBackend contract: FileLog and JetStreamLog (3 replicas) behave alike."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.log_file import FileLog
from gateway.backends.log_jetstream import JetStreamLog
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


async def test_reads_while_appending_see_each_record_once(log: Any) -> None:
    """A reader that runs beside the writer (the ledger's follower does) never sees a record
    twice, out of order, or half written, and the writer's positions stay exact."""
    count = 60
    stop = asyncio.Event()
    seen_max = 0

    async def writer() -> None:
        for i in range(count):
            assert await log.append(f"r{i}".encode(), expected_last_seq=i, msg_id=f"m{i}") == i + 1
        stop.set()

    async def reader() -> None:
        nonlocal seen_max
        while not stop.is_set():
            entries = [(e.seq, e.data) async for e in log.read()]
            assert entries == [(n + 1, f"r{n}".encode()) for n in range(len(entries))]
            seen_max = max(seen_max, len(entries))
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader(), reader())
    assert [e.data async for e in log.read()] == [f"r{i}".encode() for i in range(count)]
    assert await log.last_seq() == count
    assert seen_max > 0


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
        assert cfg.max_msg_size == 8 * 1024 * 1024
        # The harness raises the servers' max_payload to 8 MiB so large batches fit.
        assert log.max_message_bytes == 8 * 1024 * 1024 - 512
    finally:
        await log.close()


async def test_file_log_damaged_length_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    log = FileLog(path=path)
    for i in range(5):
        await log.append(b"x" * 50, expected_last_seq=i, msg_id=f"m{i}")
    original = path.read_bytes()
    second = log.records()[1].offset
    data = bytearray(original)
    data[second + 1] ^= 0x10  # the length of record 2 now points past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(BackendError, match=f"at byte {second}") as err:
        await FileLog(path=path).last_seq()
    assert "length is damaged" in str(err.value)
    assert path.stat().st_size == len(original)  # nothing was cut away


async def test_file_log_zero_filled_tail_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    log = FileLog(path=path)
    await log.append(b"a", expected_last_seq=0, msg_id="a")
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(bytes(64))
    with pytest.raises(BackendError, match=f"at byte {size}"):
        await FileLog(path=path).last_seq()


async def test_file_log_torn_tail_then_append_continues(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    log = FileLog(path=path)
    await log.append(b"one", expected_last_seq=0, msg_id="1")
    full = path.read_bytes()
    await log.append(b"two" * 100, expected_last_seq=1, msg_id="2")
    torn = path.read_bytes()[: len(full) + 40]  # the second append crashed after 40 bytes
    path.write_bytes(torn)
    again = FileLog(path=path)
    assert await again.append(b"two'", expected_last_seq=1, msg_id="2b") == 2
    assert [e.data async for e in FileLog(path=path).read()] == [b"one", b"two'"]
    assert [r.msg_id for r in again.records()] == ["1", "2b"]


async def test_two_file_log_instances_share_one_file_safely(tmp_path: Path) -> None:
    path = tmp_path / "log.bin"
    a, b = FileLog(path=path), FileLog(path=path)
    await a.append(b"a1", expected_last_seq=0, msg_id="a1")
    with pytest.raises(LogConflictError) as err:
        await b.append(b"b1", expected_last_seq=0, msg_id="b1")
    assert err.value.actual == 1
    assert await b.append(b"a1", expected_last_seq=0, msg_id="a1") == 1  # dedup seen by b
    assert await b.append(b"b2", expected_last_seq=1, msg_id="b2") == 2
    assert [e.data async for e in a.read(2)] == [b"b2"]


async def test_conflict_reports_the_actual_last_sequence(log: Any) -> None:
    for i in range(3):
        await log.append(b"m", expected_last_seq=i, msg_id=f"a{i}")
    with pytest.raises(LogConflictError) as err:
        await log.append(b"late", expected_last_seq=1, msg_id="late")
    assert (err.value.expected, err.value.actual) == (1, 3)
    assert await log.last_seq() == 3


async def test_large_message_round_trips(log: Any) -> None:
    big = bytes(range(256)) * 3600  # 900 KiB: within even a default NATS max_payload
    assert log.max_message_bytes > len(big)
    assert await log.append(big, expected_last_seq=0, msg_id="big") == 1
    assert [e.data async for e in log.read()] == [big]


@pytest.mark.services
async def test_jetstream_refuses_a_stream_that_is_not_append_only(services: Any) -> None:
    import nats
    from nats.js.api import StreamConfig

    name = f"LOOSE{uuid.uuid4().hex[:8].upper()}"
    nc = await nats.connect(servers=services.nats_urls)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name=name, subjects=[f"alliance.ledger.{name.lower()}"], num_replicas=3)
        )
        log = JetStreamLog(servers=services.nats_urls, stream=name, replicas=3)
        with pytest.raises(BackendError, match="deny_delete=False"):
            await log.ping()
        await log.close()
        await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.mark.services
async def test_jetstream_unreachable_is_a_backend_error() -> None:
    log = JetStreamLog(servers=["nats://127.0.0.1:1"], stream="NOWHERE", timeout=1)
    with pytest.raises(BackendError) as err:
        await log.ping()
    assert err.value.backend == "jetstream"
    await log.close()
