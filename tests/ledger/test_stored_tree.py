"""TreeStore: file persistence, reopen without re-hashing, truncation, corruption detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger import merkle
from ledger.errors import LedgerError, StoreCorruptionError, TreeRangeError
from ledger.stored_tree import TreeStore

HASHES = [merkle.leaf_hash(b"leaf %d" % i) for i in range(1000)]


def filled(path: Path, n: int) -> TreeStore:
    store = TreeStore.open(path)
    for start in range(0, n, 37):
        store.append(HASHES[start : min(start + 37, n)])
    store.flush()
    return store


def test_reopen_gives_same_tree(tmp_path: Path) -> None:
    store = filled(tmp_path, 777)
    expected = [store.root(n) for n in range(778)]
    store.close()
    again = TreeStore.open(tmp_path)
    assert again.size == 777
    assert [again.root(n) for n in range(778)] == expected
    assert again.root() == merkle.root(HASHES[:777])
    assert again.inclusion_proof(500, 700) == merkle.inclusion_proof(HASHES, 500, 700)
    assert again.consistency_proof(300, 777) == merkle.consistency_proof(HASHES, 300, 777)
    again.check()
    again.append(HASHES[777:])
    assert again.root() == merkle.root(HASHES)
    again.close()
    with TreeStore.open(tmp_path) as third:
        assert third.root() == merkle.root(HASHES)
        third.check()


def test_index_of_and_leaf_hash(tmp_path: Path) -> None:
    store = filled(tmp_path, 100)
    assert store.index_of(HASHES[42]) == 42
    assert store.index_of(HASHES[500]) is None
    store.append([HASHES[42], HASHES[500]])
    assert store.index_of(HASHES[42]) == 42  # first occurrence
    assert store.index_of(HASHES[500]) == 101
    assert store.leaf_hash(101) == HASHES[500]
    store.truncate(101)
    assert store.index_of(HASHES[500]) is None
    with pytest.raises(TreeRangeError):
        store.leaf_hash(101)
    store.close()


def test_truncate_rolls_back_a_batch(tmp_path: Path) -> None:
    store = filled(tmp_path, 300)
    root300 = store.root()
    store.append(HASHES[300:555])
    store.truncate(300)
    assert store.size == 300
    assert store.root() == root300
    store.check()
    store.append(HASHES[300:400])
    store.close()
    again = TreeStore.open(tmp_path)
    assert again.size == 400 and again.root() == merkle.root(HASHES[:400])
    again.check()
    with pytest.raises(TreeRangeError):
        again.truncate(401)
    again.truncate(0)
    assert again.root() == merkle.EMPTY_ROOT
    again.close()
    with TreeStore.open(tmp_path) as empty:
        assert empty.size == 0


def test_torn_tail_repaired_on_open(tmp_path: Path) -> None:
    store = filled(tmp_path, 64)
    store.close()
    level0 = tmp_path / "level-00.bin"
    with level0.open("ab") as fh:
        fh.write(HASHES[64][:20])  # a crash in the middle of a write
    (tmp_path / "level-03.crc").write_bytes((tmp_path / "level-03.crc").read_bytes()[:-4])
    (tmp_path / "level-06.bin").unlink()  # never written
    (tmp_path / "level-06.crc").unlink()
    again = TreeStore.open(tmp_path)
    assert again.size == 64
    assert again.root() == merkle.root(HASHES[:64])
    again.check()
    again.close()


@pytest.mark.parametrize(
    ("name", "entry_width", "entry"),
    [
        ("level-00.bin", 32, 0),
        ("level-00.bin", 32, 77),
        ("level-00.bin", 32, 299),
        ("level-03.bin", 32, 5),
        ("level-08.bin", 32, 0),
        ("level-00.crc", 4, 10),
        ("level-02.crc", 4, 3),
    ],
)
def test_flipped_byte_is_located(tmp_path: Path, name: str, entry_width: int, entry: int) -> None:
    filled(tmp_path, 300).close()
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    offset = entry * entry_width + entry_width // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    store = TreeStore.open(tmp_path)
    with pytest.raises(StoreCorruptionError) as exc:
        store.check()
    assert exc.value.path == path
    assert exc.value.offset == entry * entry_width
    assert name in str(exc.value) and str(entry * entry_width) in str(exc.value)
    store.close()


def test_consistent_rewrite_found_by_rehash(tmp_path: Path) -> None:
    # Rewrite a leaf hash and its checksum together: the CRCs agree, the tree does not.
    from ledger.stored_tree import _crc

    filled(tmp_path, 16).close()
    bin_path, crc_path = tmp_path / "level-00.bin", tmp_path / "level-00.crc"
    data, crcs = bytearray(bin_path.read_bytes()), bytearray(crc_path.read_bytes())
    data[5 * 32 : 6 * 32] = HASHES[999]
    crcs[5 * 4 : 6 * 4] = _crc(0, 5, HASHES[999])
    bin_path.write_bytes(bytes(data))
    crc_path.write_bytes(bytes(crcs))
    store = TreeStore.open(tmp_path)
    with pytest.raises(StoreCorruptionError) as exc:
        store.check()
    assert exc.value.path == tmp_path / "level-01.bin"
    assert exc.value.offset == 2 * 32
    store.close()


def test_memory_store_snapshot_and_check() -> None:
    store = TreeStore.memory()
    store.append(HASHES[:10])
    snap = store.snapshot()
    store.append(HASHES[10:20])
    assert snap.size == 10 and store.size == 20
    assert snap.root() == merkle.root(HASHES[:10])
    snap.append(HASHES[500:510])
    assert store.root() == merkle.root(HASHES[:20])
    store.check()
    snap.check()
    store._levels[1][0] ^= 1  # damage in memory
    with pytest.raises(StoreCorruptionError):
        store.check()


def test_bad_input_and_closed() -> None:
    store = TreeStore.memory()
    with pytest.raises(LedgerError):
        store.append([b"short"])
    assert store.size == 0
    store.close()
    with pytest.raises(LedgerError):
        store.append(HASHES[:1])


def test_reopen_does_not_rehash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    filled(tmp_path, 1000).close()
    calls = []
    original = merkle.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        calls.append(1)
        return original(left, right)

    monkeypatch.setattr(merkle, "node_hash", counting)
    store = TreeStore.open(tmp_path)
    assert calls == []
    # A root and a proof cost O(log n) hashes, not O(n).
    store.root()
    store.inclusion_proof(123, 1000)
    store.consistency_proof(333, 1000)
    assert 0 < len(calls) < 40
    store.close()


def _abandon(store: TreeStore) -> None:
    """The process died: its files are closed without a flush."""
    for files in store._files:
        files.close()


def _zero_beyond(path: Path, entries: int, width: int) -> None:
    """What a crash can leave of writes that were never fsynced: zeroed pages."""
    data = path.read_bytes()
    path.write_bytes(data[: entries * width] + bytes(len(data) - entries * width))


def test_what_was_not_flushed_is_not_trusted_on_reopen(tmp_path: Path) -> None:
    """Only the size recorded by the last flush is trusted: appends after it (which a crash
    may leave torn or zeroed, in any level) are cut on reopen, and the caller re-derives them
    from the log."""
    store = filled(tmp_path, 64)
    store.append(HASHES[64:100])
    assert store.unsynced()  # handed to the OS, never fsynced: then the machine crashes
    for level in range(7):
        _zero_beyond(tmp_path / f"level-{level:02d}.bin", 64 >> level, 32)
        _zero_beyond(tmp_path / f"level-{level:02d}.crc", 64 >> level, 4)
    _abandon(store)
    again = TreeStore.open(tmp_path)
    assert again.size == 64
    assert again.root() == merkle.root(HASHES[:64])
    again.check()
    again.append(HASHES[64:100])
    again.close()
    with TreeStore.open(tmp_path) as third:
        assert third.size == 100 and third.root() == merkle.root(HASHES[:100])
        third.check()


def test_truncating_below_the_flushed_size_lowers_it_first(tmp_path: Path) -> None:
    store = filled(tmp_path, 300)
    store.truncate(100)  # the local copy diverged from the log at leaf 100
    store.append(HASHES[500:700])  # rewrites the region below the old synced size, unsynced
    store.unsynced()
    _zero_beyond(tmp_path / "level-00.bin", 100, 32)
    _abandon(store)
    again = TreeStore.open(tmp_path)
    assert again.size == 100, "a rewritten region was trusted without a flush"
    assert again.root() == merkle.root(HASHES[:100])
    again.close()


def test_a_store_without_a_synced_size_is_trusted_and_gets_one(tmp_path: Path) -> None:
    """A store written before ``synced-size`` existed was flushed after every append."""
    filled(tmp_path, 200).close()
    (tmp_path / "synced-size").unlink()
    with TreeStore.open(tmp_path) as store:
        assert store.size == 200 and store.root() == merkle.root(HASHES[:200])
    assert (tmp_path / "synced-size").read_bytes()[:8] == (200).to_bytes(8, "big")


def test_a_damaged_synced_size_is_named(tmp_path: Path) -> None:
    filled(tmp_path, 10).close()
    raw = bytearray((tmp_path / "synced-size").read_bytes())
    raw[7] ^= 0x01
    (tmp_path / "synced-size").write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptionError, match="synced-size"):
        TreeStore.open(tmp_path)


def test_read_only_open_writes_nothing(tmp_path: Path) -> None:
    """An audit beside a running gateway: the files are read, never repaired or cut, and
    what the gateway appended after its last flush is left out."""
    writer = filled(tmp_path, 300)
    writer.append(HASHES[300:340])
    writer.unsynced()
    (tmp_path / "level-08.bin").unlink()  # a level the reader must derive in memory
    (tmp_path / "level-08.crc").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    reader = TreeStore.open(tmp_path, read_only=True)
    assert reader.size == 300 and reader.root() == merkle.root(HASHES[:300])
    reader.check()
    with pytest.raises(LedgerError, match="read only"):
        reader.append(HASHES[:1])
    reader.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    writer.close()
