"""The search parameters this gateway supports, per resource type, and how their values parse.

One table (:data:`PARAMS`) says which parameters each type has and of what kind; the
extraction (:mod:`gateway.search.extract`), the query parser (:mod:`gateway.search.service`)
and the CapabilityStatement (:func:`search_params_of`) all read it, so what is declared is
what works.

Raises :class:`gateway.errors.InvalidInputError` for a malformed value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Literal

from gateway.errors import InvalidInputError

Kind = Literal["token", "reference", "date", "special"]

#: Every search returns at most this many entries per page (``_count`` is capped to it).
MAX_COUNT = 500
DEFAULT_COUNT = 50


@dataclass(frozen=True, slots=True)
class ParamDef:
    """One search parameter: its name, kind, and what a reference points at by default."""

    name: str
    kind: Kind
    doc: str
    target: str = ""  # reference: the type a bare id means


_CODED = ("Observation", "DiagnosticReport", "Condition", "Procedure", "ServiceRequest")
_CATEGORISED = (
    "Observation",
    "DiagnosticReport",
    "Condition",
    "ServiceRequest",
    "MedicationRequest",
    "DocumentReference",
    "Procedure",
    "AllergyIntolerance",
)
_ENCOUNTERED = (
    "Observation",
    "DiagnosticReport",
    "Condition",
    "Procedure",
    "ServiceRequest",
    "MedicationRequest",
    "DocumentReference",
    "ImagingStudy",
)
_BASED_ON = ("Observation", "DiagnosticReport", "Procedure", "ImagingStudy", "MedicationRequest")
_DATED = (
    "Observation",
    "DiagnosticReport",
    "Encounter",
    "Condition",
    "Procedure",
    "ServiceRequest",
    "MedicationRequest",
    "AllergyIntolerance",
    "ImagingStudy",
    "DocumentReference",
    "Appointment",
    "Specimen",
)
_PATIENT_TYPES = (*_DATED, "Provenance")

COMMON = {
    "_id": ParamDef("_id", "special", "Logical id of the resource"),
    "_lastUpdated": ParamDef("_lastUpdated", "date", "When the version was stored"),
}


def _defs() -> dict[str, dict[str, ParamDef]]:
    table: dict[str, dict[str, ParamDef]] = {}

    def add(types: tuple[str, ...], d: ParamDef) -> None:
        for t in types:
            table.setdefault(t, dict(COMMON))[d.name] = d

    every = (*_PATIENT_TYPES, "Patient", "Organization", "Practitioner")
    add(every, ParamDef("identifier", "token", "An identifier (matched through its pseudonym)"))
    add(
        tuple(t for t in every if t not in ("Patient", "Organization", "Practitioner")),
        ParamDef("status", "token", "Status of the resource"),
    )
    add((*_CODED, "AllergyIntolerance", "MedicationRequest"), ParamDef("code", "token", "Code"))
    add(_CATEGORISED, ParamDef("category", "token", "Category"))
    add(_DATED, ParamDef("date", "date", "Clinically relevant date or period"))
    add(("Observation", "DiagnosticReport"), ParamDef("effective", "date", "Same as date"))
    add(("ServiceRequest", "MedicationRequest"), ParamDef("authored", "date", "Same as date"))
    add(_PATIENT_TYPES, ParamDef("patient", "reference", "The patient", "Patient"))
    add(_PATIENT_TYPES, ParamDef("subject", "reference", "The subject", "Patient"))
    add(_ENCOUNTERED, ParamDef("encounter", "reference", "The encounter", "Encounter"))
    add(_BASED_ON, ParamDef("based-on", "reference", "The request fulfilled", "ServiceRequest"))
    add(("DiagnosticReport",), ParamDef("result", "reference", "An observation", "Observation"))
    add(("Provenance",), ParamDef("target", "reference", "A version the activity wrote"))
    table.setdefault("Patient", dict(COMMON))
    return table


PARAMS: dict[str, dict[str, ParamDef]] = _defs()

#: Reference parameters that mean the record's patient (matched by pseudonym).
PATIENT_PARAMS = frozenset({"patient", "subject"})

_FHIR_TYPE = {"token": "token", "reference": "reference", "date": "date", "special": "token"}


def search_params_of(resource_type: str) -> list[dict[str, str]]:
    """The CapabilityStatement ``rest.resource.searchParam`` list of ``resource_type`` (empty
    if the type is not searchable). Raises nothing."""
    return [
        {"name": d.name, "type": _FHIR_TYPE[d.kind], "documentation": d.doc}
        for d in PARAMS.get(resource_type, {}).values()
    ]


# ---- values ---------------------------------------------------------------------------------

_DATE_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _micros(dt: datetime) -> int:
    return (dt - _EPOCH) // _US


def date_range(value: str, tz: tzinfo = UTC) -> tuple[int, int]:
    """The instants ``[low, high)`` (microseconds since the epoch) a FHIR date, dateTime or
    instant covers at its precision: ``2024`` is the whole year, ``2024-03-01`` the day (in
    ``tz`` when no offset is given). Raises InvalidInputError for anything else."""
    m = _DATE_RE.fullmatch(value.strip())
    if m is None:
        raise InvalidInputError(f"not a FHIR date: {value!r}", code="invalid")
    try:
        y = int(m["y"])
        if m["m"] is None:
            lo = datetime(y, 1, 1, tzinfo=tz)
            hi = datetime(y + 1, 1, 1, tzinfo=tz)
        elif m["d"] is None:
            mo = int(m["m"])
            lo = datetime(y, mo, 1, tzinfo=tz)
            hi = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=tz)
        elif m["H"] is None:
            lo = datetime(y, int(m["m"]), int(m["d"]), tzinfo=tz)
            hi = lo + timedelta(days=1)
        else:
            zone: tzinfo = tz
            if m["tz"] == "Z":
                zone = UTC
            elif m["tz"]:
                sign = -1 if m["tz"][0] == "-" else 1
                hh, mm = int(m["tz"][1:3]), int(m["tz"][4:6])
                zone = timezone(sign * timedelta(hours=hh, minutes=mm))
            seconds = int(m["S"] or 0)
            frac = m["f"]
            micro = round(float(frac) * 1_000_000) if frac else 0
            lo = datetime(
                y, int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"]), seconds, min(micro, 999_999)
            ).replace(tzinfo=zone)
            if frac:
                step = timedelta(microseconds=max(1, 10 ** (6 - min(6, len(frac) - 1))))
            elif m["S"] is not None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(minutes=1)
            hi = lo + step
    except ValueError as exc:
        raise InvalidInputError(f"not a valid date: {value!r} ({exc})", code="invalid") from exc
    return _micros(lo), _micros(hi)


PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")


def split_prefix(value: str) -> tuple[str, str]:
    """(prefix, rest) of a date search value; ``eq`` when none is given. Raises nothing."""
    if len(value) > 2 and value[:2] in PREFIXES and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def split_values(value: str) -> list[str]:
    """The comma-separated alternatives of a search value (``\\,`` escapes a comma).
    Raises nothing."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def token(value: str) -> tuple[str | None, str | None]:
    """(system, code) of a token value: ``system|code``, ``|code`` (no system: ``""``),
    ``code`` (any system: None), ``system|`` (any code: None). Raises InvalidInputError for
    an empty value."""
    if not value:
        raise InvalidInputError("empty token value", code="invalid")
    if "|" not in value:
        return None, value
    system, _, code = value.partition("|")
    return system, code or None
