"""The ledger on a real 3-node NATS JetStream cluster, under faults (marker ``services``).

Each "gateway" here is a Ledger with its own JetStreamLog connection (its own client, first
server rotated), sharing one R3 stream, exactly as institutions' gateways share it. Node control
comes from the session fixture ``services`` (tests/services/harness.py); every test restarts the
nodes it stopped, so the session's cluster is whole again afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.api.ledger import build_router
from gateway.datadir import DataDir
from gateway.witness_service import WitnessService
from ledger.keys import Signer, TrustedKeys
from ledger.merkle import leaf_hash
from ledger.sequencer import Ledger, LedgerUnavailableError
from ledger.stored_tree import TreeStore
from ledger.witness import is_final
from tests.fakes import Router
from tests.gateway.test_ledger_witness import Node

pytestmark = pytest.mark.services

SIGNERS = {n: Signer.generate(n) for n in ("hosp-a", "hosp-b", "hosp-c")}
TRUST = TrustedKeys.of(SIGNERS.values())


@dataclass
class Stream:
    """Gateways on one fresh stream, and what they acknowledged."""

    name: str
    ledgers: list[Ledger]
    acked: dict[bytes, int] = field(default_factory=dict)  # leaf -> acknowledged index
    errors: list[str] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)


def _log(services: Any, stream: str, first: int) -> Any:
    from gateway.backends.log_jetstream import JetStreamLog

    urls = list(services.nats_urls)
    urls = urls[first:] + urls[:first]
    return JetStreamLog(servers=urls, stream=stream, replicas=3, timeout=5.0)


@pytest.fixture
async def stream(services: Any) -> AsyncIterator[Stream]:
    name = f"LEDGERFAULT{uuid.uuid4().hex[:8].upper()}"
    ledgers = []
    for i, inst in enumerate(("hosp-a", "hosp-b", "hosp-c")):
        log = _log(services, name, i)
        await log.ping()
        ledger = Ledger(
            log=log,
            tree=TreeStore.memory(),
            signer=SIGNERS[inst],
            trusted=TRUST,
            origin="alliance.example/ledger",
            max_delay=0.002,
            unavailable_window=15.0,
        )
        await ledger.start(follow_interval=0.2)
        ledgers.append(ledger)
    s = Stream(name, ledgers)
    yield s
    for ledger in ledgers:
        await ledger.stop()
        await ledger._log.close()  # type: ignore[attr-defined]


def _start_node(services: Any, name: str) -> None:
    services.start_node(name)


async def _writer(
    s: Stream, ledger: Ledger, tag: str, stop: Callable[[], bool], per_call: int = 3
) -> None:
    i = 0
    while not stop():
        leaves = [f"{tag}-{i}-{k}-{uuid.uuid4().hex}".encode() for k in range(per_call)]
        i += 1
        try:
            results = await ledger.append(leaves)
        except Exception as exc:  # an unacknowledged batch: the caller would answer 503
            s.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
            continue
        now = time.monotonic()
        for leaf, r in zip(leaves, results, strict=True):
            s.acked[leaf] = r.index
        s.ack_times.append(now)


async def _converge(s: Stream) -> None:
    """Catch every gateway up and check: identical trees, every ack present, no duplicates."""
    for ledger in s.ledgers:
        await ledger.catch_up()
    sizes = {ledger.size for ledger in s.ledgers}
    assert len(sizes) == 1, f"gateways disagree on the size: {sizes}"
    size = sizes.pop()
    roots = {ledger.tree.root(size) for ledger in s.ledgers}
    assert len(roots) == 1, "gateways derived different trees"
    tree = s.ledgers[0].tree
    hashes = [tree.leaf_hash(i) for i in range(size)]
    assert len(set(hashes)) == size, "a leaf was appended twice"
    for leaf, index in s.acked.items():
        assert hashes[index] == leaf_hash(leaf), f"acknowledged leaf {index} lost or moved"
    # A fresh reader replaying the stream from scratch gets the same tree.
    fresh = Ledger(
        log=s.ledgers[0]._log,
        tree=TreeStore.memory(),
        signer=SIGNERS["hosp-a"],
        trusted=TRUST,
        origin="alliance.example/ledger",
    )
    await fresh.catch_up()
    assert fresh.size == size and fresh.tree.root() == tree.root(size)


async def test_sigkill_of_the_stream_leader_mid_stream(services: Any, stream: Stream) -> None:
    done = False
    writers = [
        asyncio.create_task(_writer(stream, ledger, f"w{n}", lambda: done))
        for n, ledger in enumerate(stream.ledgers[:2])
        for _ in range(3)
    ]
    await asyncio.sleep(2.0)
    before = len(stream.acked)
    assert before > 0, "no append was acknowledged before the fault"
    leader = await asyncio.to_thread(services.stream_leader, stream.name)
    assert leader is not None, "no stream leader found"
    killed_at = time.monotonic()
    await asyncio.to_thread(services.stop_node, leader, signal.SIGKILL)
    try:
        await asyncio.sleep(8.0)
        done = True
        await asyncio.gather(*writers)
        # Acknowledgements keep coming once a new leader is elected (well within 4 s).
        late = [t for t in stream.ack_times if t > killed_at + 4.0]
        assert late, f"no acknowledgement after the leader was killed: {stream.errors[-3:]}"
        new_leader = await asyncio.to_thread(services.stream_leader, stream.name)
        assert new_leader not in (None, leader)
    finally:
        done = True
        await asyncio.to_thread(_start_node, services, leader)
    await _converge(stream)
    assert len(stream.acked) > before


async def test_two_of_three_nodes_down_then_back(services: Any, stream: Stream) -> None:
    a = stream.ledgers[0]
    for ledger in stream.ledgers:
        ledger._unavailable_window = 3.0
    first = await a.append([b"before the outage"])
    stream.acked[b"before the outage"] = first[0].index
    leader = await asyncio.to_thread(services.stream_leader, stream.name) or "n1"
    other = next(n for n in ("n1", "n2", "n3") if n != leader)
    down = [other, leader]
    try:
        for n in down:
            await asyncio.to_thread(services.stop_node, n)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailableError, match="did not accept batch") as info:
            await a.append([b"during the outage"])
        assert time.monotonic() - started < 30
        assert "nothing in it was acknowledged" in str(info.value)
    finally:
        for n in down:
            await asyncio.to_thread(_start_node, services, n)
    # Everything resumes once a quorum is back (the stream may need a moment to re-elect).
    deadline = time.monotonic() + 60
    while True:
        try:
            res = await a.append([b"after the outage"])
            break
        except LedgerUnavailableError:
            if time.monotonic() > deadline:
                raise
    stream.acked[b"after the outage"] = res[0].index
    more = await stream.ledgers[1].append([b"from b after"])
    stream.acked[b"from b after"] = more[0].index
    await _converge(stream)


@pytest.mark.slow
async def test_two_gateways_racing_for_60_seconds(services: Any, stream: Stream) -> None:
    done = False
    writers = [
        asyncio.create_task(_writer(stream, ledger, f"r{n}", lambda: done, per_call=1))
        for n, ledger in enumerate(stream.ledgers[:2])
        for _ in range(4)
    ]
    await asyncio.sleep(60.0)
    done = True
    await asyncio.gather(*writers)
    assert not stream.errors, stream.errors[:3]
    conflicts = sum(ledger.stats.conflicts for ledger in stream.ledgers[:2])
    assert conflicts > 0, "the two gateways never raced for a position"
    written = [ledger.stats.leaves_written for ledger in stream.ledgers[:2]]
    assert min(written) > 0, f"one gateway never got a batch in: {written}"
    await _converge(stream)


async def test_witnesses_make_checkpoints_final_on_the_shared_stream(
    stream: Stream, tmp_path: Path
) -> None:
    """Three gateways on the real stream, each running a witness and a collector (quorum 2):
    every gateway ends with the same final checkpoint, cosigned by the two other institutions."""
    router = Router()
    services_ = []
    names = ("hosp-a", "hosp-b", "hosp-c")
    for name, ledger in zip(names, stream.ledgers, strict=True):
        ws = WitnessService(
            ledger=ledger,
            signer=SIGNERS[name],
            trusted=TRUST,
            state_path=DataDir(tmp_path / name, "embedded").witness_state,
            final_path=DataDir(tmp_path / name, "embedded").final_checkpoint,
            quorum=2,
            peers=[f"http://{p}" for p in names if p != name],
            interval=0.05,
            retry_delay=0.2,
            transport=router,
        )
        node = Node(name, ledger, ws, FastAPI())
        node.app.include_router(build_router(node))  # type: ignore[arg-type]
        router.apps[name] = httpx.ASGITransport(app=node.app)
        await ws.start()
        services_.append(ws)
    try:
        for i in range(5):
            await stream.ledgers[i % 2].append([f"final-{i}".encode()])
        for ledger in stream.ledgers:
            await ledger.catch_up()
        size = stream.ledgers[0].size
        finals = [await ws.wait_final(size, timeout=30) for ws in services_]
        assert {f.checkpoint for f in finals} == {stream.ledgers[0].latest.checkpoint}  # type: ignore[union-attr]
        for f in finals:
            assert is_final(f, TRUST, 2)
        assert all(not ws.evidence() for ws in services_)
    finally:
        for ws in services_:
            await ws.stop()
