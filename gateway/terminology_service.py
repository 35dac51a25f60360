"""The unified dictionary inside a running gateway: apply it to input, apply the sender's
unmapped-code policy, keep the curation queue, anchor each dictionary version on the ledger.

:class:`TerminologyService` is built by :class:`gateway.runtime.Gateway` (``gw.terminology``).
The FHIR REST and DICOM paths call :meth:`TerminologyService.apply` on every resource before
storing it: the unified codings are added beside the originals (:mod:`mappings.dictionary_apply`),
and for a code the dictionary cannot map the sender profile's ``unmapped_codes`` decides:
``reject`` raises :class:`InvalidInputError` (HTTP 422) naming the code and the element;
``accept`` stores the record with the original coding only, tagged
:data:`mappings.dictionary_apply.UNMAPPED_TAG`, and queues the code for curation.

The curation queue lives in the StateStore (Redis in production, shared by every worker of the
gateway and surviving restarts; memory on the embedded profile): per (source institution,
system, code) a first-seen record, a counter and a last-seen time, plus a numbered slot list so
the queue can be listed without scanning keys. Codes are public facts, never patient data; the
element path is not stored.

Each dictionary version is anchored by a ``dictionary`` leaf (version, SHA-256 of the bundle,
``files``) at start, before any record names it (:meth:`ensure_anchored`).

Raises InvalidInputError (reject policy), BackendError (state store), LedgerError (anchoring).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.backends.protocols import StateStore
from gateway.config import SenderProfile
from gateway.errors import InvalidInputError
from ledger.leaves import decode_leaf, encode_leaf
from ledger.sequencer import Ledger
from mappings.dictionary_apply import UNMAPPED_TAG, Applied, Unmapped, apply_dictionary, labels
from mappings.terminology import Terminology, bundle_sha256

__all__ = ["CurationEntry", "CurationQueue", "DictionaryAnchors", "TerminologyService"]

Json = dict[str, Any]
_PREFIX = "dict:unmapped:"
#: Most entries the queue lists (the most frequent first).
MAX_LISTED = 5000


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class CurationEntry:
    """One unmapped code in the curation queue."""

    code: str
    system: str
    source: str
    first_seen: str
    last_seen: str
    count: int

    def to_json(self) -> Json:
        """The entry as ``GET /dictionary/unmapped`` lists it."""
        return {
            "code": self.code,
            "system": self.system,
            "source": self.source,
            "firstSeen": self.first_seen,
            "lastSeen": self.last_seen,
            "count": self.count,
        }


class CurationQueue:
    """Unmapped codes by (source institution, system, code), counted, in the StateStore."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    @staticmethod
    def _key(source: str, system: str, code: str) -> str:
        import hashlib

        digest = hashlib.sha256(f"{source}\0{system}\0{code}".encode()).hexdigest()[:32]
        return _PREFIX + digest

    async def record(self, source: str, codes: Sequence[Unmapped]) -> None:
        """Count each distinct (system, code) of ``codes`` once more for ``source``.

        Raises BackendError.
        """
        await self.record_counts(
            [
                (source, system, code, 1)
                for system, code in sorted({(u.system, u.code) for u in codes})
            ]
        )

    async def record_counts(self, counts: Sequence[tuple[str, str, str, int]]) -> None:
        """Count each (source, system, code) ``count`` times more (the codes of many messages
        at once: one entry per distinct code). Raises BackendError."""
        now = _now()
        for source, system, code, count in counts:
            key = self._key(source, system, code)
            first = json.dumps(
                {"code": code, "system": system, "source": source, "first": now}
            ).encode()
            if await self.state.set_if_absent(key, first):
                slot = await self.state.incr(_PREFIX + "n")
                await self.state.set(f"{_PREFIX}slot:{slot}", key.encode())
            await self.state.incr(key + ":count", count)
            await self.state.set(key + ":last", now.encode())

    async def entries(self, *, limit: int = MAX_LISTED) -> list[CurationEntry]:
        """The queue, most frequent first (then most recently seen). Raises BackendError."""
        raw_n = await self.state.get(_PREFIX + "n")
        n = min(int(raw_n or b"0"), limit)
        out = []
        for slot in range(1, n + 1):
            key = await self.state.get(f"{_PREFIX}slot:{slot}")
            if key is None:
                continue
            first = await self.state.get(key.decode())
            if first is None:
                continue
            info = json.loads(first)
            count = int(await self.state.get(key.decode() + ":count") or b"0")
            last = (await self.state.get(key.decode() + ":last") or b"").decode()
            out.append(
                CurationEntry(
                    code=str(info["code"]),
                    system=str(info["system"]),
                    source=str(info["source"]),
                    first_seen=str(info["first"]),
                    last_seen=last or str(info["first"]),
                    count=count,
                )
            )
        out.sort(key=lambda e: e.last_seen, reverse=True)
        out.sort(key=lambda e: e.count, reverse=True)  # stable: ties keep the latest first
        return out


class DictionaryAnchors:
    """Ledger listener: the dictionary versions anchored so far (in ledger order)."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}  # version -> leaf index

    def on_batch(self, first: int, leaves: Sequence[bytes], seq: int) -> None:
        """Note every ``dictionary`` leaf of an applied batch."""
        for offset, raw in enumerate(leaves):
            if b'"kind":"dictionary"' not in raw:
                continue
            leaf = decode_leaf(raw)
            self.versions.setdefault(str(leaf["version"]), first + offset)


class TerminologyService:
    """The dictionary in use, its policy application and its curation queue."""

    def __init__(self, *, terminology: Terminology, state: StateStore, institution: str) -> None:
        self.terminology = terminology
        self.queue = CurationQueue(state)
        self.institution = institution
        self.anchors = DictionaryAnchors()

    @property
    def version(self) -> str:
        """The version of the dictionary in use."""
        return self.terminology.version

    def dictionary_leaf(self, *, source: str) -> bytes:
        """The ``dictionary`` leaf of the version in use."""
        term = self.terminology
        return encode_leaf(
            "dictionary",
            {
                "version": term.version,
                "sha256": bundle_sha256(term),
                "files": [{"name": f.name, "sha256": f.sha256} for f in term.files],
                "source": source,
                "time": _now(),
            },
        )

    async def ensure_anchored(self, ledger: Ledger) -> int | None:
        """Append the ``dictionary`` leaf of the version in use unless already anchored;
        return its leaf index, or None when it was. Raises LedgerError/BackendError."""
        if self.version in self.anchors.versions:
            return None
        (result,) = await ledger.append([self.dictionary_leaf(source=self.institution)])
        self.anchors.versions.setdefault(self.version, result.index)
        return result.index

    def map(self, resource: Json, *, source: str) -> Applied:
        """Apply the dictionary to one resource (pure; see mappings.dictionary_apply)."""
        return apply_dictionary(resource, self.terminology, source=source)

    def labels(self, resource: Json) -> list[Json]:
        """Security labels the resource's codes imply (see mappings.dictionary_apply.labels)."""
        return labels(resource, self.terminology)

    async def apply(self, resource: Json, *, source: str, profile: SenderProfile) -> Json:
        """The resource with the dictionary applied, under ``profile.unmapped_codes``.

        ``reject``: raises InvalidInputError (code ``processing``, HTTP 422) naming the first
        unmapped code and its element. ``accept``: the record is tagged and its unmapped
        codes queued for curation. Raises BackendError when the queue cannot be written.
        """
        applied = self.map(resource, source=source)
        if not applied.unmapped:
            return applied.resource
        if profile.unmapped_codes == "reject":
            first = applied.unmapped[0]
            more = len(applied.unmapped) - 1
            raise InvalidInputError(
                f"code {first.code!r} of system {first.system} at {first.element} has no "
                f"mapping in the unified dictionary (version {self.version})"
                + (f"; {more} more unmapped code(s)" if more else ""),
                location=first.element,
                code="processing",
            )
        await self.queue.record(source, applied.unmapped)
        return tag_unmapped(applied.resource)

    async def apply_all(
        self, resources: Sequence[Json], *, source: str, profile: SenderProfile
    ) -> list[Json]:
        """:meth:`apply` on each resource (all checked before any is queued under reject)."""
        if profile.unmapped_codes == "reject":
            mapped = [self.map(r, source=source) for r in resources]
            for applied in mapped:
                if applied.unmapped:
                    await self.apply(applied.resource, source=source, profile=profile)
            return [a.resource for a in mapped]
        return [await self.apply(r, source=source, profile=profile) for r in resources]


def tag_unmapped(resource: Json) -> Json:
    """A copy of ``resource`` whose ``meta.tag`` holds UNMAPPED_TAG (once)."""
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if not _is_unmapped_tag(t)]
    meta["tag"] = [*tags, dict(UNMAPPED_TAG)]
    out["meta"] = meta
    return out


def untag_unmapped(resource: Json) -> Json:
    """A copy of ``resource`` without UNMAPPED_TAG in ``meta.tag``."""
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if not _is_unmapped_tag(t)]
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    out["meta"] = meta
    return out


def is_tagged_unmapped(resource: Json) -> bool:
    """True when the resource carries UNMAPPED_TAG."""
    return any(_is_unmapped_tag(t) for t in (resource.get("meta") or {}).get("tag", []))


def _is_unmapped_tag(tag: Any) -> bool:
    return (
        isinstance(tag, dict)
        and tag.get("system") == UNMAPPED_TAG["system"]
        and tag.get("code") == UNMAPPED_TAG["code"]
    )
