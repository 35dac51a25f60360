"""The record service: the one way every entry point stores and reads records.

FHIR REST, HL7 v2 (MLLP and HTTP) and imaging all come through here, so the rules live once:

- record ids are scoped by the custodian (:meth:`RecordPipeline.record_of`: this gateway's
  institution), so ``Patient/p-1`` of two institutions sharing the ledger are two records;
- versions are those the ledger committed (taken when the record's leaf is appended, never
  reserved ahead of it: :mod:`gateway.pipeline`);
- the access seam (:mod:`gateway.access`) is asked before anything is stored or decrypted,
  with the caller and the record's metadata (custodian, patient, type, and for reads its id,
  version and index metadata: codes, clinical date, security labels, from the search index's
  ``meta_of`` without decrypting; when the index is switched off or has not indexed that
  version yet, from the decrypted resource, before anything is returned);
- a read the seam denies answers exactly like a missing record (the same NotFoundError), so a
  caller cannot tell a record it may not see from one that does not exist;
- every decision about an authenticated caller (not internal calls: no caller, or the local
  sender) is given to the access log (:class:`gateway.access.AccessLog`) before anything is
  returned: a permitted record leaves only once its trace is durable;
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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from gateway.access import (
    AccessDecision,
    AccessDeniedError,
    AccessEvent,
    AccessLog,
    AccessPolicy,
    AccessRequest,
    Interaction,
    NoAccessLog,
)
from gateway.auth.caller import Caller
from gateway.consent import RecordMeta
from gateway.errors import GoneError, NotFoundError
from gateway.observability import Metrics
from gateway.pipeline import (
    FetchedRecord,
    PreparedResource,
    ReadRecord,
    RecordInput,
    RecordPipeline,
    StoredRecord,
)
from gateway.views import RecordAnchor, RecordIndex, anchors_of_leaf
from gateway.witness_service import WitnessService
from ledger.errors import GroupCommitStoppedError
from ledger.groupcommit import GroupCommitter
from ledger.leaves import RecordLeaf, decode_leaf, encode_leaf
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

#: Versions whose consent metadata a record service keeps in memory (about 1 KiB each).
META_CACHE = 20_000


@dataclass(frozen=True, slots=True)
class _Checked:
    """A read decided: ``type/id`` as asked, the version's anchor, the decision, the resource
    when the decision had to decrypt it, and the fetch of its ciphertext and keys started
    beside the decision (None for a deleted or shredded version)."""

    what: str
    anchor: RecordAnchor
    decision: AccessDecision
    resource: dict[str, Any] | None
    fetching: asyncio.Future[FetchedRecord] | None


def _discard(fut: asyncio.Future[Any]) -> None:
    """Cancel a fetch nobody will use, and retrieve its outcome so an error it ended with is
    not reported as never retrieved. Raises nothing."""
    if not fut.done():
        fut.cancel()
    fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())


#: Called with every stored record version and its resource (as stored, ``meta.versionId``
#: set) once it is durable and before the store returns, so what a caller was acknowledged is
#: already there (the search index).
Indexer = Callable[[Sequence[tuple[StoredRecord, dict[str, Any]]]], Awaitable[None]]

#: Where reads get a stored version's consent metadata without decrypting it: (custodian,
#: record, version) -> RecordMeta, or None when it does not know that version (the search
#: index's ``meta_of``).
MetaSource = Callable[[str, str, int], Awaitable[RecordMeta | None]]

#: Labels a stored resource gets (``meta.security`` codings, e.g. the dictionary's
#: ``labels(resource)``).
Labeller = Callable[[dict[str, Any]], list[dict[str, Any]]]


def logged(caller: object | None) -> bool:
    """Whether decisions about ``caller`` go to the access log: an authenticated caller, not
    an internal call (None) or the local sender. Raises nothing."""
    return isinstance(caller, Caller) and caller.kind != "local"


def add_labels(resource: dict[str, Any], labels: Sequence[dict[str, Any]]) -> None:
    """Add security labels to ``meta.security`` (those already there kept, none twice).
    Raises nothing."""
    if not labels:
        return
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        meta = resource["meta"] = {}
    have = meta.get("security")
    current = [x for x in have if isinstance(x, dict)] if isinstance(have, list) else []
    seen = {(x.get("system"), x.get("code")) for x in current}
    for label in labels:
        key = (label.get("system"), label.get("code"))
        if key not in seen:
            seen.add(key)
            current.append(dict(label))
    meta["security"] = current


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
        access_log: AccessLog | None = None,
        labeller: Labeller | None = None,
    ) -> None:
        self.pipeline = pipeline
        #: Where decisions of authenticated callers are logged (gateway/access_log.py);
        #: nothing until the app sets it (authentication on).
        self.access_log: AccessLog = access_log if access_log is not None else NoAccessLog()
        self.labeller = labeller
        self.meta_source: MetaSource | None = None
        self._metas: OrderedDict[tuple[str, str, int], tuple[str, RecordMeta]] = OrderedDict()
        self.index = index
        self.ledger = ledger
        self.witness = witness
        self.policy = policy
        self.metrics = metrics
        self.institution = institution
        self._wait_final = receipt_wait_final_ms / 1000.0
        #: Whether an anchored version was crypto-shredded (gateway/erasure.py sets it): a
        #: caller the policy permits is answered 410 for it, everyone else as for a missing one.
        self.shredded: Callable[[RecordAnchor], bool] = lambda anchor: False
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
        decisions: list[tuple[Interaction, AccessDecision]] = []
        for item in inputs:
            rtype = str(item.resource["resourceType"])
            exists = self.index.latest(self.record_of(rtype, str(item.resource["id"])))
            interaction: Interaction = "update" if exists else "create"
            try:
                decision = await self._check(caller, interaction, rtype, item.patient)
            except AccessDeniedError as exc:
                ref = f"{rtype}/{item.resource['id']}"
                await self._log(caller, interaction, item.patient, exc, (ref,))
                raise
            decisions.append((interaction, decision))
            if self.labeller is not None and not item.deleted:
                add_labels(item.resource, self.labeller(item.resource))
        await self.link(links)
        stored = await self.pipeline.store(inputs)
        if self._indexers:
            await self._index(list(zip(stored, (i.resource for i in inputs), strict=True)))
        if logged(caller):
            # One event per patient, interaction and decision, naming every record written
            # (as a search logs one per patient): a Bundle of one patient's results is one
            # AuditEvent and one ``access`` leaf, not one per resource.
            grouped: dict[tuple[Interaction, str, AccessDecision], list[str]] = {}
            for (interaction, decision), item, s in zip(decisions, inputs, stored, strict=True):
                ref = f"{s.resource_type}/{s.resource_id}/_history/{s.version}"
                grouped.setdefault((interaction, item.patient, decision), []).append(ref)
            await self.access_log.record(
                [
                    AccessEvent(caller, interaction, patient, decision, tuple(refs))
                    for (interaction, patient, decision), refs in grouped.items()
                ]
            )
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
        decrypted after the access check and the check against its anchor; the decision is
        logged (see the module docstring) before it is returned.

        Raises NotFoundError (also when the version does not exist, and when the access seam
        denies the read: a denied read is a missing record), GoneError (a deletion),
        ForbiddenError (a patient token reaching another patient's record), IntegrityError,
        KeyDestroyedError, BackendError and LedgerError (the access log failed: nothing is
        returned).
        """
        interaction: Interaction = "read" if version is None else "vread"
        try:
            checked = await self._decide_read(
                resource_type, resource_id, caller=caller, version=version, interaction=interaction
            )
        except AccessDeniedError as exc:
            anchor = self._anchor_of(resource_type, resource_id, version)
            assert anchor is not None  # denied, so it was found
            ref = f"{resource_type}/{resource_id}/_history/{anchor.version}"
            await self._log(caller, interaction, anchor.patient, exc, (ref,))
            raise self._missing(resource_type, resource_id, version) from exc
        anchor = checked.anchor
        ref = f"{resource_type}/{resource_id}/_history/{anchor.version}"
        # Permitted: the decision is logged while the fetched version is decrypted; nothing
        # is returned before the log is durable, and a failure of the log wins (a deletion,
        # a shredded record, a destroyed key are logged as permitted reads, then raised).
        logged, opened = await asyncio.gather(
            self._log(caller, interaction, anchor.patient, checked.decision, (ref,)),
            self._open(checked),
            return_exceptions=True,
        )
        if isinstance(logged, BaseException):
            raise logged
        if isinstance(opened, BaseException):
            raise opened
        return opened

    def _anchor_of(
        self, resource_type: str, resource_id: str, version: int | None
    ) -> RecordAnchor | None:
        rec = self.record_of(resource_type, resource_id)
        return self.index.latest(rec) if version is None else self.index.version(rec, version)

    @staticmethod
    def _missing(resource_type: str, resource_id: str, version: int | None) -> NotFoundError:
        what = f"{resource_type}/{resource_id}"
        return NotFoundError(
            f"{what} is not known" if version is None else f"{what} has no version {version}"
        )

    async def read_checked(
        self,
        resource_type: str,
        resource_id: str,
        *,
        caller: object | None,
        version: int | None = None,
        interaction: Interaction = "read",
    ) -> tuple[ReadRecord, AccessDecision]:
        """:meth:`read` without the access log and without hiding a denial: the decrypted
        record and the seam's decision (the search service logs one event per patient of a
        search instead). Raises NotFoundError, AccessDeniedError, GoneError, ForbiddenError,
        IntegrityError, KeyDestroyedError, BackendError."""
        checked = await self._decide_read(
            resource_type, resource_id, caller=caller, version=version, interaction=interaction
        )
        return await self._open(checked), checked.decision

    async def _decide_read(
        self,
        resource_type: str,
        resource_id: str,
        *,
        caller: object | None,
        version: int | None,
        interaction: Interaction,
    ) -> _Checked:
        """Find the version and decide its read; its ciphertext and keys are fetched meanwhile
        (nothing is decrypted before the decision, unless the metadata must come from the
        resource: :meth:`_decide`). Raises NotFoundError, AccessDeniedError, ForbiddenError,
        BackendError, IntegrityError, KeyDestroyedError."""
        anchor = self._anchor_of(resource_type, resource_id, version)
        if anchor is None:
            raise self._missing(resource_type, resource_id, version)
        fetching: asyncio.Future[FetchedRecord] | None = None
        if not anchor.deleted and not self.shredded(anchor):
            fetching = asyncio.ensure_future(self.pipeline.fetch_anchor(anchor))
        try:
            decision, resource = await self._decide(caller, interaction, anchor, fetching)
        except BaseException:
            if fetching is not None:
                _discard(fetching)
            raise
        return _Checked(f"{resource_type}/{resource_id}", anchor, decision, resource, fetching)

    async def _open(self, checked: _Checked) -> ReadRecord:
        """The decrypted version of a permitted read. Raises GoneError (deleted, or
        crypto-shredded), IntegrityError, KeyDestroyedError, BackendError."""
        anchor = checked.anchor
        fetching = checked.fetching
        try:
            if anchor.deleted:
                raise GoneError(f"{checked.what} version {anchor.version} is deleted")
            if self.shredded(anchor):
                raise GoneError(
                    f"{checked.what} version {anchor.version} was erased (crypto-shredded)"
                )
            resource = checked.resource
            if resource is None:
                fetched = await (fetching or self.pipeline.fetch_anchor(anchor))
                resource = self.pipeline.open_fetched(anchor, fetched)
            return ReadRecord(resource, anchor)
        finally:
            if fetching is not None and not fetching.done():
                _discard(fetching)

    async def record_meta(self, anchor: RecordAnchor) -> RecordMeta | None:
        """What consent looks at of an anchored version, from the meta source (the search
        index) without decrypting; a deletion is its type and custodian alone. None when the
        source does not know the version (or there is none). A version's metadata never
        changes, so what the source answered is kept (bounded, least recently used first;
        dropped for a patient by :meth:`forget`). Raises BackendError."""
        if anchor.deleted:
            return RecordMeta(anchor.resource_type, anchor.source)
        if self.meta_source is None:
            return None
        key = (anchor.source, anchor.record, anchor.version)
        kept = self._metas.get(key)
        if kept is not None:
            self._metas.move_to_end(key)
            return kept[1]
        meta = await self.meta_source(anchor.source, anchor.record, anchor.version)
        if meta is not None:
            self._metas[key] = (anchor.patient, meta)
            if len(self._metas) > META_CACHE:
                self._metas.popitem(last=False)
        return meta

    def forget(self, patients: Iterable[str]) -> None:
        """Drop what is held in memory of these pseudonyms' records (erasure's restriction).
        Raises nothing."""
        gone = set(patients)
        for key in [k for k, (patient, _meta) in self._metas.items() if patient in gone]:
            del self._metas[key]

    async def _decide(
        self,
        caller: object | None,
        interaction: Interaction,
        anchor: RecordAnchor,
        fetching: Awaitable[FetchedRecord] | None = None,
    ) -> tuple[AccessDecision, dict[str, Any] | None]:
        """Check a read of an anchored version with its metadata. When the meta source does
        not know it, the resource is decrypted first (from ``fetching`` when the read already
        fetches it) and its metadata extracted from it (returned with the decision, so it is
        not decrypted twice); nothing is returned to the caller before the check. Raises
        AccessDeniedError, ForbiddenError, BackendError, IntegrityError, KeyDestroyedError."""
        resource: dict[str, Any] | None = None
        meta: RecordMeta | None = None
        if isinstance(caller, Caller) and caller.kind == "system":
            # Only a system caller's reads are decided on the record's content (consent); a
            # patient's own reads, the local sender and internal calls need no metadata.
            meta = await self.record_meta(anchor)
            if meta is None and self.shredded(anchor):
                meta = RecordMeta(anchor.resource_type, anchor.source)  # nothing left to read
            elif meta is None:
                # Imported here: gateway.search imports this module.
                from gateway.search.extract import meta_of_resource

                if fetching is None:
                    resource = await self.pipeline.read_anchor(anchor)
                else:
                    resource = self.pipeline.open_fetched(anchor, await fetching)
                meta = meta_of_resource(resource, anchor.source)
        decision = await self.policy.check(
            caller,
            AccessRequest(
                interaction,
                anchor.resource_type,
                anchor.source,
                anchor.patient,
                record=anchor.record,
                version=anchor.version,
                meta=meta,
            ),
        )
        return decision, resource

    async def _log(
        self,
        caller: object | None,
        interaction: Interaction,
        patient: str,
        decision: AccessDecision | AccessDeniedError,
        records: tuple[str, ...],
        query: str | None = None,
    ) -> None:
        """Log one decision about an authenticated caller (nothing for internal calls).
        Raises BackendError, LedgerError."""
        if not logged(caller):
            return
        if isinstance(decision, AccessDeniedError):
            decision = decision.decision or AccessDecision(False, decision.reason)
        await self.access_log.record(
            [AccessEvent(caller, interaction, patient, decision, records, query)]
        )

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
        ref = f"{resource_type}/{resource_id}"
        try:
            decision = await self._check(
                caller, "delete", resource_type, anchor.patient, anchor.source
            )
        except AccessDeniedError as exc:
            await self._log(caller, "delete", anchor.patient, exc, (ref,))
            raise
        if anchor.deleted:
            await self._log(caller, "delete", anchor.patient, decision, (ref,))
            return None
        tombstone = {"resourceType": resource_type, "id": resource_id}
        (stored,) = await self.pipeline.store(
            [RecordInput(tombstone, anchor.patient, deleted=True)]
        )
        if self._indexers:
            await self._index([(stored, tombstone)])
        await self._log(
            caller, "delete", anchor.patient, decision, (f"{ref}/_history/{stored.version}",)
        )
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
        Versions the access seam refuses are left out (a denied version of a record stored
        here is named by its ledger record id in the access log: its resource id is sealed).
        Raises NotFoundError (an unknown resource), BackendError, IntegrityError,
        LedgerError."""
        if resource_id is not None:
            anchors = self.index.history(self.record_of(resource_type, resource_id))
            if not anchors:
                raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        else:
            anchors = self.index.versions_of_type(resource_type, self.institution)
        out: list[HistoryEntry] = []
        permitted: dict[str, tuple[AccessDecision, list[str]]] = {}
        denied: dict[str, tuple[AccessDecision, list[str]]] = {}
        for anchor in reversed(anchors):
            if before is not None and anchor.leaf_index >= before:
                continue
            if self.shredded(anchor):
                continue  # crypto-shredded: nothing left to show
            try:
                decision, resource = await self._decide(caller, "history", anchor)
            except AccessDeniedError as exc:
                what = resource_id or anchor.record
                ref = f"{resource_type}/{what}/_history/{anchor.version}"
                taken = exc.decision or AccessDecision(False, exc.reason)
                denied.setdefault(anchor.patient, (taken, []))[1].append(ref)
                continue
            if resource is None:
                resource = await self.pipeline.read_anchor(anchor)
            rid = str(resource["id"])
            ref = f"{resource_type}/{rid}/_history/{anchor.version}"
            permitted.setdefault(anchor.patient, (decision, []))[1].append(ref)
            out.append(HistoryEntry(anchor, rid, None if anchor.deleted else resource))
            if len(out) >= count:
                break
        if resource_id is not None and before is None and not out and denied:
            await self._log_groups(caller, denied)
            raise NotFoundError(f"{resource_type}/{resource_id} is not known")  # as if missing
        await self._log_groups(caller, denied, permitted)
        return out

    async def _log_groups(
        self, caller: object | None, *groups: dict[str, tuple[AccessDecision, list[str]]]
    ) -> None:
        """Log one history event per patient and decision. Raises BackendError, LedgerError."""
        if logged(caller):
            events = [
                AccessEvent(caller, "history", patient, decision, tuple(refs))
                for group in groups
                for patient, (decision, refs) in group.items()
            ]
            if events:
                await self.access_log.record(events)

    def records_of_patient(self, patient: str) -> list[RecordAnchor]:
        """The latest version of every record of a patient, under every pseudonym linked to
        it (no access check: callers check each record they return)."""
        return self.index.records_of(patient)

    # ---- receipts --------------------------------------------------------------------------

    async def check_receipt(self, caller: object | None, leaf_index: int) -> None:
        """Decide a receipt lookup of leaf ``leaf_index`` (``GET /ledger/receipt``): a
        ``record`` leaf's receipt is given only to a caller the access seam permits to read
        one of the records it anchors (each decided on its index metadata when this gateway
        indexed it, else on its type and custodian alone: nothing is decrypted for a
        receipt); other leaves carry no record. The decision is logged like a read. Raises
        NotFoundError (denied: the answer of a leaf not yet covered), ForbiddenError,
        BackendError, LedgerError."""
        if caller is None or not 0 <= leaf_index < self.ledger.size:
            return
        (raw,) = await self.ledger.leaves(leaf_index, leaf_index + 1)
        leaf = decode_leaf(raw)
        if leaf.get("kind") != "record":
            return
        anchors = anchors_of_leaf(RecordLeaf.from_leaf(leaf), leaf_index)
        permitted: list[tuple[RecordAnchor, AccessDecision]] = []
        refusal: AccessDeniedError | None = None
        for a in anchors:
            meta = await self.record_meta(a) or RecordMeta(a.resource_type, a.source)
            request = AccessRequest(
                "receipt", a.resource_type, a.source, a.patient, a.record, a.version, meta
            )
            try:
                permitted.append((a, await self.policy.check(caller, request)))
            except AccessDeniedError as exc:
                refusal = refusal or exc
        if not anchors:
            return
        patient = anchors[0].patient
        if not permitted:
            assert refusal is not None
            refs = tuple(f"{a.resource_type}/{a.record}/_history/{a.version}" for a in anchors)
            await self._log(caller, "receipt", patient, refusal, refs)
            raise NotFoundError(f"leaf {leaf_index} is not yet covered by a checkpoint")
        refs = tuple(f"{a.resource_type}/{a.record}/_history/{a.version}" for a, _ in permitted)
        await self._log(caller, "receipt", patient, permitted[0][1], refs)

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
    ) -> AccessDecision:
        return await self.policy.check(
            caller,
            AccessRequest(interaction, resource_type, custodian or self.institution, patient),
        )
