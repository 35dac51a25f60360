"""What the search index keeps of one resource version (:class:`IndexEntry`), taken from it once
when it is stored.

Kept: type, id, version, lastUpdated, the patient pseudonym (from the record's anchor), codes
and categories as ``system|code`` tokens, status, identifiers as HMAC pseudonyms
(:func:`gateway.crypto.pseudonym`; each also under a system-less pseudonym so it can be searched
without its system), the clinical date as a ``[low, high)`` range, references as ``Type/id``
and the security labels. Not kept: names, addresses, telecoms, birth dates, identifier values,
free text, values.

Raises nothing for odd resources: what does not parse is not indexed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, NamedTuple

from gateway.consent import RecordMeta
from gateway.crypto import pseudonym
from gateway.errors import InvalidInputError
from gateway.search.params import PARAMS, date_range

#: System under which an identifier's system-less pseudonym is kept (an ``identifier=value``
#: search); identifiers that have no system are also kept under ``""`` (``identifier=|value``).
ANY_SYSTEM = "#"

_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


@dataclass(slots=True)
class IndexEntry:
    """One resource version as the index keeps it (see the module docstring)."""

    custodian: str
    record: str
    resource_type: str
    resource_id: str
    version: int
    last_updated: int  # microseconds since the epoch
    patient: str
    date_lo: int | None = None
    date_hi: int | None = None
    tokens: Sequence[tuple[str, str, str]] = field(default_factory=list)  # (param, system, code)
    refs: Sequence[tuple[str, str]] = field(default_factory=list)  # (param, "Type/id")
    labels: Sequence[str] = field(default_factory=list)  # "system|code" of meta.security


def reference_of(value: Any) -> str | None:
    """``Type/id`` of a FHIR Reference (relative, absolute or versioned), or None."""
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return None
    m = _REF.search(ref)
    return f"{m[1]}/{m[2]}" if m else None


def _codings(value: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for cc in value if isinstance(value, list) else [value]:
        if isinstance(cc, str):  # a plain code (AllergyIntolerance.category)
            out.append(("", cc))
            continue
        if not isinstance(cc, dict):
            continue
        for c in cc.get("coding") or []:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                out.append((str(c.get("system") or ""), c["code"]))
    return out


def _range(value: Any, tz: tzinfo) -> tuple[int | None, int | None] | None:
    try:
        if isinstance(value, str):
            return date_range(value, tz)
        if isinstance(value, dict):  # Period
            start, end = value.get("start"), value.get("end")
            lo = date_range(start, tz)[0] if isinstance(start, str) else None
            hi = date_range(end, tz)[1] if isinstance(end, str) else None
            if lo is None and hi is None:
                return None
            return lo, hi
    except InvalidInputError:
        return None
    return None


_DATE_PATHS = {
    "Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod", "issued"),
    "Encounter": ("period",),
    "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod"),
    "ServiceRequest": ("authoredOn",),
    "MedicationRequest": ("authoredOn",),
    "AllergyIntolerance": ("onsetDateTime", "recordedDate"),
    "ImagingStudy": ("started",),
    "DocumentReference": ("date",),
    "Specimen": ("receivedTime",),
}

_CODE_PATHS = {"MedicationRequest": "medicationCodeableConcept"}


def clinical_date(resource: dict[str, Any], tz: tzinfo = UTC) -> tuple[int | None, int | None]:
    """The resource's clinical date range (``[low, high)``, either end None when open), or
    (None, None) when it has none. Raises nothing."""
    rtype = str(resource.get("resourceType"))
    if rtype == "Appointment":
        start, end = resource.get("start"), resource.get("end")
        if isinstance(start, str):
            r = _range({"start": start, "end": end if isinstance(end, str) else start}, tz)
            if r is not None:
                return r
        return None, None
    if rtype == "Specimen":
        collection = resource.get("collection")
        if isinstance(collection, dict):
            for key in ("collectedDateTime", "collectedPeriod"):
                r = _range(collection.get(key), tz)
                if r is not None:
                    return r
    for key in _DATE_PATHS.get(rtype, ()):
        r = _range(resource.get(key), tz)
        if r is not None:
            return r
    return None, None


class IndexRows(NamedTuple):
    """What the index keeps of one resource that does not depend on when and where it is
    stored (type, id, clinical date, tokens, references, security labels): the compact,
    picklable form the HL7 conversion workers compute beside the resource, so that the
    gateway's own process only adds the record id, version, lastUpdated and patient
    (:func:`entry_of_rows`)."""

    resource_type: str
    resource_id: str
    date_lo: int | None
    date_hi: int | None
    tokens: tuple[tuple[str, str, str], ...]
    refs: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]


def index_rows(resource: dict[str, Any], *, key: bytes, tz: tzinfo = UTC) -> IndexRows:
    """The stored-independent part of a resource's index entry (see :class:`IndexRows`):
    ``key`` is the pseudonym key identifiers are hashed with; security labels are read from
    whatever ``meta.security`` the resource carries. Raises nothing."""
    rtype = str(resource.get("resourceType"))
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    assert isinstance(meta, dict)
    defs = PARAMS.get(rtype, {})
    date_lo = date_hi = None
    if "date" in defs:
        date_lo, date_hi = clinical_date(resource, tz)
    tokens: list[tuple[str, str, str]] = []
    if "code" in defs:
        for system, code in _codings(resource.get(_CODE_PATHS.get(rtype, "code"))):
            tokens.append(("code", system, code))
    if "category" in defs:
        for system, code in _codings(resource.get("category")):
            tokens.append(("category", system, code))
    status = resource.get("status")
    if "status" in defs and isinstance(status, str):
        tokens.append(("status", "", status))
    idents = resource.get("identifier")
    for ident in idents if isinstance(idents, list) else [idents]:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        system = str(ident.get("system") or "")
        value = ident["value"]
        tokens.append(("identifier", system, pseudonym(key, system, value)))
        tokens.append(("identifier", ANY_SYSTEM, pseudonym(key, "", value)))
    refs: list[tuple[str, str]] = []
    subject = reference_of(resource.get("subject")) or reference_of(resource.get("patient"))
    if subject is not None:
        refs.append(("subject", subject))
    encounter = reference_of(resource.get("encounter")) or reference_of(resource.get("context"))
    if encounter is not None:
        refs.append(("encounter", encounter))
    for param, element in (("based-on", "basedOn"), ("result", "result"), ("target", "target")):
        values = resource.get(element)
        for value in values if isinstance(values, list) else []:
            target = reference_of(value)
            if target is not None:
                refs.append((param, target))
    labels: list[str] = []
    for label in meta.get("security") or []:
        if isinstance(label, dict) and isinstance(label.get("code"), str):
            labels.append(f"{label.get('system') or ''}|{label['code']}")
    return IndexRows(
        rtype,
        str(resource.get("id")),
        date_lo,
        date_hi,
        tuple(dict.fromkeys(tokens)),
        tuple(dict.fromkeys(refs)),
        tuple(dict.fromkeys(labels)),
    )


def last_updated_of(value: Any) -> int:
    """``meta.lastUpdated`` in microseconds since the epoch (0 when absent or malformed).
    Raises nothing."""
    try:
        return date_range(value, UTC)[0] if isinstance(value, str) else 0
    except InvalidInputError:
        return 0


def entry_of_rows(
    rows: IndexRows,
    *,
    custodian: str,
    record: str,
    version: int,
    last_updated: int,
    patient: str,
) -> IndexEntry:
    """The index entry of a stored version from its :class:`IndexRows` and what storing it
    decided. Raises nothing."""
    return IndexEntry(
        custodian=custodian,
        record=record,
        resource_type=rows.resource_type,
        resource_id=rows.resource_id,
        version=version,
        last_updated=last_updated,
        patient=patient,
        date_lo=rows.date_lo,
        date_hi=rows.date_hi,
        tokens=rows.tokens,
        refs=rows.refs,
        labels=rows.labels,
    )


def extract(
    resource: dict[str, Any],
    *,
    custodian: str,
    record: str,
    version: int,
    patient: str,
    key: bytes,
    tz: tzinfo = UTC,
) -> IndexEntry:
    """The index entry of one stored resource version. ``key`` is the pseudonym key
    identifiers are hashed with. Raises nothing."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    assert isinstance(meta, dict)
    rows = index_rows(resource, key=key, tz=tz)
    entry = entry_of_rows(
        rows,
        custodian=custodian,
        record=record,
        version=version,
        last_updated=last_updated_of(meta.get("lastUpdated")),
        patient=patient,
    )
    entry.tokens, entry.refs, entry.labels = list(rows.tokens), list(rows.refs), list(rows.labels)
    return entry


#: Token parameters whose codes consent looks at (``Consent.provision.code``): the record's
#: codes and categories.
CONSENT_CODE_PARAMS = ("code", "category")


def meta_of_entry(entry: IndexEntry) -> RecordMeta:
    """What consent looks at of an index entry: type, custodian, codes and categories
    (``system|code``), clinical date (the start of its range, UTC) and security labels; the
    same as the index's ``meta_of`` answers for it. Raises nothing."""
    return RecordMeta(
        resource_type=entry.resource_type,
        custodian=entry.custodian,
        codes=frozenset(f"{s}|{c}" for p, s, c in entry.tokens if p in CONSENT_CODE_PARAMS),
        clinical_date=None
        if entry.date_lo is None
        else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=entry.date_lo),
        labels=frozenset(entry.labels),
    )


def meta_of_resource(resource: dict[str, Any], custodian: str, tz: tzinfo = UTC) -> RecordMeta:
    """What consent looks at of a decrypted resource, extracted exactly as the index would
    (:func:`extract`, :func:`meta_of_entry`): the record service's fallback when the search
    index is switched off or has not indexed the version yet. Raises nothing."""
    entry = extract(resource, custodian=custodian, record="", version=0, patient="", key=b"", tz=tz)
    return meta_of_entry(entry)
