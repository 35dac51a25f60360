"""Group commit and multi-writer behaviour of the Ledger over an in-memory log.

The in-memory log (tests/fakes.py) is a unit-test stand-in with the LogBackend semantics
(conditional append, msg-id de-duplication); the real FileLog and JetStream log run the same
Ledger in tests/gateway (both profiles) and their own contract tests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ledger.errors import CheckpointError, CheckpointSignatureError
from ledger.keys import Signer, TrustedKeys
from ledger.merkle import leaf_hash, root
from ledger.sequencer import LeafDraft, Ledger
from ledger.stored_tree import TreeStore
from ledger.verify import verify_inclusion
from tests.fakes import CancellationSwallowingLog, MemoryLog

SIGNERS = {name: Signer.generate(name) for name in ("hosp-a", "clinic-b")}
TRUST = TrustedKeys.of(SIGNERS.values())


def make(
    log: MemoryLog, name: str = "hosp-a", tree: TreeStore | None = None, **kw: object
) -> Ledger:
    return Ledger(
        log=log,
        tree=TreeStore.memory() if tree is None else tree,
        signer=SIGNERS[name],
        trusted=TRUST,
        origin="test/ledger",
        **kw,  # type: ignore[arg-type]
    )


async def test_concurrent_appends_are_grouped_and_provable() -> None:
    log = MemoryLog(delay=0.01)
    ledger = make(log, max_delay=0.005)
    await ledger.start(follow_interval=None)
    leaves = [f"leaf-{i}".encode() for i in range(50)]
    results = await asyncio.gather(*(ledger.append([leaf]) for leaf in leaves))
    await ledger.stop()
    assert ledger.size == 50
    assert len(log.messages) < 50, "concurrent appends were not grouped into batches"
    assert sorted(r[0].index for r in results) == list(range(50))
    for leaf, (res,) in zip(leaves, results, strict=True):
        cp = res.checkpoint.checkpoint
        proof = ledger.inclusion_proof(res.index, cp.size)
        verify_inclusion(leaf_hash(leaf), res.index, cp.size, proof, cp.root)


async def test_two_writers_racing_derive_identical_trees() -> None:
    log = MemoryLog(delay=0.002)
    a, b = make(log, "hosp-a"), make(log, "clinic-b")
    await a.start(follow_interval=None)
    await b.start(follow_interval=None)

    async def push(ledger: Ledger, tag: str) -> None:
        for i in range(30):
            await ledger.append([f"{tag}-{i}".encode()])

    await asyncio.gather(push(a, "a"), push(b, "b"))
    await a.catch_up()
    await b.catch_up()
    assert a.size == b.size == 60
    assert a.tree.root(60) == b.tree.root(60)
    assert a.stats.conflicts + b.stats.conflicts > 0, "the writers never raced"
    # A third node replaying the log from scratch gets the same tree.
    c = make(log, "hosp-a")
    await c.catch_up()
    assert c.tree.root(60) == a.tree.root(60)
    all_leaves: list[bytes] = []
    async for entry in log.read():
        from ledger.batch import decode_batch

        all_leaves.extend(decode_batch(entry.data).leaves)
    assert root([leaf_hash(x) for x in all_leaves]) == a.tree.root(60)
    await a.stop()
    await b.stop()


async def test_a_writer_alone_on_the_log_is_not_held_back() -> None:
    """With no other writer in its trust list the fairness gap does not apply."""
    alone = Ledger(
        log=MemoryLog(),
        tree=TreeStore.memory(),
        signer=SIGNERS["hosp-a"],
        trusted=TrustedKeys.of([SIGNERS["hosp-a"]]),
        origin="test/ledger",
        fair_gap=0.5,
    )
    await alone.start(follow_interval=None)
    try:
        start = asyncio.get_running_loop().time()
        for i in range(5):
            await alone.append([f"alone-{i}".encode()])
        assert asyncio.get_running_loop().time() - start < 0.4, "a lone writer was held back"
    finally:
        await alone.stop()


async def test_fairness_gap_applies_when_another_writer_may_write() -> None:
    """Another writer in the trust list: the gap applies from the first batch, before that
    writer has been seen (it may be losing every race)."""
    a = make(MemoryLog(), "hosp-a", fair_gap=0.3)
    await a.start(follow_interval=None)
    try:
        start = asyncio.get_running_loop().time()
        for i in range(3):
            await a.append([f"a-{i}".encode()])
        assert asyncio.get_running_loop().time() - start >= 0.55, "no gap between own batches"
    finally:
        await a.stop()


async def test_retried_batch_with_same_msg_id_is_not_appended_twice() -> None:
    log = MemoryLog()
    ledger = make(log)
    await ledger.start(follow_interval=None)
    await ledger.append([b"x"])
    data, msg_id = log.messages[0], next(iter(log.ids))
    assert await log.append(data, expected_last_seq=1, msg_id=msg_id) == 1
    assert len(log.messages) == 1
    await ledger.stop()


def _synced_size(directory: Path) -> int:
    return int.from_bytes((directory / "synced-size").read_bytes()[:8], "big")


async def test_appends_do_not_wait_for_the_stored_tree_and_a_crash_loses_none_of_it(
    tmp_path: Path,
) -> None:
    """The stored tree is a cache of the log: appends are acknowledged once the log holds
    them, the tree is synced every ``tree_sync_interval``, and after a crash that zeroed
    everything written since, the next start re-derives it from the log."""
    log = MemoryLog()
    tree_dir = tmp_path / "tree"
    ledger = make(log, tree=TreeStore.open(tree_dir), tree_sync_interval=3600)
    await ledger.start(follow_interval=None)
    for i in range(20):
        await ledger.append([f"leaf-{i}".encode()])
    assert ledger.size == 20 and _synced_size(tree_dir) == 0, "an append waited for the tree"
    expected = ledger.tree.root()
    ledger.tree.unsynced()
    for files in ledger.tree._files:  # the gateway is killed: no stop, no flush
        files.close()
    for path in tree_dir.glob("level-*"):  # and the page cache never reached the disk
        path.write_bytes(bytes(path.stat().st_size))
    again = make(log, tree=TreeStore.open(tree_dir), tree_sync_interval=0)
    assert again.tree.size == 0
    await again.start(follow_interval=None)
    assert again.size == 20 and again.tree.root() == expected
    await again.append([b"one more"])
    assert _synced_size(tree_dir) == 21, "a due sync did not record the tree's size"
    await again.stop()
    again.tree.check()
    again.tree.close()


async def test_stop_returns_even_if_the_followers_cancellation_is_lost() -> None:
    """Python 3.11's ``wait_for`` (inside the NATS client's requests) swallows a cancellation
    that arrives as its answer does; the follower must end anyway, or stop waits for ever."""

    log = CancellationSwallowingLog()
    ledger = make(log)
    await ledger.start(follow_interval=0.01)
    await log.inside.wait()
    async with asyncio.timeout(5):
        await ledger.stop()


async def test_replay_rejects_a_forged_or_altered_batch() -> None:
    log = MemoryLog()
    ledger = make(log)
    await ledger.start(follow_interval=None)
    await ledger.append([b"one", b"two"])
    await ledger.append([b"three"])
    await ledger.stop()
    # Alter a leaf inside batch 2 (re-encode so it still parses).
    from ledger.batch import Batch, decode_batch, encode_batch

    b2 = decode_batch(log.messages[1])
    log.messages[1] = encode_batch(
        Batch(b2.writer, b2.batch_id, (b"THREE",), b2.checkpoint, b2.nonce)
    )
    with pytest.raises(CheckpointError, match="log message 2"):
        await make(log).catch_up()
    # A batch signed by an institution outside the trust file.
    log2 = MemoryLog()
    rogue = Ledger(
        log=log2,
        tree=TreeStore.memory(),
        signer=Signer.generate("rogue"),
        trusted=TrustedKeys.of([Signer.generate("rogue")]),
        origin="test/ledger",
    )
    await rogue.start(follow_interval=None)
    await rogue.append([b"evil"])
    await rogue.stop()
    with pytest.raises(CheckpointSignatureError):
        await make(log2).catch_up()


@pytest.mark.parametrize("writer", ["hosp-a", '医院 "quoted"', "tab\there"])
def test_batch_encoding_is_exactly_rfc8785(writer: str) -> None:
    """The fast batch encoder gives the reference RFC 8785 bytes, for any writer name."""
    import base64

    import rfc8785

    from ledger.batch import Batch, decode_batch, encode_batch

    batch = Batch(
        writer=writer,
        batch_id="ab" * 32,
        leaves=(b'{"kind":"record"}', bytes(range(256))),
        checkpoint=b"\x00signed\xff",
        nonce=b"\x01" * 16,
    )
    data = encode_batch(batch)
    assert data == rfc8785.dumps(
        {
            "v": 1,
            "writer": writer,
            "batch": batch.batch_id,
            "nonce": batch.nonce.hex(),
            "leaves": [base64.b64encode(x).decode() for x in batch.leaves],
            "checkpoint": base64.b64encode(batch.checkpoint).decode(),
        }
    )
    assert decode_batch(data) == batch


class CountingDraft(LeafDraft):
    """A leaf naming the next number after those the ledger has seen (as a record's next
    version is taken), completed when its batch is formed."""

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen
        self.completions = 0

    def complete(self, scratch: dict[str, Any]) -> bytes:
        self.completions += 1
        n = scratch.get("n", len(self.seen)) + 1
        scratch["n"] = n
        return f"n={n}".encode()


async def test_drafts_are_completed_against_the_log_and_again_after_a_lost_race() -> None:
    log = MemoryLog(delay=0.01)
    seen: list[int] = []  # a's view: the numbers in the log, as a's listener applies them
    a, b = make(log, "hosp-a", max_delay=0.0), make(log, "clinic-b", max_delay=0.0)
    a.add_listener(
        lambda first, leaves, seq: seen.extend(int(x[2:]) for x in leaves if x[:2] == b"n=")
    )
    await a.start(follow_interval=None)
    await b.start(follow_interval=None)
    (first,) = await a.append([CountingDraft(seen)])
    assert first.leaf == b"n=1" and seen == [1]
    await b.catch_up()
    await b.append([b"n=2"])  # another writer takes number 2; a does not know it yet
    d1, d2 = CountingDraft(seen), CountingDraft(seen)
    results = await a.append([d1, d2])
    # The first forming (2, 3) lost the race; after catching up a sees 2 and forms (3, 4).
    assert [r.leaf for r in results] == [b"n=3", b"n=4"]
    assert (d1.completions, d2.completions) == (2, 2)
    assert seen == [1, 2, 3, 4] and a.size == 4
    await a.stop()
    await b.stop()


class _CountingReads(MemoryLog):
    """The in-memory log, counting reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read(self, start_seq: int = 1) -> Any:
        self.reads += 1
        async for entry in super().read(start_seq):
            yield entry


async def test_catch_up_until_a_position_already_reached_reads_nothing() -> None:
    """A caller that needs the view up to a log position (consent freshness) which this
    writer's own append reached while the caller waited for the ledger's turn reads nothing
    more; without ``until``, or when behind, the log is read."""
    log = _CountingReads()
    ledger = make(log)
    await ledger.start(follow_interval=None)
    await ledger.append([b"own"])
    reads = log.reads
    assert await ledger.catch_up(until=ledger.applied_seq) == 0
    assert log.reads == reads
    other = make(log, "clinic-b")
    await other.start(follow_interval=None)
    await other.append([b"theirs"])
    reads = log.reads
    assert await ledger.catch_up(until=ledger.applied_seq + 1) == 1
    assert log.reads == reads + 1 and ledger.size == 2
    assert await ledger.catch_up() == 0 and log.reads == reads + 2
    await other.stop()
    await ledger.stop()
