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
from typing import Any

import orjson

from gateway.backends.protocols import Backends, WrappedKey
from gateway.crypto import (
    associated_data,
    open_sealed,
    pseudonym,
    record_id,
    seal,
    sha256_hex,
)
from gateway.errors import BlobNotFoundError, IntegrityError, NotFoundError
from gateway.views import RecordAnchor, RecordIndex
from ledger.checkpoint import SignedCheckpoint
from ledger.groupcommit import GroupCommitter
from ledger.leaves import encode_leaf
from ledger.sequencer import Ledger


@dataclass(frozen=True, slots=True)
class RecordInput:
    """A FHIR resource (with ``resourceType`` and ``id``) and its patient's pseudonym."""

    resource: dict[str, Any]
    patient: str


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """What a stored record's sender gets back: where it is and its receipt."""

    resource_type: str
    resource_id: str
    version: int
    record: str
    cid: str
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


def canonical_json(resource: dict[str, Any]) -> bytes:
    """Deterministic JSON of a resource (sorted keys, no insignificant whitespace)."""
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


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
        self.no_patient = pseudonym(pseudonym_key, "urn:alliance:institution", institution)
        self._versions: dict[str, int] = {}
        self._keks: dict[str, tuple[str, bytes]] = {}
        self._kek_locks: dict[str, asyncio.Lock] = {}
        self._blob_commit: GroupCommitter[bytes, str] = GroupCommitter(
            self._b.blobs.put_many,
            name="blobs",
            max_items=batch_max_items,
            max_delay=batch_max_delay,
            on_batch=on_blob_batch,
        )
        self._key_commit: GroupCommitter[WrappedKey, None] = GroupCommitter(
            self._put_keys,
            name="keys",
            max_items=batch_max_items,
            max_delay=batch_max_delay,
        )

    def start(self) -> None:
        """Start the group-commit tasks (inside the running loop)."""
        self._blob_commit.start()
        self._key_commit.start()

    async def stop(self) -> None:
        """Stop the group-commit tasks."""
        await self._blob_commit.stop()
        await self._key_commit.stop()

    async def _put_keys(self, keys: list[WrappedKey]) -> list[None]:
        await self._b.keys.put_wrapped_keys(keys)
        return [None] * len(keys)

    def record_of(self, resource_type: str, resource_id: str) -> str:
        """The opaque ledger id of a FHIR resource."""
        return record_id(self._pkey, resource_type, resource_id)

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
        """Encrypt, store and anchor resources; return once all of it is durable.

        The resources are updated in place with ``meta.versionId`` and ``meta.lastUpdated``.
        Raises BackendError, LedgerError.
        """
        now = datetime.now(UTC)
        last_updated = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        leaf_time = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        blobs: list[bytes] = []
        wrapped: list[WrappedKey] = []
        prepared: list[tuple[RecordInput, str, int, str]] = []
        for item in inputs:
            res = item.resource
            rtype, rid = str(res["resourceType"]), str(res["id"])
            rec = self.record_of(rtype, rid)
            version = self._next_version(rec)
            meta = dict(res.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = last_updated
            res["meta"] = meta
            kek_id, kek = await self._kek(item.patient)
            aad = associated_data(rec, version, item.patient, rtype, kek_id)
            sealed = seal(canonical_json(res), kek=kek, aad=aad)
            blobs.append(sealed.blob)
            wrapped.append(WrappedKey(f"{rec}.{version}", kek_id, sealed.wrapped_key))
            prepared.append((item, rec, version, kek_id))
        cids, _ = await asyncio.gather(
            self._blob_commit.submit(blobs), self._key_commit.submit(wrapped)
        )
        leaves = [
            encode_leaf(
                "record",
                {
                    "record": rec,
                    "version": version,
                    "cid": cid,
                    "sha256": sha256_hex(blob),
                    "patient": item.patient,
                    "type": str(item.resource["resourceType"]),
                    "source": self.institution,
                    "dictionary": self.dictionary_version,
                    "time": leaf_time,
                },
            )
            for (item, rec, version, _kid), cid, blob in zip(prepared, cids, blobs, strict=True)
        ]
        results = await self.ledger.append(leaves)
        return [
            StoredRecord(
                resource_type=str(item.resource["resourceType"]),
                resource_id=str(item.resource["id"]),
                version=version,
                record=rec,
                cid=cid,
                last_updated=last_updated,
                leaf_index=r.index,
                tree_size=r.tree_size,
                root=r.root,
                checkpoint=r.checkpoint,
                created=version == 1,
            )
            for (item, rec, version, _kid), cid, r in zip(prepared, cids, results, strict=True)
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
            blob = await self._b.blobs.get(anchor.cid)
        except BlobNotFoundError as exc:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext {anchor.cid} "
                f"anchored at leaf {anchor.leaf_index} is missing from the blob store",
                record=anchor.record,
                cid=anchor.cid,
            ) from exc
        if sha256_hex(blob) != anchor.sha256:
            raise IntegrityError(
                f"record {anchor.record} version {anchor.version}: ciphertext {anchor.cid} does "
                f"not match its anchor at leaf {anchor.leaf_index}",
                record=anchor.record,
                cid=anchor.cid,
            )
        wk = await self._b.keys.get_wrapped_key(f"{anchor.record}.{anchor.version}")
        kek = await self._b.keys.kek_by_id(wk.kek_id)
        aad = associated_data(
            anchor.record, anchor.version, anchor.patient, anchor.resource_type, wk.kek_id
        )
        plain = open_sealed(blob, wk.wrapped, kek=kek, aad=aad, record=anchor.record)
        resource: dict[str, Any] = orjson.loads(plain)
        return resource


def monotonic_ms() -> float:
    """Milliseconds from a monotonic clock (for latency metrics)."""
    return time.monotonic() * 1000.0
