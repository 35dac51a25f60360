"""Group commit of leaves onto the replicated log, and the tree every node derives from it.

:class:`Ledger` is the only writer of a node's copy of the tree. Callers hand it leaves with
:meth:`Ledger.append`; a single writer task groups the leaves of concurrent callers (at most
``max_leaves`` leaves, waiting at most ``max_delay`` seconds for more), extends the tree
tentatively, signs a checkpoint of the result and appends the batch to the log conditionally on
the log's last sequence (so exactly one writer wins each position) with a message id derived from
the leaves (so a retried batch is never appended twice). When another writer got there first, the
ledger reads what it missed, verifies and applies it, and tries again on top.

Callers are answered only after the log acknowledged the batch, i.e. once it is durable.

Some leaves can only be written once their batch is formed: a record's version is the next
one after what the log committed, so it is taken under the writer's lock, after catching up
with other writers, and taken again if the batch loses the race (:class:`LeafDraft`).

Raises :class:`ledger.errors.LedgerError` subclasses. A log adapter raises
:class:`~ledger.errors.LogConflictError` when another writer took the position (the ledger
catches up and tries again on top) and :class:`~ledger.errors.LogUnavailableError` while the
log cannot be reached (the same message is retried for a while); any other error of the log
fails the append at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ledger.batch import Batch, batch_id, decode_batch, encode_batch
from ledger.checkpoint import Checkpoint, SignedCheckpoint
from ledger.errors import (
    CheckpointError,
    CheckpointSignatureError,
    GroupCommitStoppedError,
    LeafFormatError,
    LedgerError,
    LogConflictError,
    LogUnavailableError,
    VerificationError,
)
from ledger.groupcommit import GroupCommitter
from ledger.keys import Signer, TrustedKeys
from ledger.leaves import decode_leaf, encode_leaf, is_trust_leaf
from ledger.merkle import leaf_hash
from ledger.stored_tree import TreeStore
from ledger.verify import verify_checkpoint

log = logging.getLogger("ledger.sequencer")

ZERO_HASH = bytes(32)


class LogLike(Protocol):
    """The part of ``gateway.backends.protocols.LogBackend`` the ledger uses. ``append``
    raises LogConflictError or LogUnavailableError as the module docstring says."""

    name: str

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int: ...

    async def last_seq(self) -> int: ...

    def read(self, start_seq: int = 1) -> Any: ...


#: Seconds after the last sign of another writer during which the fairness gap applies.
RIVAL_WINDOW = 10.0

#: Seconds between syncs of the stored tree (a cache of the log: a crash costs at most this
#: much of it, re-derived from the log on the next start).
TREE_SYNC_INTERVAL_S = 1.0


class LedgerUnavailableError(LedgerError):
    """The log could not take the batch; nothing in it was acknowledged."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an appended leaf landed: its index, the signed checkpoint of the batch, and the
    leaf's bytes as appended (for a :class:`LeafDraft`, what it was completed to)."""

    index: int
    tree_size: int
    root: bytes
    checkpoint: SignedCheckpoint
    leaf: bytes = b""


class LeafDraft(ABC):
    """A leaf completed only when its batch is formed, under the writer's lock and against the
    ledger as it then stands (every other writer's batches applied): a record's next version
    is taken from what the log committed, never reserved ahead of it, so two processes of one
    institution cannot both write version 2. A batch that loses the race is formed again, so
    :meth:`complete` may be called more than once; it depends only on the views (which the
    ledger's listeners keep) and on ``scratch``, a dict the drafts of one forming share (for
    versions given earlier in the same batch)."""

    __slots__ = ()

    @abstractmethod
    def complete(self, scratch: dict[str, Any]) -> bytes:
        """The leaf's canonical bytes. Raises LeafFormatError."""


Leaf = bytes | LeafDraft


LeafListener = Callable[[int, Sequence[bytes], int], None]
"""Called with (first leaf index, leaves, log sequence) for every batch applied, in order."""


@dataclass
class LedgerStats:
    """Counters exposed as metrics."""

    batches_written: int = 0
    leaves_written: int = 0
    conflicts: int = 0


class Ledger:
    """A node's view of the shared ledger, and its writer."""

    def __init__(
        self,
        *,
        log: LogLike,
        tree: TreeStore,
        signer: Signer,
        trusted: TrustedKeys,
        origin: str,
        max_leaves: int = 500,
        max_delay: float = 0.005,
        retries: int | None = None,
        race_window: float = 30.0,
        unavailable_window: float = 5.0,
        fair_gap: float = 0.015,
        clock: Callable[[], float] = time.time,
        on_batch: Callable[[int], None] | None = None,
        tree_sync_interval: float = TREE_SYNC_INTERVAL_S,
    ) -> None:
        self._log = log
        self.tree = tree
        self._signer = signer
        self.trusted = trusted
        self.origin = origin
        self._retries = retries
        self._race_window = race_window
        self._unavailable_window = unavailable_window
        self._fair_gap = fair_gap
        self._last_own = -1e9  # monotonic time of this writer's last appended batch
        self._last_rival = -1e9  # when another writer's batch or a lost race was last seen
        self._clock = clock
        self._tree_sync_interval = tree_sync_interval
        self._tree_synced_at = time.monotonic()
        self._committer: GroupCommitter[Leaf, AppendResult] = GroupCommitter(
            self._write_group,
            name="ledger",
            max_items=max_leaves,
            max_delay=max_delay,
            on_batch=on_batch,
        )
        self._follower: asyncio.Task[None] | None = None
        self._following = False
        self._listeners: list[LeafListener] = []
        self._io_lock = asyncio.Lock()
        self._seen_batches: set[str] = set()
        self.applied_seq = 0
        self.size = 0
        self.latest: SignedCheckpoint | None = None
        # Hex SHA-256 of every trust file anchored by a ``key`` leaf of action ``trust``.
        self.trust_anchors: set[str] = set()
        # The batch index: tree size after each applied batch and its log sequence, ascending
        # (a batch's leaves are [previous end, end)). Re-appended duplicates are not in it.
        self._batch_ends: list[int] = []
        self._batch_seqs: list[int] = []
        self.stats = LedgerStats()

    # ---- lifecycle -------------------------------------------------------------------------

    def add_listener(self, listener: LeafListener) -> None:
        """Register a view to be told of every applied batch (before :meth:`start`)."""
        self._listeners.append(listener)

    async def start(self, *, follow_interval: float | None = 1.0) -> None:
        """Replay the log into the tree and views, then start the writer (and follower) tasks.

        Raises LedgerError if the log does not verify, BackendError if it cannot be read.
        """
        async with self._io_lock:
            if await self._catch_up_locked():
                await self._sync_tree()
        self._committer.start()
        if follow_interval:
            self._following = True
            self._follower = asyncio.create_task(
                self._follow_loop(follow_interval), name="ledger-follower"
            )

    async def stop(self) -> None:
        """Stop the tasks; pending appends fail with LedgerUnavailableError."""
        if self._follower is not None:
            # The flag ends the loop at its next turn even if the cancellation is lost: on
            # Python 3.11 a wait_for (the NATS client's requests use it) swallows a
            # cancellation that arrives as its answer does, which left `gateway serve`
            # waiting here for ever once in a few dozen stops.
            self._following = False
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self._committer.stop()
        self.tree.flush()

    # ---- reading the log ------------------------------------------------------------------

    async def catch_up(self, until: int | None = None) -> int:
        """Apply every log message after the last applied one; return how many were applied.
        With ``until``, nothing is read when the view already reached log message ``until``
        by the time it is its turn (e.g. this writer's own append in flight got there).

        Raises LedgerError when a batch does not verify, BackendError when the log fails.
        """
        async with self._io_lock:
            if until is not None and self.applied_seq >= until:
                return 0
            return await self._catch_up_locked()

    async def _catch_up_locked(self) -> int:
        n = 0
        async for entry in self._log.read(self.applied_seq + 1):
            self._apply(entry.seq, entry.data)
            n += 1
        if n:
            await self._sync_tree_when_due()
        return n

    async def _sync_tree_when_due(self) -> None:
        """Sync the stored tree if the last sync is ``tree_sync_interval`` old. The tree is a
        cache of the log (what a crash leaves unsynced is re-derived from the log on the
        next start), so appends do not wait for it. Raises LedgerError."""
        if time.monotonic() - self._tree_synced_at >= self._tree_sync_interval:
            self._tree_synced_at = time.monotonic()  # a failed sync is retried an interval on
            await self._sync_tree()

    async def _sync_tree(self) -> None:
        """Make the stored tree durable: fsync its written files in parallel threads, then its
        directory, and record its size as synced. Raises LedgerError."""
        try:
            fds = self.tree.unsynced()
            await asyncio.gather(*(asyncio.to_thread(os.fsync, fd) for fd in fds))
            self.tree.mark_synced()  # only once every fsync succeeded: a failed one is retried
            await asyncio.to_thread(self.tree.record_synced)
        except OSError as err:
            raise LedgerError(f"cannot sync the stored tree: {err.strerror}") from err

    def _apply(self, seq: int, data: bytes) -> None:
        batch = decode_batch(data, seq=seq)
        if batch.batch_id in self._seen_batches:
            log.warning("skipping re-appended batch", extra={"seq": seq, "batch": batch.batch_id})
            self.applied_seq = seq
            return
        first = self.size
        where = f"log message {seq} (leaves {first}..{first + len(batch.leaves) - 1})"
        try:
            signed = SignedCheckpoint.from_bytes(batch.checkpoint)
            cp = verify_checkpoint(signed, self.trusted)
        except CheckpointSignatureError as exc:
            err = CheckpointSignatureError(f"{where}: checkpoint {exc}")
            err.key_name, err.alg = exc.key_name, exc.alg
            raise err from exc
        except VerificationError as exc:
            raise CheckpointError(f"{where}: checkpoint {exc}") from exc
        hashes = [leaf_hash(leaf) for leaf in batch.leaves]
        self._extend_tree(hashes)
        expected_prev = self.latest.body_hash() if self.latest is not None else ZERO_HASH
        problems = []
        if cp.origin != self.origin:
            problems.append(f"origin {cp.origin!r} is not {self.origin!r}")
        if cp.size != first + len(hashes):
            problems.append(f"size {cp.size} but the log gives {first + len(hashes)}")
        elif cp.root != self.tree.root(cp.size):
            problems.append("root does not match the tree derived from the log")
        if cp.prev != expected_prev:
            problems.append("previous-checkpoint hash does not link to the chain")
        if batch_id(batch.writer, hashes, batch.nonce) != batch.batch_id:
            problems.append("batch id does not match its leaves")
        if batch.writer != signed.writer:
            problems.append(f"batch names writer {batch.writer!r}, checkpoint {signed.writer!r}")
        if problems:
            self.tree.truncate(first)
            raise CheckpointError(f"{where}: " + "; ".join(problems))
        if batch.writer != self._signer.name:
            self._last_rival = time.monotonic()
        self._commit(seq, batch, signed, first)

    def _extend_tree(self, hashes: Sequence[bytes]) -> None:
        # The stored tree may already hold these leaves (reopened file-backed store).
        first = self.size
        stored = self.tree.size
        if stored > first:
            overlap = min(stored - first, len(hashes))
            for i in range(overlap):
                if self.tree.leaf_hash(first + i) != hashes[i]:
                    # The local copy diverges from the log: the log wins.
                    self.tree.truncate(first + i)
                    break
            else:
                if overlap == len(hashes):
                    return
            hashes = hashes[self.tree.size - first :]
        self.tree.append(hashes)

    def _commit(self, seq: int, batch: Batch, signed: SignedCheckpoint, first: int) -> None:
        self.applied_seq = seq
        self.size = first + len(batch.leaves)
        self.latest = signed
        self._seen_batches.add(batch.batch_id)
        self._batch_ends.append(self.size)
        self._batch_seqs.append(seq)
        for leaf in batch.leaves:
            if is_trust_leaf(leaf):
                try:
                    fields = decode_leaf(leaf)
                except LeafFormatError:
                    continue
                if fields.get("kind") == "key":
                    self.trust_anchors.add(str(fields["sha256"]))
        for listener in self._listeners:
            listener(first, batch.leaves, seq)

    # ---- writing ---------------------------------------------------------------------------

    async def append(self, leaves: Sequence[Leaf]) -> list[AppendResult]:
        """Append leaves (bytes, or drafts completed when their batch is formed); return once
        they are durable in the log.

        Raises LedgerUnavailableError (or the log adapter's error) when they could not be
        appended, LeafFormatError when a draft cannot be completed.
        """
        if not leaves:
            return []
        try:
            return await self._committer.submit(leaves)
        except GroupCommitStoppedError as exc:
            raise LedgerUnavailableError(str(exc)) from exc

    @staticmethod
    def _complete(items: Sequence[Leaf]) -> list[bytes]:
        """The bytes of a batch's leaves, its drafts completed now (in order)."""
        scratch: dict[str, Any] = {}
        return [x if isinstance(x, bytes) else x.complete(scratch) for x in items]

    async def _write_group(self, items: list[Leaf]) -> list[AppendResult]:
        """Append one group of leaves as one batch (the group commit's batch function)."""
        nonce = os.urandom(16)
        has_drafts = any(not isinstance(x, bytes) for x in items)
        tried: dict[str, list[bytes]] = {}  # batch id -> leaves of each attempt
        last_exc: Exception | None = None
        attempts = 0
        deadline = time.monotonic() + self._race_window
        async with self._io_lock:
            while True:
                attempts += 1
                if attempts > 1 and (
                    time.monotonic() > deadline
                    or (self._retries is not None and attempts > self._retries)
                ):
                    break
                if attempts == 1:
                    await self._yield_to_other_writers()
                for bid, done in tried.items():
                    if bid in self._seen_batches:
                        # An earlier attempt was appended after all (seen while catching up).
                        return self._results_for(done)
                if has_drafts or attempts == 1:
                    leaves = self._complete(items)
                    hashes = [leaf_hash(leaf) for leaf in leaves]
                    bid = batch_id(self._signer.name, hashes, nonce)
                    tried[bid] = leaves
                first = self.size
                self.tree.append(hashes)
                size = first + len(hashes)
                root = self.tree.root(size)
                prev = self.latest.body_hash() if self.latest is not None else ZERO_HASH
                cp = Checkpoint(
                    origin=self.origin,
                    size=size,
                    root=root,
                    prev=prev,
                    time=int(self._clock() * 1000),
                )
                # ML-DSA-65 signing takes about 0.6 ms of CPU and releases the GIL: in a
                # thread, the event loop serves other callers meanwhile.
                signed = await asyncio.to_thread(self._signer.sign, cp)
                batch = Batch(
                    writer=self._signer.name,
                    batch_id=bid,
                    leaves=tuple(leaves),
                    checkpoint=signed.to_bytes(),
                    nonce=nonce,
                )
                try:
                    seq = await self._append_retrying(encode_batch(batch), bid)
                except LogConflictError as exc:
                    self.tree.truncate(first)
                    self.stats.conflicts += 1
                    self._last_rival = time.monotonic()
                    last_exc = exc
                    await self._catch_up_locked()
                    continue
                except BaseException:
                    self.tree.truncate(first)
                    raise
                if seq != self.applied_seq + 1:
                    # A duplicate of an earlier attempt that landed elsewhere in the log.
                    self.tree.truncate(first)
                    await self._catch_up_locked()
                    continue
                self._commit(seq, batch, signed, first)
                self._last_own = time.monotonic()
                # The batch is durable in the log; the stored tree follows from time to time,
                # and a failure to sync it does not undo the append (retried next interval).
                try:
                    await self._sync_tree_when_due()
                except LedgerError:
                    log.exception("stored tree not synced")
                self.stats.batches_written += 1
                self.stats.leaves_written += len(leaves)
                return [
                    AppendResult(
                        index=first + i, tree_size=size, root=root, checkpoint=signed, leaf=leaf
                    )
                    for i, leaf in enumerate(leaves)
                ]
        raise LedgerUnavailableError(
            f"batch {bid[:16]} lost the race for a log position {attempts - 1} times in "
            f"{self._race_window:g} s; nothing in it was acknowledged"
        ) from last_exc

    async def _yield_to_other_writers(self) -> None:
        """Fairness between writers sharing the log. A writer that lost a race must read what
        it missed before it can sign again (a round trip to the log), while the winner could
        send its next batch at once and so win every race. A writer therefore leaves at least
        ``fair_gap`` seconds between the end of its last successful append and the start of
        its next group's first attempt; a loser's retries are not delayed. A lone writer under
        load loses little: the leaves of its callers gather into a larger batch meanwhile; a
        lone request after a quiet spell is not delayed at all. A writer whose trust list names
        no other writer, and that has seen no other writer's batch nor lost a race for
        ``RIVAL_WINDOW`` seconds, is alone on the log and does not wait. Raises nothing.
        """
        now = time.monotonic()
        alone = all(name == self._signer.name for name in self.trusted)
        if alone and now - self._last_rival > RIVAL_WINDOW:
            return
        wait = self._last_own + self._fair_gap - now
        if wait > 0:
            await asyncio.sleep(wait)

    async def _append_retrying(self, data: bytes, bid: str) -> int:
        """Append one batch; while the log is unavailable (e.g. electing a new stream leader),
        retry the *same* message (same expected sequence, same message id, so a copy that did
        land is recognised, never appended twice) for up to ``unavailable_window`` seconds.

        Raises LogConflictError (and any error of the log other than LogUnavailableError) at
        once, LedgerUnavailableError when the window runs out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._unavailable_window
        delay = 0.05
        while True:
            try:
                return await self._log.append(data, expected_last_seq=self.applied_seq, msg_id=bid)
            except LogUnavailableError as exc:
                if loop.time() + delay > deadline:
                    raise LedgerUnavailableError(
                        f"the log ({self._log.name}) did not accept batch {bid[:16]} within "
                        f"{self._unavailable_window:g} s: {exc}; nothing in it was acknowledged"
                    ) from exc
                log.warning(
                    "log unavailable, retrying batch",
                    extra={"batch": bid[:16], "error": str(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _results_for(self, leaves: Sequence[bytes]) -> list[AppendResult]:
        assert self.latest is not None
        out = []
        for leaf in leaves:
            idx = self.tree.index_of(leaf_hash(leaf))
            if idx is None or idx >= self.size:
                raise LedgerError("re-appended batch not found in the tree")
            out.append(
                AppendResult(
                    index=idx,
                    tree_size=self.size,
                    root=self.tree.root(self.size),
                    checkpoint=self.latest,
                    leaf=leaf,
                )
            )
        return out

    async def _follow_loop(self, interval: float) -> None:
        while self._following:
            await asyncio.sleep(interval)
            if not self._following:
                return
            try:
                if await self._log.last_seq() > self.applied_seq:
                    await self.catch_up()
            except Exception:
                log.exception("ledger follower could not catch up")

    # ---- proofs ----------------------------------------------------------------------------

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``tree_size`` (default: now).

        Raises LedgerError when the index or size is out of range.
        """
        size = self.size if tree_size is None else tree_size
        if not 0 <= index < size <= self.size:
            raise LedgerError(f"no leaf {index} in a tree of size {size} (ledger size {self.size})")
        return self.tree.inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between two committed sizes. Raises LedgerError."""
        if not 0 < first <= second <= self.size:
            raise LedgerError(f"no consistency proof from {first} to {second} (size {self.size})")
        return self.tree.consistency_proof(first, second)

    def leaf_hash(self, index: int) -> bytes:
        """The RFC 9162 hash of leaf ``index``. Raises LedgerError when there is no such leaf."""
        if not 0 <= index < self.size:
            raise LedgerError(f"no leaf {index} (ledger size {self.size})")
        return self.tree.leaf_hash(index)

    def index_of(self, leaf_hash: bytes) -> int | None:
        """The index of the leaf with this hash, or None. Raises nothing."""
        found = self.tree.index_of(leaf_hash)
        return found if found is not None and found < self.size else None

    def root(self, tree_size: int | None = None) -> bytes:
        """The root hash of the tree of ``tree_size`` leaves (default: now). Raises
        LedgerError when the size is beyond the ledger."""
        size = self.size if tree_size is None else tree_size
        if not 0 <= size <= self.size:
            raise LedgerError(f"no tree of size {size} (ledger size {self.size})")
        return self.tree.root(size)

    async def leaves(self, start: int, end: int) -> list[bytes]:
        """The stored bytes of leaves ``start`` to ``end - 1``, read back from the log (one
        read from the batch holding ``start``). Raises LedgerError for a range beyond the
        ledger, BackendError when the log cannot be read."""
        if not 0 <= start < end <= self.size:
            raise LedgerError(f"no leaves {start}..{end - 1} (ledger size {self.size})")
        i = bisect.bisect_right(self._batch_ends, start)
        first = self._batch_ends[i - 1] if i else 0
        out: list[bytes] = []
        async for entry in self._log.read(self._batch_seqs[i]):
            j = bisect.bisect_left(self._batch_seqs, entry.seq)
            if j == len(self._batch_seqs) or self._batch_seqs[j] != entry.seq:
                continue  # a re-appended duplicate batch: not part of the tree
            first = self._batch_ends[j - 1] if j else 0
            for offset, leaf in enumerate(decode_batch(entry.data, seq=entry.seq).leaves):
                if start <= first + offset < end:
                    out.append(leaf)
            if len(out) >= end - start:
                break
        return out

    def close(self) -> None:
        """Close the stored tree (after :meth:`stop`). Raises nothing."""
        self.tree.close()

    # ---- checkpoints and trust -------------------------------------------------------------

    def batch_sizes(self) -> list[int]:
        """Tree sizes at which a batch (and so a writer-signed checkpoint) ends. Raises nothing."""
        return list(self._batch_ends)

    async def checkpoint_at(self, size: int) -> SignedCheckpoint | None:
        """The writer-signed checkpoint of the batch ending at tree ``size``, read back from the
        log, or None when no batch ends there. Raises BackendError when the log fails."""
        i = bisect.bisect_left(self._batch_ends, size)
        if i == len(self._batch_ends) or self._batch_ends[i] != size:
            return None
        if self.latest is not None and self.latest.checkpoint.size == size:
            return self.latest
        async for entry in self._log.read(self._batch_seqs[i]):
            return SignedCheckpoint.from_bytes(decode_batch(entry.data, seq=entry.seq).checkpoint)
        return None

    async def ensure_trust_anchored(self, trusted: TrustedKeys, *, source: str) -> int | None:
        """Append a ``key`` leaf of action ``trust`` carrying ``trusted.digest()`` unless a leaf
        already anchors that digest; return the new leaf's index, or None when already anchored.

        Raises LedgerUnavailableError (or the log's BackendError) when the append fails.
        """
        digest = trusted.digest().hex()
        if digest in self.trust_anchors:
            return None
        leaf = encode_leaf(
            "key",
            {
                "action": "trust",
                "sha256": digest,
                "source": source,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())),
            },
        )
        (result,) = await self.append([leaf])
        return result.index
