"""The record pipeline: pseudonymise -> encrypt -> store -> anchor, and the verified read back.

:meth:`RecordPipeline.store` returns only after every ciphertext is stored (and pinned), every
wrapped data key is durable in the key store and every leaf is durable in the ledger's log.
Blob writes and key writes of concurrent callers are grouped into one backend call each, and
the ledger groups their leaves into one log append (group commit at every stage).

Raises :class:`gateway.errors.BackendError` when a backend fails,
:class:`ledger.errors.LedgerError` when the ledger cannot take the leaves, and on reads
:class:`gateway.errors.IntegrityError` / :class:`gateway.errors.NotFoundError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from gateway.backends.protocols import Backends, WrappedKey
from gateway.crypto import (
    associated_data,
    open_sealed,
    record_id,
    seal,
    sha256_hex,
)
from gateway.errors import BlobNotFoundError, IntegrityError, NotFoundError
from gateway.identity import institution_pseudonym
from gateway.packing import Location, build_packs, cut
from gateway.views import CONTAINER_TYPE, RecordAnchor, RecordIndex
from ledger.checkpoint import SignedCheckpoint
from ledger.groupcommit import GroupCommitter
from ledger.leaves import MAX_CONTAINED, encode_leaf
from ledger.sequencer import Ledger


@dataclass(frozen=True, slots=True)
class RecordInput:
    """A FHIR resource (with ``resourceType`` and ``id``) and its patient's pseudonym."""

    resource: dict[str, Any]
    patient: str


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
    (:meth:`RecordPipeline.record_of`) and its JSON object without ``meta`` (set when stored)."""

    type: str
    id: str
    record: str
    body: bytes


#: A resource carried by a sealed record: (type, id, record id, version).
_Member = tuple[str, str, str, int]


@dataclass(frozen=True, slots=True)
class _Unit:
    """One sealed record version, ready to store and anchor."""

    record: str
    version: int
    patient: str
    type: str
    blob: bytes
    key: WrappedKey
    members: list[_Member]


@dataclass(frozen=True, slots=True)
class _Stamp:
    """The times one store call writes: ``meta.lastUpdated`` and the leaves' ``time``."""

    last_updated: str
    leaf_time: str

    @classmethod
    def now(cls) -> _Stamp:
        iso = datetime.now(UTC).isoformat(timespec="milliseconds")  # ...ss.mmm+00:00
        return cls(iso[:23] + "Z", iso[:19] + "Z")

    def meta_json(self, version: int) -> bytes:
        """``"meta":{...}`` with this stamp's ``lastUpdated`` and ``versionId`` ``version``."""
        return b'"meta":{"lastUpdated":"%s","versionId":"%d"}' % (
            self.last_updated.encode(),
            version,
        )

    def apply(self, resource: dict[str, Any], version: int) -> None:
        """Set ``meta.versionId`` and ``meta.lastUpdated`` (other meta kept)."""
        resource["meta"] = {
            **(resource.get("meta") or {}),
            "versionId": str(version),
            "lastUpdated": self.last_updated,
        }


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
        self._versions: dict[str, int] = {}
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
        """Drop a cached KEK (after crypto-shredding)."""
        self._keks.pop(patient, None)

    def _next_version(self, rec: str) -> int:
        current = self._versions.get(rec)
        if current is None:
            anchor = self.index.latest(rec)
            current = anchor.version if anchor is not None else 0
        self._versions[rec] = current + 1
        return current + 1

    async def store(self, inputs: Sequence[RecordInput]) -> list[StoredRecord]:
        """Encrypt, store and anchor resources, one record each; return once all of it is
        durable.

        The resources are updated in place with ``meta.versionId`` and ``meta.lastUpdated``.
        Raises BackendError, LedgerError.
        """
        stamp = _Stamp.now()
        units = []
        for item in inputs:
            res = item.resource
            rtype, rid = str(res["resourceType"]), str(res["id"])
            rec = self.record_of(rtype, rid)
            version = self._next_version(rec)
            stamp.apply(res, version)
            members = [(rtype, rid, rec, version)]
            units.append(
                await self._seal(canonical_json(res), rec, version, item.patient, rtype, members)
            )
        return await self._anchor(units, stamp, contained=False)

    async def store_group(
        self, resources: Sequence[PreparedResource], *, patient: str, container_id: str
    ) -> list[StoredRecord]:
        """Store the resources of one source message as one ciphertext and one leaf.

        The resources (all of one patient, distinct type/id pairs, each serialised without
        ``meta``) become, with ``meta.versionId`` and ``meta.lastUpdated`` set, the entries of
        a collection Bundle ``container_id``, sealed as one record under a fresh data key and
        anchored by one ``record`` leaf whose ``contains`` lists each resource's record id,
        type and version; every resource is then readable (and versioned) as if stored alone.
        One block, one wrapped key and one leaf instead of one per resource: what makes an HL7
        message of a dozen resources cheap to store. More than MAX_CONTAINED resources go in
        several containers (``container_id``, ``container_id-2``, ...).
        Returns once all of it is durable. Raises BackendError, LedgerError, ValueError (a
        type/id pair twice, a resource that is not a JSON object).
        """
        if len({(r.type, r.id) for r in resources}) != len(resources):
            raise ValueError("a resource appears twice in one group")
        stamp = _Stamp.now()
        units = []
        for n in range(0, len(resources), MAX_CONTAINED):
            bundle_id = container_id if n == 0 else f"{container_id}-{n // MAX_CONTAINED + 1}"
            container = self.record_of(CONTAINER_TYPE, bundle_id)
            container_version = self._next_version(container)
            members: list[_Member] = []
            entries = []
            for r in resources[n : n + MAX_CONTAINED]:
                version = self._next_version(r.record)
                members.append((r.type, r.id, r.record, version))
                entries.append((f"{r.type}/{r.id}", with_meta(r.body, stamp.meta_json(version))))
            plain = container_json(bundle_id, stamp.meta_json(container_version), entries)
            units.append(
                await self._seal(
                    plain, container, container_version, patient, CONTAINER_TYPE, members
                )
            )
        return await self._anchor(units, stamp, contained=True)

    async def _seal(
        self,
        plain: bytes,
        rec: str,
        version: int,
        patient: str,
        rtype: str,
        members: list[_Member],
    ) -> _Unit:
        """Encrypt one record version under a fresh data key wrapped by the patient's KEK."""
        kek_id, kek = await self._kek(patient)
        sealed = seal(
            plain,
            kek=kek,
            aad=associated_data(rec, version, patient, rtype, kek_id),
        )
        key = WrappedKey(f"{rec}.{version}", kek_id, sealed.wrapped_key)
        return _Unit(rec, version, patient, rtype, sealed.blob, key, members)

    async def _anchor(
        self, units: list[_Unit], stamp: _Stamp, *, contained: bool
    ) -> list[StoredRecord]:
        """Store the ciphertexts and wrapped keys (grouped with other callers'), then anchor one
        ``record`` leaf per unit (with ``contains`` when ``contained``); one StoredRecord per
        resource carried."""
        locations, _ = await asyncio.gather(
            self._blob_commit.enqueue([u.blob for u in units]),
            self._key_commit.enqueue([u.key for u in units]),
        )
        leaves = []
        for unit, at in zip(units, locations, strict=True):
            fields: dict[str, Any] = {
                "record": unit.record,
                "version": unit.version,
                "cid": at.cid,
                "sha256": sha256_hex(unit.blob),
                "patient": unit.patient,
                "type": unit.type,
                "source": self.institution,
                "dictionary": self.dictionary_version,
                "time": stamp.leaf_time,
            }
            if at.byte_range is not None:
                fields["range"] = list(at.byte_range)
            if contained:
                fields["contains"] = [
                    {"record": rec, "type": rtype, "version": v}
                    for rtype, _rid, rec, v in unit.members
                ]
            leaves.append(encode_leaf("record", fields))
        results = await self.ledger.append(leaves)
        return [
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
            for unit, at, result in zip(units, locations, results, strict=True)
            for rtype, rid, rec, v in unit.members
        ]

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
        try:
            block = await self._b.blobs.get(anchor.cid)
        except BlobNotFoundError as exc:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext {anchor.cid} "
                f"anchored at leaf {anchor.leaf_index} is missing from the blob store",
                record=anchor.record,
                cid=anchor.cid,
            ) from exc
        blob = cut(block, anchor.byte_range)
        if blob is None or sha256_hex(blob) != anchor.sha256:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext "
                f"{anchor.where} does not match its anchor at leaf {anchor.leaf_index}",
                record=anchor.record,
                cid=anchor.cid,
            )
        sealed_rec, sealed_version, sealed_type = anchor.sealed_as
        wk = await self._b.keys.get_wrapped_key(f"{sealed_rec}.{sealed_version}")
        kek = await self._b.keys.kek_by_id(wk.kek_id)
        aad = associated_data(sealed_rec, sealed_version, anchor.patient, sealed_type, wk.kek_id)
        plain = open_sealed(blob, wk.wrapped, kek=kek, aad=aad, record=sealed_rec)
        resource: dict[str, Any] = orjson.loads(plain)
        if anchor.container is None:
            return resource
        return self._entry_of(resource, anchor)

    def _entry_of(self, bundle: dict[str, Any], anchor: RecordAnchor) -> dict[str, Any]:
        """Entry ``anchor.entry`` of a decrypted container, checked to be the anchored record
        version. Raises IntegrityError."""
        entries = bundle.get("entry") or []
        resource = entries[anchor.entry].get("resource") if anchor.entry < len(entries) else None
        ok = (
            isinstance(resource, dict)
            and resource.get("resourceType") == anchor.resource_type
            and self.record_of(anchor.resource_type, str(resource.get("id"))) == anchor.record
            and (resource.get("meta") or {}).get("versionId") == str(anchor.version)
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
