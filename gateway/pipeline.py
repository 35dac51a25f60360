"""The record pipeline: pseudonymise -> encrypt -> store -> anchor, and the verified read back.

:meth:`RecordPipeline.store` returns only after every ciphertext is stored (and pinned), every
wrapped data key is durable in the key store and every leaf is durable in the ledger's log.
Blob writes and key writes of concurrent callers are grouped into one backend call each, and
the ledger groups their leaves into one log append (group commit at every stage).

Versions are not reserved ahead of the ledger: a record's leaf is a draft
(:class:`ledger.sequencer.LeafDraft`) completed with the next version after what the log
committed, when the ledger forms its batch; so a failed store leaves nothing behind (the retry
is version 1 again) and two processes of one institution never both write version 2. The
ciphertext does not carry the version: ``meta.versionId`` is set from the anchor on read.

Raises :class:`gateway.errors.BackendError` when a backend fails,
:class:`ledger.errors.LedgerError` when the ledger cannot take the leaves, and on reads
:class:`gateway.errors.IntegrityError` / :class:`gateway.errors.NotFoundError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from gateway.backends.protocols import Backends, WrappedKey
from gateway.crypto import associated_data, open_sealed, record_id, seal, sha256_hex
from gateway.errors import (
    BlobNotFoundError,
    IntegrityError,
    KeyDestroyedError,
    KeyNotFoundError,
    NotFoundError,
)
from gateway.identity import institution_pseudonym
from gateway.packing import Location, build_packs, cut
from gateway.views import CONTAINER_TYPE, RecordAnchor, RecordIndex
from ledger.checkpoint import SignedCheckpoint
from ledger.groupcommit import GroupCommitter
from ledger.leaves import MAX_CONTAINED, RecordLeaf, RecordMember
from ledger.sequencer import LeafDraft, Ledger


@dataclass(frozen=True, slots=True)
class RecordInput:
    """A FHIR resource (with ``resourceType`` and ``id``) and its patient's pseudonym. With
    ``deleted`` the version stored is a tombstone: only the resource's type, id and
    ``meta.lastUpdated`` are sealed, and the leaf says ``deleted``."""

    resource: dict[str, Any]
    patient: str
    deleted: bool = False


class StoredRecord(NamedTuple):
    """What a stored record's sender gets back: where it is and its receipt."""

    resource_type: str
    resource_id: str
    version: int
    record: str
    cid: str
    byte_range: tuple[int, int] | None
    last_updated: str
    leaf_index: int
    tree_size: int
    root: bytes
    checkpoint: SignedCheckpoint
    created: bool


class FetchedRecord(NamedTuple):
    """One anchored version as fetched, not yet decrypted: its ciphertext (checked against
    the anchor), its wrapped data key and the key-encryption key that unwraps it."""

    blob: bytes
    wrapped_key: WrappedKey
    kek: bytes


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """A decrypted record with its anchor."""

    resource: dict[str, Any]
    anchor: RecordAnchor


#: Blob (and key) batches written at once: a store takes the next batch while the last one's
#: fsyncs run, which keeps the ledger, the slowest ordered stage, fed.
BLOB_CALLS_IN_FLIGHT = 2


class PreparedResource(NamedTuple):
    """A resource ready to be stored in a container: its type, id, ledger record id
    (:meth:`RecordPipeline.record_of`) and its JSON object without ``meta`` (set when stored);
    ``meta``: members the stored ``meta`` gets beside ``lastUpdated`` (JSON object members
    without the braces, e.g. ``"security":[...],"tag":[...]``: its security labels and tags),
    empty for none."""

    type: str
    id: str
    record: str
    body: bytes
    meta: bytes = b""


@dataclass(frozen=True, slots=True)
class _Unit:
    """One sealed record, ready to store and anchor: the ciphertext, its wrapped data key, and
    the resources it carries ((type, id, record id); one unless it is a container)."""

    record: str
    patient: str
    type: str
    blob: bytes
    key: WrappedKey
    members: list[tuple[str, str, str]]
    contained: bool
    deleted: bool = False


class _RecordDraft(LeafDraft):
    """The ``record`` leaf of one stored unit, completed when the ledger forms its batch: each
    record it names gets the next version after the latest the ledger committed (and after
    those given earlier in the same batch). Every completion is kept by its bytes, so the
    store knows the versions of the one that landed.

    The leaf is encoded ahead, with the versions the index gives now; completing it under the
    ledger's lock then only checks that those are still the next versions (a few dictionary
    lookups) and encodes again only when they are not (another writer, or the same record
    earlier in the batch). Encoding and checking a leaf's fields is what costs, and the lock
    is on the path of every acknowledgement."""

    __slots__ = ("_ahead", "_index", "_template", "_unit", "built")

    def __init__(self, unit: _Unit, template: RecordLeaf, index: RecordIndex) -> None:
        self._unit = unit
        self._template = template
        self._index = index
        self.built: dict[bytes, RecordLeaf] = {}
        guess = self._leaf({})
        self._ahead = (guess, guess.encode())

    def _next(self, scratch: dict[str, int], rec: str) -> int:
        current = scratch.get(rec)
        if current is None:
            anchor = self._index.latest(rec)
            current = anchor.version if anchor is not None else 0
        scratch[rec] = current + 1
        return current + 1

    def _leaf(self, scratch: dict[str, int]) -> RecordLeaf:
        unit = self._unit
        version = self._next(scratch, unit.record)
        contains = None
        if unit.contained:
            contains = tuple(
                RecordMember(rec, rtype, self._next(scratch, rec))
                for rtype, _rid, rec in unit.members
            )
        return replace(self._template, version=version, contains=contains)

    def complete(self, scratch: dict[str, Any]) -> bytes:
        """The leaf with versions taken now. Raises LeafFormatError."""
        guess, raw = self._ahead
        unit = self._unit
        same = self._next(scratch, unit.record) == guess.version
        if guess.contains is not None:
            for (_rtype, _rid, rec), member in zip(unit.members, guess.contains, strict=True):
                same = self._next(scratch, rec) == member.version and same
        if not same:
            for rec in (unit.record, *(m[2] for m in unit.members if unit.contained)):
                scratch[rec] -= 1  # taken again below, by the leaf built for them
            guess = self._leaf(scratch)
            raw = guess.encode()
        self.built[raw] = guess
        return raw


def _members_of(leaf: RecordLeaf, unit: _Unit) -> list[tuple[str, str, str, int]]:
    """(type, id, record id, version) of each resource a landed leaf carries."""
    if leaf.contains is None:
        ((rtype, rid, rec),) = unit.members
        return [(rtype, rid, rec, leaf.version)]
    return [
        (rtype, rid, rec, member.version)
        for (rtype, rid, rec), member in zip(unit.members, leaf.contains, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class _Stamp:
    """The times one store call writes: ``meta.lastUpdated`` and the leaves' ``time``."""

    last_updated: str
    leaf_time: str

    @classmethod
    def now(cls) -> _Stamp:
        iso = datetime.now(UTC).isoformat(timespec="milliseconds")  # ...ss.mmm+00:00
        return cls(iso[:23] + "Z", iso[:19] + "Z")

    def meta_json(self) -> bytes:
        """``"meta":{...}`` with this stamp's ``lastUpdated`` (the version is set on read)."""
        return b'"meta":{"lastUpdated":"%s"}' % self.last_updated.encode()

    def apply(self, resource: dict[str, Any]) -> None:
        """Set ``meta.lastUpdated`` (other meta kept, a sent ``versionId`` dropped: the ledger
        gives the version)."""
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k != "versionId"}
        resource["meta"] = {**meta, "lastUpdated": self.last_updated}


def canonical_json(resource: dict[str, Any]) -> bytes:
    """Deterministic JSON of a resource (sorted keys, no insignificant whitespace)."""
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


def with_meta(body: bytes, meta: bytes) -> bytes:
    """The JSON object ``body`` (serialised without ``meta``) with ``meta`` (``"meta":{...}``)
    as its first member: a container's resources arrive serialised from the conversion workers
    and are not parsed again. Raises ValueError when ``body`` is not an object with members."""
    if not (body.startswith(b'{"') and body.endswith(b"}")):
        raise ValueError("a prepared resource is not a JSON object with members")
    return b"{%s,%s" % (meta, body[1:])


def container_json(bundle_id: str, meta: bytes, entries: Sequence[tuple[str, bytes]]) -> bytes:
    """The JSON of a collection Bundle ``bundle_id`` with ``meta`` (``"meta":{...}``) whose
    entries are the (``fullUrl``, resource JSON) pairs given, assembled from their bytes."""
    parts = [
        b'{"fullUrl":%s,"resource":%s}' % (orjson.dumps(full_url), resource)
        for full_url, resource in entries
    ]
    return b'{"resourceType":"Bundle","id":%s,%s,"type":"collection","entry":[%s]}' % (
        orjson.dumps(bundle_id),
        meta,
        b",".join(parts),
    )


class RecordPipeline:
    """Stores and reads records over the four backends and the ledger."""

    def __init__(
        self,
        *,
        backends: Backends,
        ledger: Ledger,
        index: RecordIndex,
        pseudonym_key: bytes,
        institution: str,
        dictionary_version: str,
        batch_max_items: int = 256,
        batch_max_delay: float = 0.002,
        on_blob_batch: Any = None,
    ) -> None:
        self._b = backends
        self.ledger = ledger
        self.index = index
        self._pkey = pseudonym_key
        self.institution = institution
        self.dictionary_version = dictionary_version
        # Records that belong to no patient (an Organization, a Practitioner) are filed under
        # the institution's own pseudonym.
        self.no_patient = institution_pseudonym(pseudonym_key, institution)
        self._keks: dict[str, tuple[str, bytes]] = {}
        self._kek_locks: dict[str, asyncio.Lock] = {}
        self._blob_commit: GroupCommitter[bytes, Location] = GroupCommitter(
            self._put_packed,
            name="blobs",
            max_items=batch_max_items,
            max_delay=batch_max_delay,
            on_batch=on_blob_batch,
            concurrency=BLOB_CALLS_IN_FLIGHT,
        )
        self._key_commit: GroupCommitter[WrappedKey, None] = GroupCommitter(
            self._put_keys,
            name="keys",
            max_items=batch_max_items,
            max_delay=batch_max_delay,
            concurrency=BLOB_CALLS_IN_FLIGHT,
        )

    def start(self) -> None:
        """Start the group-commit tasks (inside the running loop)."""
        self._blob_commit.start()
        self._key_commit.start()

    async def stop(self) -> None:
        """Stop the group-commit tasks."""
        await self._blob_commit.stop()
        await self._key_commit.stop()

    async def _put_packed(self, blobs: list[bytes]) -> list[Location]:
        """Store a batch's ciphertexts as packs (see :mod:`gateway.packing`)."""
        packs, where = build_packs(blobs)
        cids = await self._b.blobs.put_many(packs)
        return [Location(cids[n], byte_range) for n, byte_range in where]

    async def _put_keys(self, keys: list[WrappedKey]) -> list[None]:
        await self._b.keys.put_wrapped_keys(keys)
        return [None] * len(keys)

    def record_of(self, resource_type: str, resource_id: str) -> str:
        """The opaque ledger id of a FHIR resource."""
        return record_id(self._pkey, self.institution, resource_type, resource_id)

    def patient_of(self, resource_type: str, resource_id: str) -> str | None:
        """The pseudonym of a stored resource's patient, or None if it is not stored here."""
        anchor = self.index.latest(self.record_of(resource_type, resource_id))
        return anchor.patient if anchor is not None else None

    async def _kek(self, patient: str) -> tuple[str, bytes]:
        owner = patient
        cached = self._keks.get(owner)
        if cached is not None:
            return cached
        lock = self._kek_locks.setdefault(owner, asyncio.Lock())
        async with lock:
            cached = self._keks.get(owner)
            if cached is None:
                cached = await self._b.keys.kek_for(owner)
                self._keks[owner] = cached
            return cached

    def forget_kek(self, patient: str) -> None:
        """Drop a cached KEK (a restriction, a crypto-shredding): the next record of the
        patient asks the key store again (a new KEK after one was destroyed)."""
        self._keks.pop(patient, None)

    async def store(self, inputs: Sequence[RecordInput]) -> list[StoredRecord]:
        """Encrypt, store and anchor resources, one record each; return once all of it is
        durable.

        The resources are updated in place with ``meta.versionId`` (the version the ledger
        gave) and ``meta.lastUpdated``. Raises BackendError, LedgerError.
        """
        stamp = _Stamp.now()
        units = []
        for item in inputs:
            res = item.resource
            rtype, rid = str(res["resourceType"]), str(res["id"])
            rec = self.record_of(rtype, rid)
            stamp.apply(res)
            body = res
            if item.deleted:
                body = {"resourceType": rtype, "id": rid, "meta": res["meta"]}
            unit = await self._seal(
                canonical_json(body), rec, item.patient, rtype, [(rtype, rid, rec)], False
            )
            units.append(replace(unit, deleted=True) if item.deleted else unit)
        stored = await self._anchor(units, stamp)
        for item, record in zip(inputs, stored, strict=True):
            item.resource["meta"]["versionId"] = str(record.version)
        return stored

    async def store_group(
        self, resources: Sequence[PreparedResource], *, patient: str, container_id: str
    ) -> list[StoredRecord]:
        """Store the resources of one source message as one ciphertext and one leaf.

        The resources (all of one patient, distinct type/id pairs, each serialised without
        ``meta``) become, with ``meta.lastUpdated`` set, the entries of a collection Bundle
        ``container_id``, sealed as one record under a fresh data key and anchored by one
        ``record`` leaf whose ``contains`` lists each resource's record id, type and version
        (taken when the leaf is appended); every resource is then readable (and versioned) as
        if stored alone. One block, one wrapped key and one leaf instead of one per resource:
        what makes an HL7 message of a dozen resources cheap to store. More than
        MAX_CONTAINED resources go in several containers (``container_id``,
        ``container_id-2``, ...). Returns once all of it is durable. Raises BackendError,
        LedgerError, ValueError (a type/id pair twice, a resource that is not a JSON object).
        """
        if len({(r.type, r.id) for r in resources}) != len(resources):
            raise ValueError("a resource appears twice in one group")
        stamp = _Stamp.now()
        meta = stamp.meta_json()
        units = []
        for n in range(0, len(resources), MAX_CONTAINED):
            bundle_id = container_id if n == 0 else f"{container_id}-{n // MAX_CONTAINED + 1}"
            container = self.record_of(CONTAINER_TYPE, bundle_id)
            part = resources[n : n + MAX_CONTAINED]
            entries = [
                (
                    f"{r.type}/{r.id}",
                    with_meta(r.body, meta if not r.meta else b"%s,%s}" % (meta[:-1], r.meta)),
                )
                for r in part
            ]
            plain = container_json(bundle_id, meta, entries)
            members = [(r.type, r.id, r.record) for r in part]
            units.append(await self._seal(plain, container, patient, CONTAINER_TYPE, members, True))
        return await self._anchor(units, stamp)

    async def _seal(
        self,
        plain: bytes,
        rec: str,
        patient: str,
        rtype: str,
        members: list[tuple[str, str, str]],
        contained: bool,
    ) -> _Unit:
        """Encrypt one record under a fresh data key wrapped by the patient's KEK; the wrapped
        key is filed under the ciphertext's SHA-256."""
        kek_id, kek = await self._kek(patient)
        sealed = seal(plain, kek=kek, aad=associated_data(rec, patient, rtype, kek_id))
        key = WrappedKey(sha256_hex(sealed.blob), kek_id, sealed.wrapped_key)
        return _Unit(rec, patient, rtype, sealed.blob, key, members, contained)

    async def _anchor(self, units: list[_Unit], stamp: _Stamp) -> list[StoredRecord]:
        """Store the ciphertexts and wrapped keys (grouped with other callers'), then anchor one
        ``record`` leaf per unit, its versions taken when the ledger forms the batch; one
        StoredRecord per resource carried."""
        locations, _ = await asyncio.gather(
            self._blob_commit.enqueue([u.blob for u in units]),
            self._key_commit.enqueue([u.key for u in units]),
        )
        drafts = [
            _RecordDraft(
                unit,
                RecordLeaf(
                    record=unit.record,
                    version=1,
                    cid=at.cid,
                    sha256=unit.key.record_id,
                    patient=unit.patient,
                    type=unit.type,
                    source=self.institution,
                    dictionary=self.dictionary_version,
                    time=stamp.leaf_time,
                    byte_range=at.byte_range,
                    deleted=unit.deleted,
                ),
                self.index,
            )
            for unit, at in zip(units, locations, strict=True)
        ]
        results = await self.ledger.append(drafts)
        out = []
        for draft, unit, at, result in zip(drafts, units, locations, results, strict=True):
            leaf = draft.built[result.leaf]
            for rtype, rid, rec, v in _members_of(leaf, unit):
                out.append(
                    StoredRecord(
                        resource_type=rtype,
                        resource_id=rid,
                        version=v,
                        record=rec,
                        cid=at.cid,
                        byte_range=at.byte_range,
                        last_updated=stamp.last_updated,
                        leaf_index=result.index,
                        tree_size=result.tree_size,
                        root=result.root,
                        checkpoint=result.checkpoint,
                        created=v == 1,
                    )
                )
        return out

    async def read(self, resource_type: str, resource_id: str) -> ReadRecord:
        """The latest version of a resource, decrypted after checking its anchor.

        Raises NotFoundError, IntegrityError (naming the record and CID), KeyDestroyedError,
        BackendError.
        """
        rec = self.record_of(resource_type, resource_id)
        anchor = self.index.latest(rec)
        if anchor is None:
            raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        return ReadRecord(await self.read_anchor(anchor), anchor)

    async def read_anchor(self, anchor: RecordAnchor) -> dict[str, Any]:
        """Fetch, check and decrypt one anchored record version. Raises as :meth:`read`."""
        return self.open_fetched(anchor, await self.fetch_anchor(anchor))

    async def fetch_anchor(self, anchor: RecordAnchor) -> FetchedRecord:
        """Fetch one anchored version's ciphertext (checked against its anchor), its wrapped
        data key and the key-encryption key, without decrypting anything: a read may start
        it before the access decision. The ciphertext and the key are fetched at once.

        Raises IntegrityError (the ciphertext is missing or is not the anchored one: checked
        first), KeyDestroyedError (its data key was destroyed), BackendError."""
        got_block, got_key = await asyncio.gather(
            self._b.blobs.get(anchor.cid), self._key_of(anchor), return_exceptions=True
        )
        if isinstance(got_block, BlobNotFoundError):
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext {anchor.cid} "
                f"anchored at leaf {anchor.leaf_index} is missing from the blob store",
                record=anchor.record,
                cid=anchor.cid,
            ) from got_block
        if isinstance(got_block, BaseException):
            raise got_block
        blob = cut(got_block, anchor.byte_range)
        if blob is None or sha256_hex(blob) != anchor.sha256:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext "
                f"{anchor.where} does not match its anchor at leaf {anchor.leaf_index}",
                record=anchor.record,
                cid=anchor.cid,
            )
        if isinstance(got_key, BaseException):
            raise got_key
        wk, kek = got_key
        return FetchedRecord(blob, wk, kek)

    async def _key_of(self, anchor: RecordAnchor) -> tuple[WrappedKey, bytes]:
        """An anchored version's wrapped data key and its key-encryption key. Raises
        KeyDestroyedError, BackendError."""
        try:
            wk = await self._b.keys.get_wrapped_key(anchor.sha256)
        except KeyNotFoundError as exc:
            # Written before its leaf, a record's wrapped key is missing only once destroyed.
            raise KeyDestroyedError(f"data key of {anchor.record}") from exc
        return wk, await self._b.keys.kek_by_id(wk.kek_id)

    def open_fetched(self, anchor: RecordAnchor, fetched: FetchedRecord) -> dict[str, Any]:
        """Decrypt a fetched version (:meth:`fetch_anchor`) and check it is the anchored
        record; ``meta.versionId`` is set. Raises IntegrityError."""
        sealed_rec, sealed_type = anchor.sealed_as
        wk = fetched.wrapped_key
        aad = associated_data(sealed_rec, anchor.patient, sealed_type, wk.kek_id)
        plain = open_sealed(fetched.blob, wk.wrapped, kek=fetched.kek, aad=aad, record=sealed_rec)
        resource: dict[str, Any] = orjson.loads(plain)
        if anchor.container is not None:
            resource = self._entry_of(resource, anchor)
        meta = resource.get("meta")
        if not isinstance(meta, dict):
            meta = resource["meta"] = {}
        meta["versionId"] = str(anchor.version)
        return resource

    def _entry_of(self, bundle: dict[str, Any], anchor: RecordAnchor) -> dict[str, Any]:
        """Entry ``anchor.entry`` of a decrypted container, checked to be the anchored record.
        Raises IntegrityError."""
        entries = bundle.get("entry") or []
        resource = entries[anchor.entry].get("resource") if anchor.entry < len(entries) else None
        ok = (
            isinstance(resource, dict)
            and resource.get("resourceType") == anchor.resource_type
            and self.record_of(anchor.resource_type, str(resource.get("id"))) == anchor.record
        )
        if not ok:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: entry {anchor.entry} of "
                f"container {anchor.container} (ciphertext {anchor.cid}, leaf "
                f"{anchor.leaf_index}) is not the anchored record",
                record=anchor.record,
                cid=anchor.cid,
            )
        assert isinstance(resource, dict)
        return resource


def monotonic_ms() -> float:
    """Milliseconds from a monotonic clock (for latency metrics)."""
    return time.monotonic() * 1000.0
