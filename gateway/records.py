"""The record service: the one way every entry point stores and reads records.

FHIR REST, HL7 v2 (MLLP and HTTP) and imaging all come through here, so the rules live once:

- record ids are scoped by the custodian (:meth:`RecordPipeline.record_of`: this gateway's
  institution), so ``Patient/p-1`` of two institutions sharing the ledger are two records;
- versions are those the ledger committed (taken when the record's leaf is appended, never
  reserved ahead of it: :mod:`gateway.pipeline`);
- the access seam (:mod:`gateway.access`) is asked before anything is stored or decrypted,
  with the caller and the record's metadata (custodian, patient, type);
- every store answers with receipts (:class:`Receipt`: leaf index, tree size, root, inclusion
  proof, signed checkpoint, CID), whatever the entry point;
- patients known under several pseudonyms are linked on the ledger (``link`` leaves), and
  reads of a patient's records cover every pseudonym linked to it.

Raises :class:`gateway.errors.NotFoundError`, :class:`gateway.access.AccessDeniedError`,
:class:`gateway.errors.BackendError`, :class:`ledger.errors.LedgerError`,
:class:`gateway.errors.IntegrityError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from gateway.access import AccessDeniedError, AccessPolicy, AccessRequest, Interaction
from gateway.errors import GoneError, NotFoundError
from gateway.observability import Metrics
from gateway.pipeline import PreparedResource, ReadRecord, RecordInput, RecordPipeline, StoredRecord
from gateway.views import RecordAnchor, RecordIndex
from gateway.witness_service import WitnessService
from ledger.errors import GroupCommitStoppedError
from ledger.groupcommit import GroupCommitter
from ledger.leaves import encode_leaf
from ledger.sequencer import Ledger

if TYPE_CHECKING:
    from gateway.search.extract import IndexRows

    #: The rows form of an indexer, for resources whose index rows were computed where they
    #: were prepared (the HL7 conversion workers): called with each stored version, its
    #: patient's pseudonym and its rows; same contract as :data:`Indexer`.
    RowsIndexer = Callable[[Sequence[tuple[StoredRecord, str, IndexRows]]], Awaitable[None]]

log = logging.getLogger("gateway.records")

LinkReason = Literal["master-identifier", "merge", "patient-link"]

#: Stored versions of HL7 messages the derived views take at most in one write.
INDEX_BATCH_MAX = 2048

#: Called with every stored record version and its resource (as stored, ``meta.versionId``
#: set) once it is durable and before the store returns, so what a caller was acknowledged is
#: already there (the search index).
Indexer = Callable[[Sequence[tuple[StoredRecord, dict[str, Any]]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that a record version is on the ledger: its leaf, the tree it was proved in (with
    the inclusion proof, RFC 9162) and that tree's signed checkpoint, and where its ciphertext
    is (block CID and byte range in it when packed)."""

    leaf_index: int
    tree_size: int
    root: bytes
    proof: list[bytes]
    checkpoint: bytes
    cid: str
    byte_range: tuple[int, int] | None


def _with_version(prepared: PreparedResource, record: StoredRecord) -> dict[str, Any]:
    """A prepared resource as it was stored (its ``meta`` members, version, lastUpdated)."""
    resource: dict[str, Any] = orjson.loads(prepared.body)
    meta: dict[str, Any] = orjson.loads(b"{%s}" % prepared.meta) if prepared.meta else {}
    resource["meta"] = {
        "versionId": str(record.version),
        "lastUpdated": record.last_updated,
        **meta,
    }
    return resource


#: One HL7 message resource on its way to the derived views: the stored version, its
#: patient's pseudonym, the prepared resource and its index rows (None: not computed).
_MessageItem = tuple[StoredRecord, str, PreparedResource, "IndexRows | None"]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One version in a history: its anchor, the resource id and the resource (None when the
    version is a deletion)."""

    anchor: RecordAnchor
    resource_id: str
    resource: dict[str, Any] | None


class RecordService:
    """Stores and reads records for every entry point (see the module docstring)."""

    def __init__(
        self,
        *,
        pipeline: RecordPipeline,
        index: RecordIndex,
        ledger: Ledger,
        witness: WitnessService,
        policy: AccessPolicy,
        metrics: Metrics,
        institution: str,
        receipt_wait_final_ms: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.index = index
        self.ledger = ledger
        self.witness = witness
        self.policy = policy
        self.metrics = metrics
        self.institution = institution
        self._wait_final = receipt_wait_final_ms / 1000.0
        self._indexers: list[tuple[Indexer, RowsIndexer | None]] = []
        self._pending: set[asyncio.Future[list[None]]] = set()
        # The records of HL7 messages stored at the same time reach the derived views in one
        # write (group commit, like the ledger's), before their acknowledgement.
        self._group_index: GroupCommitter[_MessageItem, None] = GroupCommitter(
            self._index_messages, name="index", max_items=INDEX_BATCH_MAX, max_delay=0.0
        )

    def start(self) -> None:
        """Start the grouping of index writes (inside the running loop)."""
        self._group_index.start()

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until the index writes in flight are done. Raises nothing."""
        pending = list(self._pending)
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def stop(self) -> None:
        """Finish the index writes in flight, then stop. Raises nothing."""
        await self.drain()
        await self._group_index.stop()

    def add_indexer(self, indexer: Indexer, *, rows: RowsIndexer | None = None) -> None:
        """Register a derived view kept up to date at every store (see :data:`Indexer`);
        ``rows``, its form for resources whose index rows come precomputed (HL7 messages;
        see :data:`RowsIndexer`)."""
        self._indexers.append((indexer, rows))

    # ---- ids -------------------------------------------------------------------------------

    def record_of(self, resource_type: str, resource_id: str) -> str:
        """The ledger's opaque id of this institution's ``resource_type/resource_id``."""
        return self.pipeline.record_of(resource_type, resource_id)

    def patient_of(self, resource_type: str, resource_id: str) -> str | None:
        """The pseudonym of a stored resource's patient, or None if it is not stored here."""
        return self.pipeline.patient_of(resource_type, resource_id)

    @property
    def no_patient(self) -> str:
        """The pseudonym records that belong to no patient are filed under."""
        return self.pipeline.no_patient

    # ---- writing ---------------------------------------------------------------------------

    async def store(
        self,
        inputs: Sequence[RecordInput],
        *,
        caller: object | None = None,
        links: Iterable[tuple[str, str, LinkReason]] = (),
    ) -> list[StoredRecord]:
        """Check each write with the access seam, anchor the patient links given ((from, to,
        reason); see :meth:`link`), then store the resources (one record each); return once
        all of it is durable. Raises AccessDeniedError (nothing stored), BackendError,
        LedgerError."""
        for item in inputs:
            rtype = str(item.resource["resourceType"])
            exists = self.index.latest(self.record_of(rtype, str(item.resource["id"])))
            await self._check(caller, "update" if exists else "create", rtype, item.patient)
        await self.link(links)
        stored = await self.pipeline.store(inputs)
        if self._indexers:
            await self._index(list(zip(stored, (i.resource for i in inputs), strict=True)))
        return await self._stored(stored)

    async def store_message(
        self,
        resources: Sequence[PreparedResource],
        *,
        patient: str,
        container_id: str,
        caller: object | None = None,
        links: Iterable[tuple[str, str, LinkReason]] = (),
        index: Sequence[IndexRows] | None = None,
    ) -> list[StoredRecord]:
        """Store everything one source message produced as one container (see
        :meth:`RecordPipeline.store_group`), after the access check and the patient links,
        and index it: returns once the derived views hold it too (so what the caller
        acknowledges is searchable). ``index``: the resources' index rows when they were
        computed beforehand (the HL7 conversion workers), in the order of ``resources``.
        The index writes of messages stored at the same time are grouped into one.
        Raises as :meth:`store` (BackendError also when the index write fails: the records
        are then stored but not yet indexed; the next start catches them up), and
        ValueError for a malformed group."""
        for r in resources:
            exists = self.index.latest(r.record)
            await self._check(caller, "update" if exists else "create", r.type, patient)
        await self.link(links)
        stored = await self.pipeline.store_group(
            resources, patient=patient, container_id=container_id
        )
        if self._indexers:
            rows: Sequence[IndexRows | None] = (
                index
                if index is not None and len(index) == len(resources)
                else [None] * len(stored)
            )
            items = [
                (record, patient, prepared, r)
                for record, prepared, r in zip(stored, resources, rows, strict=True)
            ]
            try:
                fut = self._group_index.enqueue(items)
            except GroupCommitStoppedError:
                log.warning("records stored while stopping: indexed at the next start")
            else:
                self._pending.add(fut)
                fut.add_done_callback(self._pending.discard)
                try:
                    await fut
                except GroupCommitStoppedError:
                    log.warning("records stored while stopping: indexed at the next start")
        return await self._stored(stored)

    async def _index_messages(self, items: list[_MessageItem]) -> list[None]:
        """One write per derived view for the resources of every message grouped here: the
        rows form where every resource has its rows, else the resources parsed again."""
        parsed: list[tuple[StoredRecord, dict[str, Any]]] | None = None
        precomputed = all(r is not None for _, _, _, r in items)
        for indexer, rows_indexer in self._indexers:
            if rows_indexer is not None and precomputed:
                await rows_indexer([(s, patient, r) for s, patient, _, r in items if r is not None])
                continue
            if parsed is None:
                parsed = [(s, _with_version(p, s)) for s, _, p, _ in items]
            await indexer(parsed)
        return [None] * len(items)

    async def _index(self, items: list[tuple[StoredRecord, dict[str, Any]]]) -> None:
        for indexer, _ in self._indexers:
            await indexer(items)

    async def _stored(self, stored: list[StoredRecord]) -> list[StoredRecord]:
        """Count what was stored; with ``receipt_wait_final_ms`` and a witness quorum, wait
        (bounded) until a checkpoint covering it is cosigned and move the receipts onto it."""
        self.metrics.count_stored(s.resource_type for s in stored)
        if not stored or self._wait_final <= 0 or self.witness.quorum <= 0:
            return stored
        try:
            final = await self.witness.wait_final(
                max(s.tree_size for s in stored), self._wait_final
            )
        except TimeoutError:
            return stored
        cp = final.checkpoint
        return [s._replace(tree_size=cp.size, root=cp.root, checkpoint=final) for s in stored]

    async def link(self, links: Iterable[tuple[str, str, LinkReason]]) -> int:
        """Anchor a ``link`` leaf for each (from, to, reason) where ``from`` already has
        records or links and is not yet linked to ``to``: from then on both pseudonyms name one
        patient for reads, consent and erasure. Returns how many were anchored. Raises
        LedgerError, BackendError."""
        leaves = []
        seen: set[tuple[str, str]] = set()
        for source, target, reason in links:
            if source == target or (source, target) in seen:
                continue
            seen.add((source, target))
            known = self.index.has_patient(source) or len(self.index.links.all_of(source)) > 1
            if not known or self.index.links.linked(source, target):
                continue
            leaves.append(
                encode_leaf(
                    "link",
                    {
                        "from": source,
                        "to": target,
                        "reason": reason,
                        "source": self.institution,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                )
            )
        if leaves:
            await self.ledger.append(leaves)
        return len(leaves)

    # ---- reading ---------------------------------------------------------------------------

    async def read(
        self,
        resource_type: str,
        resource_id: str,
        *,
        caller: object | None = None,
        version: int | None = None,
    ) -> ReadRecord:
        """The latest version of this institution's resource (or version ``version``),
        decrypted after the access check and the check against its anchor.

        Raises NotFoundError (also when the version does not exist), AccessDeniedError,
        IntegrityError, KeyDestroyedError, BackendError.
        """
        rec = self.record_of(resource_type, resource_id)
        anchor = self.index.latest(rec) if version is None else self.index.version(rec, version)
        if anchor is None:
            what = f"{resource_type}/{resource_id}"
            raise NotFoundError(
                f"{what} is not known" if version is None else f"{what} has no version {version}"
            )
        interaction: Interaction = "read" if version is None else "vread"
        await self._check(caller, interaction, resource_type, anchor.patient, anchor.source)
        if anchor.deleted:
            raise GoneError(f"{resource_type}/{resource_id} version {anchor.version} is deleted")
        return ReadRecord(await self.pipeline.read_anchor(anchor), anchor)

    async def delete(
        self, resource_type: str, resource_id: str, *, caller: object | None = None
    ) -> StoredRecord | None:
        """Delete this institution's resource: anchor a tombstone version (reads then answer
        410; the history keeps every version). None when it is already deleted (nothing is
        written). Raises NotFoundError for a resource never stored, AccessDeniedError,
        BackendError, LedgerError."""
        rec = self.record_of(resource_type, resource_id)
        anchor = self.index.latest(rec)
        if anchor is None:
            raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        await self._check(caller, "delete", resource_type, anchor.patient, anchor.source)
        if anchor.deleted:
            return None
        tombstone = {"resourceType": resource_type, "id": resource_id}
        (stored,) = await self.pipeline.store(
            [RecordInput(tombstone, anchor.patient, deleted=True)]
        )
        if self._indexers:
            await self._index([(stored, tombstone)])
        return (await self._stored([stored]))[0]

    async def history(
        self,
        resource_type: str,
        resource_id: str | None = None,
        *,
        caller: object | None = None,
        before: int | None = None,
        count: int = 50,
    ) -> list[HistoryEntry]:
        """Versions of one of this institution's resources (or, without ``resource_id``, of
        every resource of the type), newest first, each with its resource (None for a
        deletion, whose tombstone is still read for the resource's id). ``before``: only
        versions anchored at a leaf index below it (the next page); at most ``count``.
        Versions the access seam refuses are left out. Raises NotFoundError (an unknown
        resource), BackendError, IntegrityError."""
        if resource_id is not None:
            anchors = self.index.history(self.record_of(resource_type, resource_id))
            if not anchors:
                raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        else:
            anchors = self.index.versions_of_type(resource_type, self.institution)
        out: list[HistoryEntry] = []
        for anchor in reversed(anchors):
            if before is not None and anchor.leaf_index >= before:
                continue
            try:
                await self._check(caller, "history", resource_type, anchor.patient, anchor.source)
            except AccessDeniedError:
                continue
            resource = await self.pipeline.read_anchor(anchor)
            rid = str(resource["id"])
            out.append(HistoryEntry(anchor, rid, None if anchor.deleted else resource))
            if len(out) >= count:
                break
        return out

    def records_of_patient(self, patient: str) -> list[RecordAnchor]:
        """The latest version of every record of a patient, under every pseudonym linked to
        it (no access check: callers check each record they return)."""
        return self.index.records_of(patient)

    # ---- receipts --------------------------------------------------------------------------

    def receipt_of_anchor(self, anchor: RecordAnchor) -> Receipt:
        """The receipt of an anchored version, proved in the ledger's latest checkpoint.
        Raises LedgerError."""
        latest = self.ledger.latest
        assert latest is not None  # an anchor exists, so the ledger has a checkpoint
        size = latest.checkpoint.size
        return Receipt(
            leaf_index=anchor.leaf_index,
            tree_size=size,
            root=latest.checkpoint.root,
            proof=self.ledger.inclusion_proof(anchor.leaf_index, size),
            checkpoint=latest.to_bytes(),
            cid=anchor.cid,
            byte_range=anchor.byte_range,
        )

    def receipt(self, stored: StoredRecord, encoded: dict[int, bytes] | None = None) -> Receipt:
        """The receipt of a stored record. ``encoded`` caches serialised checkpoints (the
        records of one batch share one). Raises LedgerError."""
        cache = {} if encoded is None else encoded
        checkpoint = cache.get(id(stored.checkpoint))
        if checkpoint is None:
            checkpoint = cache[id(stored.checkpoint)] = stored.checkpoint.to_bytes()
        return Receipt(
            leaf_index=stored.leaf_index,
            tree_size=stored.tree_size,
            root=stored.root,
            proof=self.ledger.inclusion_proof(stored.leaf_index, stored.tree_size),
            checkpoint=checkpoint,
            cid=stored.cid,
            byte_range=stored.byte_range,
        )

    # ---- the seam --------------------------------------------------------------------------

    async def _check(
        self,
        caller: object | None,
        interaction: Interaction,
        resource_type: str,
        patient: str,
        custodian: str | None = None,
    ) -> None:
        await self.policy.check(
            caller,
            AccessRequest(interaction, resource_type, custodian or self.institution, patient),
        )
