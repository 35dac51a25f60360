"""The stored Merkle tree: the complete subtrees of the tree on disk, so proofs cost O(log n).

:class:`TreeStore` keeps, for every level ``k``, the hashes of all complete subtrees of
``2^k`` leaves: level 0 holds the leaf hashes, entry ``i`` of level ``k`` is the hash of
leaves ``[i*2^k, (i+1)*2^k)``. Any RFC 9162 node is a complete subtree or a right edge made of
at most log2(n) of them, so a root, an inclusion proof or a consistency proof of any tree size
up to the current one costs O(log n) lookups (see :mod:`ledger.merkle`).

On disk (``TreeStore.open``), a directory holds per level ``k`` two append-only files:

* ``level-KK.bin``: the 32-byte hashes of level ``k``, entry ``i`` at byte offset ``32*i``;
* ``level-KK.crc``: per entry a 4-byte big-endian CRC-32 of ``(k as 1 byte, i as 8 bytes
  big-endian, hash)``, entry ``i`` at byte offset ``4*i``.

The CRCs localise a damaged byte (:meth:`TreeStore.check` names the file and offset); the
hashes themselves are checked by re-hashing every level from the one below. Opening reads the
files as they are (no re-hashing); it only repairs what a crash can leave behind: a partial
record at a file's end is cut, a level holding more entries than the leaves imply is cut,
a level or CRC file missing its last entries is completed from the level below. Leaves in the
store beyond what the log holds are the caller's to truncate.

The store is a cache of what the log holds, so it need not be durable when a batch is
acknowledged; it is made durable from time to time. :meth:`TreeStore.flush` fsyncs the files
written since the last flush, then records the size they hold in ``synced-size`` (8-byte
big-endian size, 4-byte CRC-32 of those 8 bytes; replaced atomically). Opening trusts nothing
beyond that size: what a crash leaves after it (torn, zeroed or stale pages) is cut, and the
caller re-derives it from the log. A truncation below the recorded size lowers the record first.
A store without ``synced-size`` (one written before it existed, when every append was flushed)
is trusted as it is and gets one on opening. ``TreeStore.open(dir, read_only=True)`` loads the
same trusted prefix without writing anything (an audit beside a running gateway).

Raises :class:`ledger.errors.TreeRangeError` for out-of-range sizes or indexes,
:class:`ledger.errors.StoreCorruptionError` when stored data is inconsistent, and
:class:`ledger.errors.LedgerError` for I/O failures (with the OSError as cause).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ledger import merkle
from ledger.durable import fsync_directory, make_directory, write_durably
from ledger.errors import LedgerError, StoreCorruptionError, TreeRangeError

H = merkle.HASH_SIZE
CRC = 4
_CRC_PREFIX = struct.Struct(">BQ")
SYNCED_FILE = "synced-size"
_SIZE = struct.Struct(">Q")


def _crc(level: int, index: int, h: bytes | bytearray | memoryview) -> bytes:
    return _crc_of(h, zlib.crc32(_CRC_PREFIX.pack(level, index)))


def _crc_of(data: bytes | bytearray | memoryview, start: int = 0) -> bytes:
    """4-byte big-endian CRC-32 of ``data`` (continuing from ``start``)."""
    return struct.pack(">I", zlib.crc32(data, start))


def _read_synced_size(directory: Path) -> int | None:
    """The size recorded by the last flush, or None when there is no record. Raises
    StoreCorruptionError for a damaged record, OSError when it cannot be read."""
    path = directory / SYNCED_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != _SIZE.size + CRC or _crc_of(data[: _SIZE.size]) != data[_SIZE.size :]:
        raise StoreCorruptionError("damaged synced-size record", path=path, offset=0)
    size: int = _SIZE.unpack(data[: _SIZE.size])[0]
    return size


def _open_read_only(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")  # closed by TreeStore
    except FileNotFoundError:
        return io.BytesIO()


class _LevelFiles:
    """The two open files of one level (read only: a missing file reads as empty)."""

    def __init__(self, directory: Path, level: int, *, read_only: bool = False) -> None:
        self.bin_path = directory / f"level-{level:02d}.bin"
        self.crc_path = directory / f"level-{level:02d}.crc"
        if read_only:
            self.bin: BinaryIO = _open_read_only(self.bin_path)
            self.crc: BinaryIO = _open_read_only(self.crc_path)
        else:
            self.bin = open(self.bin_path, "a+b")  # noqa: SIM115 - closed by TreeStore
            self.crc = open(self.crc_path, "a+b")  # noqa: SIM115
        self.dirty = not read_only  # new files: their directory entries need a sync too

    def read(self) -> tuple[bytes, bytes]:
        self.bin.seek(0)
        self.crc.seek(0)
        return self.bin.read(), self.crc.read()

    def truncate(self, entries: int) -> None:
        for fh, width in ((self.bin, H), (self.crc, CRC)):
            fh.flush()
            fh.truncate(entries * width)
            fh.seek(0, os.SEEK_END)
        self.dirty = True

    def unsynced(self) -> list[int]:
        """Hand buffered writes to the OS; the descriptors to fsync (none if clean)."""
        if not self.dirty:
            return []
        for fh in (self.bin, self.crc):
            fh.flush()
        return [self.bin.fileno(), self.crc.fileno()]

    def close(self) -> None:
        self.bin.close()
        self.crc.close()


class TreeStore:
    """Complete-subtree hashes of a Merkle tree, in memory or in append-only files."""

    def __init__(self, directory: Path | None = None) -> None:
        """Use :meth:`memory` or :meth:`open`."""
        self._dir = directory
        self._levels: list[bytearray] = [bytearray()]
        self._files: list[_LevelFiles] = []
        self._index: dict[bytes, int] | None = None
        self._size = 0
        self._closed = False
        self._new_files = True  # directory entries not yet synced
        self._read_only = False
        self._synced_size: int | None = None  # the size recorded in SYNCED_FILE

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def memory(cls) -> TreeStore:
        """An empty in-memory store. Raises nothing."""
        return cls(None)

    @classmethod
    def open(cls, directory: Path, *, read_only: bool = False) -> TreeStore:
        """Open (or create) a file-backed store in ``directory`` without re-hashing it, up to
        the size its last flush recorded. ``read_only``: write nothing (no repair, no
        appends); the directory must exist.

        Raises LedgerError when the files cannot be read or written, StoreCorruptionError
        when the recorded size is damaged.
        """
        directory = Path(directory)
        store = cls(directory)
        store._read_only = read_only
        try:
            if not read_only:
                make_directory(directory)
            store._synced_size = _read_synced_size(directory)
            store._load(store._synced_size)
            if not read_only and store._synced_size != store._size:
                store.flush()
        except OSError as err:
            store.close()
            raise LedgerError(f"{directory}: cannot open tree store: {err.strerror}") from err
        except LedgerError:
            store.close()
            raise
        return store

    def _level_files(self, level: int) -> _LevelFiles:
        assert self._dir is not None
        while len(self._files) <= level:
            self._files.append(_LevelFiles(self._dir, len(self._files), read_only=self._read_only))
            self._new_files = True
        return self._files[level]

    def _load(self, trusted: int | None) -> None:
        """Read the levels, at most ``trusted`` leaves (None: all), and repair what a crash
        can leave (on disk unless read only)."""
        assert self._dir is not None
        repair = not self._read_only
        level = 0
        levels: list[bytearray] = []
        while level == 0 or (self._dir / f"level-{level:02d}.bin").exists():
            files = self._level_files(level)
            data, crcs = files.read()
            if level == 0:
                expected = len(data) // H if trusted is None else min(len(data) // H, trusted)
            else:
                expected = len(levels[0]) // H >> level
            if level > 0 and expected == 0:
                if repair:
                    files.truncate(0)
                level += 1
                continue
            entries = min(len(data) // H, expected)
            if repair:
                files.truncate(min(entries, len(crcs) // CRC))
            hashes = bytearray(data[: entries * H])
            # Complete a level or CRC file whose last entries a crash did not write.
            have_crc = min(entries, len(crcs) // CRC)
            missing_crc = bytearray()
            for i in range(have_crc, entries):
                missing_crc += _crc(level, i, hashes[i * H : (i + 1) * H])
            if level > 0:
                below = levels[level - 1]
                for i in range(entries, expected):
                    h = merkle.node_hash(
                        bytes(below[2 * i * H : (2 * i + 1) * H]),
                        bytes(below[(2 * i + 1) * H : (2 * i + 2) * H]),
                    )
                    hashes += h
                    missing_crc += _crc(level, i, h)
            if repair and len(hashes) > have_crc * H:
                files.bin.seek(0, os.SEEK_END)
                files.bin.truncate(have_crc * H)
                files.bin.write(hashes[have_crc * H :])
                files.crc.write(missing_crc)
            levels.append(hashes)
            level += 1
        # Levels the leaves imply but whose files did not exist yet.
        n = len(levels[0]) // H
        while n >> len(levels):
            k = len(levels)
            below = levels[k - 1]
            hashes = bytearray()
            crcs_new = bytearray()
            for i in range(n >> k):
                h = merkle.node_hash(
                    bytes(below[2 * i * H : (2 * i + 1) * H]),
                    bytes(below[(2 * i + 1) * H : (2 * i + 2) * H]),
                )
                hashes += h
                crcs_new += _crc(k, i, h)
            if repair:
                files = self._level_files(k)
                files.truncate(0)
                files.bin.write(hashes)
                files.crc.write(crcs_new)
            levels.append(hashes)
        self._levels = levels
        self._size = n

    # ---- reading -----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of leaves stored."""
        return self._size

    def _get(self, level: int, index: int) -> bytes:
        return bytes(self._levels[level][index * H : (index + 1) * H])

    def leaf_hash(self, index: int) -> bytes:
        """The hash of leaf ``index``. Raises TreeRangeError."""
        if not 0 <= index < self._size:
            raise TreeRangeError(
                f"no leaf {index} in a tree of size {self._size}", index=index, tree_size=self._size
            )
        return self._get(0, index)

    def index_of(self, leaf_hash: bytes) -> int | None:
        """The first index holding ``leaf_hash``, or None. The first call builds an index over
        all leaves (O(n)); later calls are O(1). Raises nothing."""
        if self._index is None:
            index: dict[bytes, int] = {}
            level0 = self._levels[0]
            for i in range(self._size - 1, -1, -1):
                index[bytes(level0[i * H : (i + 1) * H])] = i
            self._index = index
        return self._index.get(bytes(leaf_hash))

    def _check_size(self, tree_size: int) -> None:
        if not 0 <= tree_size <= self._size:
            raise TreeRangeError(
                f"tree size {tree_size} out of range (store holds {self._size} leaves)",
                tree_size=tree_size,
            )

    def root(self, tree_size: int | None = None) -> bytes:
        """Root hash of the tree of the first ``tree_size`` leaves (default: all).

        Raises TreeRangeError for a size beyond the store.
        """
        size = self._size if tree_size is None else tree_size
        self._check_size(size)
        return merkle.tree_root(self._get, size)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``tree_size`` leaves.

        Raises TreeRangeError unless 0 <= index < tree_size <= size.
        """
        self._check_size(tree_size)
        return merkle.inclusion_path(self._get, index, tree_size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof from tree size ``first`` to ``second``.

        Raises TreeRangeError unless 0 <= first <= second <= size.
        """
        self._check_size(second)
        return merkle.consistency_path(self._get, first, second)

    # ---- writing -----------------------------------------------------------------------

    def append(self, leaf_hashes: Sequence[bytes]) -> int:
        """Append leaf hashes (and every subtree they complete); return the new size.

        Raises LedgerError for a hash that is not 32 bytes or when writing fails.
        """
        if self._closed or self._read_only:
            raise LedgerError(f"tree store is {'closed' if self._closed else 'read only'}")
        for h in leaf_hashes:
            if len(h) != H:
                raise LedgerError(f"leaf hash of {len(h)} bytes, expected {H}")
        start = [len(lv) // H for lv in self._levels]
        levels = self._levels
        size = self._size
        index = self._index
        for h in leaf_hashes:
            h = bytes(h)
            levels[0] += h
            if index is not None and h not in index:
                index[h] = size
            i, level = size, 0
            while i & 1:
                left = levels[level][(i - 1) * H : i * H]
                h = merkle.node_hash(bytes(left), h)
                level += 1
                i >>= 1
                if level == len(levels):
                    levels.append(bytearray())
                levels[level] += h
            size += 1
        self._size = size
        if self._dir is not None:
            self._write_new(start)
        return size

    def _write_new(self, start: list[int]) -> None:
        try:
            for level, lv in enumerate(self._levels):
                first = start[level] if level < len(start) else 0
                end = len(lv) // H
                if end == first:
                    continue
                files = self._level_files(level)
                files.dirty = True
                files.bin.write(lv[first * H : end * H])
                files.crc.write(
                    b"".join(_crc(level, i, lv[i * H : (i + 1) * H]) for i in range(first, end))
                )
        except OSError as err:
            raise LedgerError(f"{self._dir}: cannot write tree store: {err.strerror}") from err

    def truncate(self, size: int) -> None:
        """Drop every leaf from ``size`` on (and the subtrees they were part of).

        Raises TreeRangeError for a size beyond the store, LedgerError when writing fails.
        """
        self._check_size(size)
        if size == self._size:
            return
        if self._read_only:
            raise LedgerError("tree store is read only")
        if self._synced_size is not None and size < self._synced_size:
            # What is rewritten below the recorded size is not durable until the next flush.
            try:
                self._record_synced_size(size)
            except OSError as err:
                raise LedgerError(
                    f"{self._dir}: cannot record the synced size: {err.strerror}"
                ) from err
        if self._index is not None:
            for i in range(size, self._size):
                h = self._get(0, i)
                if self._index.get(h, -1) >= size:
                    del self._index[h]
        for level, lv in enumerate(self._levels):
            keep = size >> level
            del lv[keep * H :]
            if self._dir is not None:
                try:
                    self._level_files(level).truncate(keep)
                except OSError as err:
                    raise LedgerError(
                        f"{self._dir}: cannot truncate tree store: {err.strerror}"
                    ) from err
        while len(self._levels) > 1 and not self._levels[-1]:
            self._levels.pop()
        self._size = size

    def flush(self) -> None:
        """Make everything appended durable: fsync the files written since the last flush
        (an append of a few leaves touches a few levels, not all of them) and, when files
        were created, the directory; then record the size as durable. A read-only store has
        nothing to flush. Raises LedgerError."""
        if self._read_only:
            return
        try:
            for fd in self.unsynced():
                os.fsync(fd)
            self.mark_synced()
            self.record_synced()
        except OSError as err:
            raise LedgerError(f"{self._dir}: cannot flush tree store: {err.strerror}") from err

    def unsynced(self) -> list[int]:
        """Hand everything appended to the OS and return the file descriptors that must be
        fsynced to make it durable (the caller may sync them in parallel, then call
        :meth:`mark_synced` and :meth:`record_synced`). Raises OSError."""
        return [fd for files in self._files for fd in files.unsynced()]

    def mark_synced(self) -> None:
        """Record that the descriptors :meth:`unsynced` returned were fsynced (call nothing
        that writes in between). Raises nothing."""
        for files in self._files:
            files.dirty = False

    def record_synced(self) -> None:
        """After the descriptors :meth:`unsynced` returned were fsynced and :meth:`mark_synced`
        called: sync the directory if level files were created, then record the current size
        as durable. Raises OSError."""
        if self._dir is None:
            return
        if self._new_files:
            self._sync_directory()
            self._new_files = False
        if self._synced_size != self._size:
            self._record_synced_size(self._size)

    def _sync_directory(self) -> None:
        assert self._dir is not None
        fsync_directory(self._dir)

    def _record_synced_size(self, size: int) -> None:
        """Replace SYNCED_FILE atomically and durably. Raises OSError."""
        assert self._dir is not None
        data = _SIZE.pack(size)
        write_durably(self._dir / SYNCED_FILE, data + _crc_of(data))
        self._synced_size = size

    def close(self) -> None:
        """Flush and close the files. Raises LedgerError when the final flush fails."""
        if self._closed:
            return
        try:
            if self._files:
                self.flush()
        finally:
            for files in self._files:
                files.close()
            self._closed = True

    def __enter__(self) -> TreeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def snapshot(self) -> TreeStore:
        """An independent in-memory copy of the current tree (O(n) memory copy). Raises nothing."""
        copy = TreeStore.memory()
        copy._levels = [bytearray(lv) for lv in self._levels]
        copy._size = self._size
        return copy

    # ---- audit -------------------------------------------------------------------------

    def check(self) -> None:
        """Re-hash everything stored (the files as they are on disk, for a file-backed store).

        Every entry must match its CRC, and every entry of level k >= 1 must equal the hash of
        its two children. Raises StoreCorruptionError naming the file and byte offset of the
        first inconsistency, LedgerError when the files cannot be read.
        """
        if self._dir is None:
            levels = [bytes(lv) for lv in self._levels]
            crcs = None
        else:
            self.flush()
            try:
                pairs = [files.read() for files in self._files]
            except OSError as err:
                raise LedgerError(f"{self._dir}: cannot read tree store: {err.strerror}") from err
            if self._read_only:
                # A running gateway may have appended beyond what was loaded: check that.
                pairs = [
                    (d[: (self._size >> k) * H], c[: (self._size >> k) * CRC])
                    for k, (d, c) in enumerate(pairs)
                ]
            levels = [p[0] for p in pairs]
            crcs = [p[1] for p in pairs]
        n = self._size

        def where(level: int, kind: str) -> Path | str:
            name = f"level-{level:02d}.{kind}"
            return self._dir / name if self._dir is not None else f"<memory>/{name}"

        for level, data in enumerate(levels):
            expected = n >> level
            if len(data) != expected * H:
                raise StoreCorruptionError(
                    f"holds {len(data) // H} entries, expected {expected} for {n} leaves",
                    path=where(level, "bin"),
                    offset=min(len(data), expected * H),
                )
            if crcs is None:
                continue
            crc = crcs[level]
            if len(crc) != expected * CRC:
                raise StoreCorruptionError(
                    f"holds {len(crc) // CRC} checksums, expected {expected}",
                    path=where(level, "crc"),
                    offset=min(len(crc), expected * CRC),
                )
            for i in range(expected):
                h = data[i * H : (i + 1) * H]
                if _crc(level, i, h) != crc[i * CRC : (i + 1) * CRC]:
                    # Which side is damaged: the hash, unless it agrees with the tree around it.
                    if self._hash_agrees(levels, level, i):
                        raise StoreCorruptionError(
                            f"checksum of level {level} entry {i} is damaged",
                            path=where(level, "crc"),
                            offset=i * CRC,
                        )
                    raise StoreCorruptionError(
                        f"level {level} entry {i} does not match its checksum",
                        path=where(level, "bin"),
                        offset=i * H,
                    )
        for level in range(1, len(levels)):
            below, data = levels[level - 1], levels[level]
            for i in range(len(data) // H):
                h = merkle.node_hash(
                    below[2 * i * H : (2 * i + 1) * H], below[(2 * i + 1) * H : (2 * i + 2) * H]
                )
                if h != data[i * H : (i + 1) * H]:
                    raise StoreCorruptionError(
                        f"level {level} entry {i} is not the hash of its two children",
                        path=where(level, "bin"),
                        offset=i * H,
                    )

    @staticmethod
    def _hash_agrees(levels: Sequence[bytes], level: int, i: int) -> bool:
        """Whether entry i of ``level`` agrees with its children and its parent."""
        h = levels[level][i * H : (i + 1) * H]
        if level > 0:
            below = levels[level - 1]
            if (
                merkle.node_hash(
                    below[2 * i * H : (2 * i + 1) * H], below[(2 * i + 1) * H : (2 * i + 2) * H]
                )
                != h
            ):
                return False
        if level + 1 < len(levels) and len(levels[level + 1]) >= (i // 2 + 1) * H:
            sib = i ^ 1
            pair = (h, levels[level][sib * H : (sib + 1) * H])
            left, right = pair if i % 2 == 0 else pair[::-1]
            parent = levels[level + 1][(i // 2) * H : (i // 2 + 1) * H]
            if merkle.node_hash(left, right) != parent:
                return False
        return True
