"""The access log: every decision of an authenticated request, provable to the patient.

:class:`AuditLog` implements :class:`gateway.access.AccessLog`. For each
:class:`gateway.access.AccessEvent` it builds a FHIR R4 ``AuditEvent`` following IHE BALP
(:func:`audit_event`), draws a 32-byte random salt and anchors an ``access`` leaf of exactly
``{v, kind, patient, decision, sha256, source, time}`` with ``sha256`` =
SHA-256(salt || RFC 8785 bytes of the AuditEvent) (:func:`access_hash`). The AuditEvents of
one batch (concurrent callers share it: :class:`ledger.groupcommit.GroupCommitter`) are sealed
together as one collection ``Bundle`` (each entry with its salt) under a fresh data key wrapped
by the custodian's **audit key** (its own key-encryption key in the key store, owner
``audit:{institution}``: not a patient's, so it survives a patient's erasure), stored in the
blob store in one call, and anchored in the same ledger append right after their access
leaves by a ``record`` leaf of type ``AuditEvent`` filed under the institution's own pseudonym
(docs/ledger-format.md). :meth:`AuditLog.record` returns once all of it is durable.

:class:`AccessLogView` is the ledger listener that finds an AuditEvent again: leaf index ->
(container, entry), per patient, derived from the ledger alone (rebuilt at every start, shared
by every process of the custodian). :class:`BreakGlassQueue` is the privacy officer's review
queue of break-glass accesses: a durable local file under the data directory.

Raises :class:`gateway.errors.BackendError`, :class:`ledger.errors.LedgerError` (writing),
:class:`gateway.errors.IntegrityError` (an AuditEvent that does not match its leaf).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from gateway.access import AccessEvent, Interaction
from gateway.backends.protocols import Backends, WrappedKey
from gateway.crypto import associated_data, seal, sha256_hex
from gateway.errors import IntegrityError
from gateway.observability import Metrics
from gateway.packing import build_packs
from gateway.pipeline import RecordPipeline
from gateway.views import ACCESS_LOG_TYPE, RecordAnchor, anchor_of_leaf
from ledger.canonical import canonical_json
from ledger.durable import PRIVATE, fsync_directory, make_directory
from ledger.groupcommit import GroupCommitter
from ledger.leaves import MAX_CONTAINED, RecordLeaf, RecordMember, decode_leaf, encode_leaf
from ledger.sequencer import Ledger

SALT_BYTES = 32
SALT_URL = "https://alliance.example/fhir/StructureDefinition/audit-salt"
#: Identifier systems of what an AuditEvent names (never a patient's real identifier).
PSEUDONYM_SYSTEM = "urn:alliance-gateway:pseudonym"
CLIENT_SYSTEM = "urn:alliance-gateway:client"
USER_SYSTEM = "urn:alliance-gateway:user"
INSTITUTION_SYSTEM = "urn:alliance-gateway:institution"
CONSENT_SYSTEM = "urn:alliance-gateway:consent"

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

#: BALP: the RESTful interaction (AuditEvent.subtype) and its CRUDE action of each interaction.
_SUBTYPE: dict[Interaction, str] = {
    "read": "read",
    "vread": "vread",
    "history": "history-instance",
    "create": "create",
    "update": "update",
    "delete": "delete",
    "search": "search-type",
    "everything": "operation",
    "receipt": "operation",
}
_ACTION: dict[Interaction, str] = {
    "read": "R",
    "vread": "R",
    "history": "R",
    "create": "C",
    "update": "U",
    "delete": "D",
    "search": "E",
    "everything": "E",
    "receipt": "R",
}

#: AuditEvents sealed in one container at most (one ``record`` leaf's ``contains``).
MAX_PER_CONTAINER = MAX_CONTAINED
#: Decrypted containers kept for reads of the access history.
_CONTAINER_CACHE = 64


def audit_owner(institution: str) -> str:
    """The key store owner of an institution's audit key (not a patient pseudonym)."""
    return f"audit:{institution}"


def access_hash(salt: bytes, event: dict[str, Any]) -> str:
    """The ``access`` leaf's ``sha256``: hex SHA-256 of ``salt`` followed by the RFC 8785
    bytes of the AuditEvent (:func:`ledger.canonical.canonical_json`; an AuditEvent has no
    floats). Raises TypeError for a value JSON cannot hold."""
    return hashlib.sha256(salt + canonical_json(event)).hexdigest()


#: Purposes of use that break the glass (gateway/auth/purposes.py EMERGENCY).
_EMERGENCY = frozenset({"BTG", "ETREAT"})


def broke_glass(event: AccessEvent) -> bool:
    """Whether an access broke the glass: the decision says so, or the caller's token is a
    break-glass token (a stated reason) used with an emergency purpose. Raises nothing."""
    caller = event.caller
    return event.decision.break_glass or (
        bool(getattr(caller, "break_glass", None))
        and getattr(caller, "purpose", None) in _EMERGENCY
    )


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _purpose(code: str) -> dict[str, Any]:
    return {"coding": [_coding(_ACT_REASON, code)]}


def _id(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def audit_event(event: AccessEvent, *, institution: str, event_id: str) -> dict[str, Any]:
    """The FHIR R4 AuditEvent (IHE BALP, RESTful access) of one access decision at the
    gateway of ``institution``: type ``rest``, subtype the interaction, action, ``recorded``,
    outcome (``0`` permit, ``4`` deny) and why; agents: the client (with its institution), the
    user and role when the token names them (or the patient, for a patient token), this
    gateway; purpose of use; source: this gateway; entities: the patient (by pseudonym, never
    an identifier), each record returned (or asked), the query (base64 of its canonical
    string) and the consent that decided (id, version, provision path). A break-glass access
    (:func:`broke_glass`) carries the ``BTG`` purpose, the ``BTG`` security label and the
    stated reason in ``outcomeDesc``. Raises nothing."""
    caller = event.caller
    decision = event.decision
    client = str(getattr(caller, "client_id", "") or "unknown")
    caller_institution = str(getattr(caller, "institution", "") or institution)
    purpose = getattr(caller, "purpose", None)
    user = getattr(caller, "user", None)
    role = getattr(caller, "role", None)
    kind = getattr(caller, "kind", "system")
    reason_text = getattr(caller, "break_glass", None)
    own_patient = getattr(caller, "patient", None)
    glass = broke_glass(event)
    purposes = [str(purpose)] if purpose else []
    if glass and "BTG" not in purposes:
        purposes.append("BTG")
    pou = [_purpose(p) for p in purposes]
    recorded = _utc(event.at).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    client_agent: dict[str, Any] = {
        "type": {"coding": [_coding(_DCM, "110153", "Source Role ID")]},
        "who": {
            "identifier": {
                **_id(CLIENT_SYSTEM, client),
                "assigner": {"identifier": _id(INSTITUTION_SYSTEM, caller_institution)},
            }
        },
        "requestor": user is None and kind != "patient",
    }
    if pou:
        client_agent["purposeOfUse"] = pou
    agents = [client_agent]
    if kind == "patient" and own_patient:
        agents.append(
            {
                "type": {"coding": [_coding(_PARTICIPATION, "IRCP", "information recipient")]},
                "who": {"type": "Patient", "identifier": _id(PSEUDONYM_SYSTEM, str(own_patient))},
                "requestor": True,
                **({"purposeOfUse": pou} if pou else {}),
            }
        )
    elif user:
        person: dict[str, Any] = {
            "type": {"coding": [_coding(_PARTICIPATION, "IRCP", "information recipient")]},
            "who": {
                "identifier": {
                    **_id(USER_SYSTEM, str(user)),
                    "assigner": {"identifier": _id(INSTITUTION_SYSTEM, caller_institution)},
                }
            },
            "requestor": True,
        }
        if role:
            person["role"] = [{"text": str(role)}]
        if pou:
            person["purposeOfUse"] = pou
        agents.append(person)
    agents.append(
        {
            "type": {"coding": [_coding(_DCM, "110152", "Destination Role ID")]},
            "who": {"identifier": _id(INSTITUTION_SYSTEM, institution)},
            "requestor": False,
        }
    )

    entities: list[dict[str, Any]] = [
        {
            "what": {"type": "Patient", "identifier": _id(PSEUDONYM_SYSTEM, event.patient)},
            "type": _coding(_ENTITY_TYPE, "1", "Person"),
            "role": _coding(_OBJECT_ROLE, "1", "Patient"),
        }
    ]
    for ref in event.records:
        entities.append(
            {
                "what": {"reference": ref},
                "type": _coding(_ENTITY_TYPE, "2", "System Object"),
                "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
            }
        )
    if event.query is not None:
        entities.append(
            {
                "type": _coding(_ENTITY_TYPE, "2", "System Object"),
                "role": _coding(_OBJECT_ROLE, "24", "Query"),
                "query": base64.b64encode(event.query.encode()).decode(),
            }
        )
    if decision.consent_id is not None:
        detail = [{"type": "consent-version", "valueString": str(decision.consent_version)}]
        if decision.path:
            detail.append({"type": "provision", "valueString": decision.path})
        entities.append(
            {
                "what": {"type": "Consent", "identifier": _id(CONSENT_SYSTEM, decision.consent_id)},
                "type": _coding(_RESOURCE_TYPES, "Consent", "Consent"),
                "role": _coding(_OBJECT_ROLE, "13", "Security Resource"),
                "detail": detail,
            }
        )

    out: dict[str, Any] = {"resourceType": "AuditEvent", "id": event_id}
    if glass:
        out["meta"] = {"security": [_coding(_ACT_REASON, "BTG", "break the glass")]}
    out["type"] = _coding(_AUDIT_TYPE, "rest", "RESTful Operation")
    subtype = [_coding(_INTERACTION, _SUBTYPE.get(event.interaction, "operation"))]
    out["subtype"] = subtype
    out["action"] = _ACTION.get(event.interaction, "E")
    out["recorded"] = recorded
    out["outcome"] = "0" if decision.permitted else "4"
    desc = decision.reason or ("permit" if decision.permitted else "deny")
    if glass:
        desc = f"break-glass: {reason_text or 'no reason stated'}; {desc}"
    out["outcomeDesc"] = desc
    if pou:
        out["purposeOfEvent"] = pou
    out["agent"] = agents
    out["source"] = {
        "site": institution,
        "observer": {"identifier": _id(INSTITUTION_SYSTEM, institution)},
        "type": [_coding(_SOURCE_TYPE, "4", "Application Server")],
    }
    out["entity"] = entities
    return out


def salt_extension(salt: bytes) -> dict[str, str]:
    """The extension carrying an AuditEvent's salt (in its Bundle entry)."""
    return {"url": SALT_URL, "valueBase64Binary": base64.b64encode(salt).decode()}


def leaf_time(at: datetime) -> str:
    """An access leaf's ``time``: the decision's UTC time to the second."""
    return _utc(at).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# finding AuditEvents again: a view derived from the ledger


class LoggedAccess(NamedTuple):
    """One anchored access decision of this custodian: its ``access`` leaf (index and fields)
    and where its sealed AuditEvent is (the container's anchor and the entry)."""

    leaf_index: int
    patient: str
    decision: str
    sha256: str
    time: str
    container: RecordAnchor
    entry: int
    record: str


class AccessLogView:
    """Ledger listener: this custodian's ``access`` leaves paired with their AuditEvents.

    A ``record`` leaf of type ``AuditEvent`` from this institution with ``contains`` of *n*
    members anchors the container of the AuditEvents of the *n* ``access`` leaves right before
    it (one ledger append; docs/ledger-format.md). Raises nothing (a container whose leaves are
    not where they should be is skipped and counted in ``unpaired``)."""

    def __init__(self, institution: str) -> None:
        self.institution = institution
        self._by_patient: dict[str, list[LoggedAccess]] = {}
        self._by_record: dict[str, LoggedAccess] = {}
        self.unpaired = 0

    def on_batch(self, first_index: int, leaves: Sequence[bytes], seq: int) -> None:
        """Index the access-log containers of an applied batch."""
        decoded: list[dict[str, Any] | None] = [None] * len(leaves)
        for offset, raw in enumerate(leaves):
            if b'"type":"AuditEvent"' not in raw:
                continue
            leaf = decode_leaf(raw)
            if leaf["kind"] != "record" or leaf["type"] != ACCESS_LOG_TYPE:
                continue
            if leaf["source"] != self.institution:
                continue
            members = leaf.get("contains") or []
            start = offset - len(members)
            if start < 0 or not members:
                self.unpaired += 1
                continue
            accesses = []
            for n in range(start, offset):
                acc = decoded[n] or decode_leaf(leaves[n])
                decoded[n] = acc
                if acc["kind"] != "access" or acc["source"] != self.institution:
                    break
                accesses.append(acc)
            if len(accesses) != len(members):
                self.unpaired += 1
                continue
            anchor = anchor_of_leaf(RecordLeaf.from_leaf(leaf), first_index + offset)
            for entry, (acc, member) in enumerate(zip(accesses, members, strict=True)):
                logged = LoggedAccess(
                    leaf_index=first_index + start + entry,
                    patient=acc["patient"],
                    decision=acc["decision"],
                    sha256=acc["sha256"],
                    time=acc["time"],
                    container=anchor,
                    entry=entry,
                    record=member["record"],
                )
                self._by_patient.setdefault(logged.patient, []).append(logged)
                self._by_record[logged.record] = logged

    def of_patients(self, patients: Iterable[str]) -> list[LoggedAccess]:
        """Every logged access to these pseudonyms, newest first."""
        found = [x for p in set(patients) for x in self._by_patient.get(p, ())]
        return sorted(found, key=lambda x: x.leaf_index, reverse=True)

    def by_record(self, record: str) -> LoggedAccess | None:
        """The logged access whose AuditEvent has this record id, or None."""
        return self._by_record.get(record)

    def __len__(self) -> int:
        return len(self._by_record)


# --------------------------------------------------------------------------------------------
# the break-glass review queue


@dataclass(frozen=True, slots=True)
class QueuedBreakGlass:
    """A break-glass access waiting for the privacy officer: its AuditEvent's id, the
    patient's pseudonym, the client and institution that broke the glass, and when."""

    event: str
    patient: str
    client: str
    institution: str
    time: str


class BreakGlassQueue:
    """The privacy officer's review queue: one JSON line per break-glass access (ids,
    pseudonym and times only; the stated reason is in the sealed AuditEvent), and one per
    review, appended and fsynced before the access is anchored. Raises OSError (the file
    cannot be written), ValueError (a line that is not JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def _append(self, lines: list[dict[str, str]]) -> None:
        data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        created = not self.path.exists()
        if created:
            make_directory(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.path.parent)

    async def add(self, items: Sequence[QueuedBreakGlass]) -> None:
        """Queue break-glass accesses, durably."""
        if not items:
            return
        lines = [
            {
                "event": x.event,
                "patient": x.patient,
                "client": x.client,
                "institution": x.institution,
                "time": x.time,
            }
            for x in items
        ]
        async with self._lock:
            await asyncio.to_thread(self._append, lines)

    async def review(self, event: str, *, by: str) -> bool:
        """Mark a queued access reviewed (by client/user ``by``); False when it is not queued
        or already reviewed."""
        if event not in {x.event for x in self.pending()}:
            return False
        line = {"reviewed": event, "by": by, "time": leaf_time(datetime.now(UTC))}
        async with self._lock:
            await asyncio.to_thread(self._append, [line])
        return True

    def pending(self) -> list[QueuedBreakGlass]:
        """The accesses not yet reviewed, oldest first."""
        if not self.path.exists():
            return []
        queued: dict[str, QueuedBreakGlass] = {}
        for raw in self.path.read_bytes().splitlines():
            if not raw.strip():
                continue
            item = orjson.loads(raw)
            if "reviewed" in item:
                queued.pop(str(item["reviewed"]), None)
            else:
                queued[str(item["event"])] = QueuedBreakGlass(
                    str(item["event"]),
                    str(item["patient"]),
                    str(item["client"]),
                    str(item["institution"]),
                    str(item["time"]),
                )
        return list(queued.values())


# --------------------------------------------------------------------------------------------
# the writer


class _Built(NamedTuple):
    event: AccessEvent
    resource: dict[str, Any]
    salt: bytes
    leaf: bytes


class FoundAccess(NamedTuple):
    """A logged access read back: its ledger entry, the AuditEvent and its salt."""

    logged: LoggedAccess
    resource: dict[str, Any]
    salt: bytes


class AuditLog:
    """The access log (see the module docstring): ``record`` seals, stores and anchors."""

    def __init__(
        self,
        *,
        backends: Backends,
        ledger: Ledger,
        pipeline: RecordPipeline,
        institution: str,
        metrics: Metrics,
        queue_path: Path,
        max_delay: float = 0.002,
        concurrency: int = 2,
    ) -> None:
        self._b = backends
        self.ledger = ledger
        self.pipeline = pipeline
        self.institution = institution
        self.metrics = metrics
        self.view = AccessLogView(institution)
        self.queue = BreakGlassQueue(queue_path)
        self._kek: tuple[str, bytes] | None = None
        self._kek_lock = asyncio.Lock()
        self._containers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._commit: GroupCommitter[AccessEvent, None] = GroupCommitter(
            self._write,
            name="access-log",
            max_items=MAX_PER_CONTAINER,
            max_delay=max_delay,
            concurrency=concurrency,
        )

    def start(self) -> None:
        """Start the batching task (inside the running loop)."""
        self._commit.start()

    async def stop(self) -> None:
        """Stop it; queued events fail with GroupCommitStoppedError."""
        await self._commit.stop()

    async def record(self, events: Sequence[AccessEvent]) -> None:
        """Log ``events``; return once every AuditEvent is sealed and stored and every
        ``access`` leaf is durable in the ledger. Raises BackendError, LedgerError
        (GroupCommitStoppedError when stopped)."""
        if events:
            await self._commit.submit(events)

    async def audit_key(self) -> tuple[str, bytes]:
        """(key id, key) of this custodian's audit key, created on first use. Raises
        BackendError, KeyDestroyedError."""
        if self._kek is None:
            async with self._kek_lock:
                if self._kek is None:
                    self._kek = await self._b.keys.kek_for(audit_owner(self.institution))
        return self._kek

    def _build(self, event: AccessEvent) -> _Built:
        resource = audit_event(event, institution=self.institution, event_id=uuid.uuid4().hex)
        salt = secrets.token_bytes(SALT_BYTES)
        leaf = encode_leaf(
            "access",
            {
                "patient": event.patient,
                "decision": "permit" if event.decision.permitted else "deny",
                "sha256": access_hash(salt, resource),
                "source": self.institution,
                "time": leaf_time(event.at),
            },
        )
        return _Built(event, resource, salt, leaf)

    async def _write(self, events: list[AccessEvent]) -> list[None]:
        """One batch: seal the AuditEvents (one container per MAX_PER_CONTAINER), store the
        ciphertexts in one blob-store call and their wrapped keys in one key-store call,
        queue the break-glass ones, then append every access leaf with its container's
        ``record`` leaf in one ledger append."""
        kek_id, kek = await self.audit_key()
        built = [self._build(e) for e in events]
        chunks = [built[n : n + MAX_PER_CONTAINER] for n in range(0, len(built), MAX_PER_CONTAINER)]
        owner = self.pipeline.no_patient
        sealed = []
        for chunk in chunks:
            bundle_id = uuid.uuid4().hex
            rec = self.pipeline.record_of(ACCESS_LOG_TYPE, f"log-{bundle_id}")
            bundle = {
                "resourceType": "Bundle",
                "id": bundle_id,
                "type": "collection",
                "entry": [
                    {
                        "fullUrl": f"AuditEvent/{b.resource['id']}",
                        "extension": [salt_extension(b.salt)],
                        "resource": b.resource,
                    }
                    for b in chunk
                ],
            }
            aad = associated_data(rec, owner, ACCESS_LOG_TYPE, kek_id)
            box = seal(orjson.dumps(bundle), kek=kek, aad=aad)
            sealed.append((rec, box, WrappedKey(sha256_hex(box.blob), kek_id, box.wrapped_key)))
        packs, where = build_packs([box.blob for _rec, box, _key in sealed])
        cids, _ = await asyncio.gather(
            self._b.blobs.put_many(packs),
            self._b.keys.put_wrapped_keys([key for _rec, _box, key in sealed]),
        )
        glass = [b for b in built if broke_glass(b.event)]
        await self.queue.add(
            [
                QueuedBreakGlass(
                    event=b.resource["id"],
                    patient=b.event.patient,
                    client=str(getattr(b.event.caller, "client_id", "")),
                    institution=str(getattr(b.event.caller, "institution", "")),
                    time=b.resource["recorded"],
                )
                for b in glass
            ]
        )
        now = leaf_time(datetime.now(UTC))
        leaves: list[bytes] = []
        for chunk, (rec, _box, key), (pack, byte_range) in zip(chunks, sealed, where, strict=True):
            leaves += [b.leaf for b in chunk]
            leaves.append(
                RecordLeaf(
                    record=rec,
                    version=1,
                    cid=cids[pack],
                    sha256=key.record_id,
                    patient=owner,
                    type=ACCESS_LOG_TYPE,
                    source=self.institution,
                    dictionary=self.pipeline.dictionary_version,
                    time=now,
                    byte_range=byte_range,
                    contains=tuple(
                        RecordMember(
                            self.pipeline.record_of(ACCESS_LOG_TYPE, b.resource["id"]),
                            ACCESS_LOG_TYPE,
                            1,
                        )
                        for b in chunk
                    ),
                ).encode()
            )
        await self.ledger.append(leaves)
        for b in glass:
            self.metrics.break_glass.labels(
                str(getattr(b.event.caller, "institution", "") or self.institution)
            ).inc()
        return [None] * len(events)

    # ---- reading ---------------------------------------------------------------------------

    async def _container(self, anchor: RecordAnchor) -> dict[str, Any]:
        cached = self._containers.get(anchor.record)
        if cached is not None:
            self._containers.move_to_end(anchor.record)
            return cached
        bundle = await self.pipeline.read_anchor(anchor)
        self._containers[anchor.record] = bundle
        while len(self._containers) > _CONTAINER_CACHE:
            self._containers.popitem(last=False)
        return bundle

    async def read(self, logged: LoggedAccess) -> FoundAccess:
        """The AuditEvent of a logged access and its salt, checked against its leaf.

        Raises IntegrityError (the AuditEvent does not hash to its leaf, or is not where the
        ledger says), KeyDestroyedError, BackendError."""
        bundle = await self._container(logged.container)
        entries = bundle.get("entry") or []
        entry = entries[logged.entry] if logged.entry < len(entries) else None
        resource = entry.get("resource") if isinstance(entry, dict) else None
        salt_b64 = next(
            (
                x.get("valueBase64Binary")
                for x in (entry or {}).get("extension", [])
                if isinstance(x, dict) and x.get("url") == SALT_URL
            ),
            None,
        )
        where = f"access leaf {logged.leaf_index} (container {logged.container.where})"
        if not isinstance(resource, dict) or not isinstance(salt_b64, str):
            raise IntegrityError(
                f"{where}: entry {logged.entry} is missing",
                record=logged.record,
                cid=logged.container.cid,
            )
        salt = base64.b64decode(salt_b64)
        if access_hash(salt, resource) != logged.sha256:
            raise IntegrityError(
                f"{where}: the AuditEvent does not hash to its leaf",
                record=logged.record,
                cid=logged.container.cid,
            )
        return FoundAccess(logged, resource, salt)

    async def history(
        self, patients: Iterable[str], *, before: int | None = None, count: int = 50
    ) -> list[FoundAccess]:
        """The logged accesses to these pseudonyms, newest first, at most ``count``, only
        those anchored below leaf ``before`` when given. Raises as :meth:`read`."""
        out = []
        for logged in self.view.of_patients(patients):
            if before is not None and logged.leaf_index >= before:
                continue
            out.append(await self.read(logged))
            if len(out) >= count:
                break
        return out

    async def find(self, event_id: str) -> FoundAccess | None:
        """The logged access whose AuditEvent has id ``event_id`` (None: not anchored).
        Raises as :meth:`read`."""
        logged = self.view.by_record(self.pipeline.record_of(ACCESS_LOG_TYPE, event_id))
        return None if logged is None else await self.read(logged)
