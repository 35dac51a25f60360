"""HL7 v2 data types -> FHIR R4 data types (pure functions over decoded repetitions).

Date/time policy: HL7 DTM/TS values keep the precision that was sent. A date (YYYY,
YYYY-MM, YYYY-MM-DD) stays a date. FHIR requires a time zone on any dateTime that has a
time, and seconds on every time: a DTM with a time but no UTC offset gets the offset of
``default_tz`` (an IANA zone name passed by the caller, the alliance default
``Asia/Shanghai``) at that local time; an hour- or minute-precision time is written with
zero minutes/seconds because FHIR cannot express it otherwise. Fractional seconds are kept
as sent.

Identifiers: an identifier whose assigning authority is empty is scoped to the sending
facility (``urn:alliance:facility:{MSH-4}:id``), never rejected.

Raises :class:`mappings.errors.MessageContentError` (102, data type error) for values that
do not fit their data type (an impossible date, a non-numeric NM). Locations are added by
the callers, which know the segment and field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mappings.errors import MappingError, MessageContentError
from mappings.v2.parse import Rep, comp, comps

__all__ = [
    "INTERPRETATION_SYSTEM",
    "UCUM",
    "V2_0203",
    "address",
    "authority_system",
    "coding_system",
    "contact_point",
    "cwe_codings",
    "decimal",
    "ei_identifier",
    "facility_system",
    "human_name",
    "identifier",
    "interpretation",
    "name_display",
    "observation_status",
    "quantity",
    "reference_range",
    "sn_value",
    "to_date",
    "to_datetime",
    "to_instant",
    "ucum",
    "xcn_reference",
]

JsonDict = dict[str, Any]

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
UCUM_SYSTEM = "http://unitsofmeasure.org"

_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?)?)?)?"
    r"([+-]\d{4})?\Z"
)
_NM = re.compile(r"\s*([+-])?(\d*)(?:\.(\d*))?\s*\Z")
_OID = re.compile(r"[0-2](\.(0|[1-9]\d*))+\Z")


@lru_cache(maxsize=1024)
def _urn_part(value: str) -> str:
    return quote(value, safe="-._~")


def facility_system(facility: str, kind: str = "id") -> str:
    """System URI for identifiers the sending facility assigned without an authority."""
    return f"urn:alliance:facility:{_urn_part(facility)}:{kind}"


# ---------------------------------------------------------------- date and time


@lru_cache(maxsize=32)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise MappingError("the configured default time zone is unknown") from exc


@lru_cache(maxsize=4096)
def _split_dtm(value: str) -> tuple[str | None, ...]:
    """The parts of a DTM (year ... fraction, offset); memoised, errors are not.

    Raises MessageContentError (102) for a malformed or impossible value.
    """
    match = _DTM.match(value.strip())
    if match is None:
        raise MessageContentError("not a valid HL7 date/time", hl7_code="102")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),
        )
    except ValueError as exc:
        raise MessageContentError("not a valid HL7 date/time", hl7_code="102") from exc
    if offset is not None and (int(offset[1:3]) > 14 or int(offset[3:5]) > 59):
        raise MessageContentError("not a valid UTC offset", hl7_code="102")
    return year, month, day, hour, minute, second, frac, offset


def _offset_for(local: tuple[str | None, ...], default_tz: str) -> str:
    year, month, day, hour, minute, second = (int(p or 0) for p in local[:6])
    naive = datetime(year, month, day, hour, minute, min(second, 59))
    delta = naive.replace(tzinfo=_zone(default_tz)).utcoffset() or timedelta(0)
    total = int(delta.total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return f"{sign}{total // 60:02d}:{total % 60:02d}"


def to_datetime(value: str, *, default_tz: str) -> str:
    """HL7 DTM/TS (component 1) -> FHIR dateTime, keeping the precision that was sent.

    Raises MessageContentError (102) for a malformed or impossible value.
    """
    return _to_datetime(value, default_tz)


@lru_cache(maxsize=4096)
def _to_datetime(value: str, default_tz: str) -> str:
    """:func:`to_datetime`, memoised per (value, zone); errors are not memoised."""
    year, month, day, hour, minute, second, frac, offset = _split_dtm(value)
    if month is None:
        return year or ""
    if day is None:
        return f"{year}-{month}"
    if hour is None:
        return f"{year}-{month}-{day}"
    tz = (
        f"{offset[:3]}:{offset[3:]}"
        if offset is not None
        else _offset_for((year, month, day, hour, minute, second), default_tz)
    )
    return f"{year}-{month}-{day}T{hour}:{minute or '00'}:{second or '00'}{frac or ''}{tz}"


def to_instant(value: str, *, default_tz: str) -> str | None:
    """HL7 DTM -> FHIR instant, or ``None`` when the value has no time of day.

    Raises MessageContentError (102) for a malformed or impossible value.
    """
    converted = to_datetime(value, default_tz=default_tz)
    return converted if "T" in converted else None


def to_date(value: str) -> str:
    """HL7 DT/DTM -> FHIR date (a time of day, if sent, is dropped).

    Raises MessageContentError (102) for a malformed or impossible value.
    """
    year, month, day, *_rest = _split_dtm(value)
    return "-".join(p for p in (year, month, day) if p is not None)


# ---------------------------------------------------------------- identifiers


def authority_system(
    namespace: str, universal_id: str, universal_type: str, systems: Mapping[str, str]
) -> str | None:
    """System URI of an HD assigning authority, or ``None`` when the HD is empty.

    ``systems`` maps a namespace id (or universal id) to a configured URI.
    """
    if namespace and namespace in systems:
        return systems[namespace]
    if universal_id:
        if universal_id in systems:
            return systems[universal_id]
        utype = universal_type.upper()
        if utype == "ISO" or (not utype and _OID.match(universal_id)):
            return f"urn:oid:{universal_id}"
        if utype == "UUID":
            return f"urn:uuid:{universal_id.lower()}"
        if utype == "URI":
            return universal_id
    if namespace:
        return f"urn:alliance:authority:{_urn_part(namespace)}"
    return None


def _hd(rep: Rep, index: int) -> tuple[str, str, str]:
    """The HD (namespace, universal id, its type) held in component ``index`` of ``rep``."""
    subs = rep[index - 1] if index <= len(rep) else []
    count = len(subs)
    return (
        subs[0] if count > 0 else "",
        subs[1] if count > 1 else "",
        subs[2] if count > 2 else "",
    )


def _type_concept(code: str) -> JsonDict:
    return {"coding": [{"system": V2_0203, "code": code}]}


def identifier(
    rep: Rep, *, facility: str, systems: Mapping[str, str], kind: str = "id"
) -> JsonDict | None:
    """CX -> Identifier; an empty assigning authority is scoped to the sending facility."""
    value, _check, _scheme, _authority, type_code, _facility, start, end = comps(rep, 8)
    if not value:
        return None
    namespace, universal_id, universal_type = _hd(rep, 4)
    system = authority_system(namespace, universal_id, universal_type, systems)
    out: JsonDict = {}
    if type_code:
        out["type"] = _type_concept(type_code)
    out["system"] = system or facility_system(facility, kind)
    out["value"] = value
    if start or end:
        period: JsonDict = {}
        if start:
            period["start"] = to_date(start)
        if end:
            period["end"] = to_date(end)
        out["period"] = period
    if namespace:
        out["assigner"] = {"display": namespace}
    return out


def ei_identifier(
    rep: Rep | None,
    *,
    facility: str,
    systems: Mapping[str, str],
    kind: str,
    type_code: str | None = None,
) -> JsonDict | None:
    """EI -> Identifier: a universal id (EI.3/4) or configured namespace gives the system;
    otherwise the number is scoped to the sending facility, ``kind`` and namespace (EI.2)."""
    value, namespace, universal_id, universal_type = comps(rep, 4)
    if not value:
        return None
    if universal_id or namespace in systems:
        system = authority_system(namespace, universal_id, universal_type, systems)
    else:  # an application's own numbers: scoped to the facility, then the application
        system = facility_system(facility, f"{kind}:{namespace}" if namespace else kind)
    out: JsonDict = {}
    if type_code:
        out["type"] = _type_concept(type_code)
    out["system"] = system or facility_system(facility, kind)
    out["value"] = value
    return out


# ---------------------------------------------------------------- names, addresses, telecom

_NAME_USE = {
    "L": "official",
    "D": "usual",
    "A": "usual",
    "M": "maiden",
    "N": "nickname",
    "S": "anonymous",
    "T": "temp",
    "B": "old",
}


def _has_cjk(text: str) -> bool:
    return any("\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in text)


def name_display(family: str, given: list[str], prefix: str = "", suffix: str = "") -> str:
    """A display string: CJK names family-first without spaces, others given-first."""
    if _has_cjk(family + "".join(given)):
        return family + "".join(given)
    return " ".join(p for p in (prefix, *given, family, suffix) if p)


def human_name(rep: Rep) -> JsonDict | None:
    """XPN -> HumanName, or ``None`` when no name part was sent."""
    family, first, middle, suffix1, prefix, degree, use_code = comps(rep, 7)
    given = [g for g in (first, *middle.split(" ")) if g]
    suffix = [s for s in (suffix1, degree) if s]
    if not family and not given:
        return None
    out: JsonDict = {}
    use = _NAME_USE.get(use_code.upper())
    if use:
        out["use"] = use
    if family:
        out["family"] = family
    if given:
        out["given"] = given
    if prefix:
        out["prefix"] = [prefix]
    if suffix:
        out["suffix"] = suffix
    return out


_ADDRESS_USE = {"H": "home", "P": "home", "B": "work", "O": "work", "C": "temp", "BA": "old"}


def address(rep: Rep) -> JsonDict | None:
    """XAD -> Address, or ``None`` when empty."""
    out: JsonDict = {}
    atype = comp(rep, 7).upper()
    if atype in _ADDRESS_USE:
        out["use"] = _ADDRESS_USE[atype]
    elif atype == "M":
        out["type"] = "postal"
    lines = [p for p in (comp(rep, 1), comp(rep, 2)) if p]
    if lines:
        out["line"] = lines
    for key, index in (("city", 3), ("district", 9), ("state", 4), ("postalCode", 5)):
        value = comp(rep, index)
        if value:
            out[key] = value
    country = comp(rep, 6)
    if country:
        out["country"] = country
    return out if len(out) > ("use" in out) + ("type" in out) else None


def contact_point(rep: Rep) -> JsonDict | None:
    """XTN -> ContactPoint, or ``None`` when it carries no number or address."""
    use_code = comp(rep, 2).upper()
    equipment = comp(rep, 3).upper()
    email = comp(rep, 4)
    formatted = comp(rep, 1)
    if equipment in ("INTERNET", "X.400") or use_code == "NET" or email:
        value = email or formatted
        system = "email"
    else:
        system = {"FX": "fax", "BP": "pager"}.get(equipment, "phone")
        value = comp(rep, 12) or formatted
        if not value:
            parts = [comp(rep, 5), comp(rep, 6), comp(rep, 7)]
            value = " ".join(p for p in parts if p)
            if value and parts[0]:
                value = "+" + value.lstrip("+")
            if value and comp(rep, 8):
                value += f" ext. {comp(rep, 8)}"
    if not value:
        return None
    out: JsonDict = {"system": system, "value": value}
    if equipment == "CP":
        out["use"] = "mobile"
    elif use_code in ("PRN", "ORN", "VHN"):
        out["use"] = "home"
    elif use_code == "WPN":
        out["use"] = "work"
    return out


def xcn_reference(rep: Rep | None, *, facility: str, systems: Mapping[str, str]) -> JsonDict | None:
    """XCN (or CNN) -> a logical Reference with identifier and display, or ``None``."""
    if rep is None:
        return None
    out: JsonDict = {}
    value, family, given1, given2, suffix, prefix = comps(rep, 6)
    if value:
        system = authority_system(*_hd(rep, 9), systems)
        out["identifier"] = {
            "system": system or facility_system(facility, "practitioner"),
            "value": value,
        }
    given = [g for g in (given1, given2) if g]
    display = name_display(family, given, prefix, suffix)
    if display:
        out["display"] = display
    return out or None


# ---------------------------------------------------------------- codes

#: HL7 table 0396 coding system names -> FHIR system URIs.
CODING_SYSTEMS: dict[str, str] = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "UCUM": UCUM_SYSTEM,
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    # ISO 639 language codes are BCP 47 tags, the system FHIR binds languages to.
    "ISO639": "urn:ietf:bcp:47",
}


def coding_system(name: str, *, facility: str, aliases: Mapping[str, str]) -> str:
    """FHIR system URI for a CWE coding system name (table 0396, dictionary aliases,
    ``HL7nnnn`` tables); local and unnamed systems are scoped to the sending facility."""
    if name in aliases:
        return aliases[name]
    upper = name.upper()
    if upper in CODING_SYSTEMS:
        return CODING_SYSTEMS[upper]
    if upper.startswith("HL7") and upper[3:].isdigit():
        return f"http://terminology.hl7.org/CodeSystem/v2-{upper[3:]}"
    return facility_system(facility, f"cs:{name or 'local'}")


def cwe_codings(rep: Rep | None, *, facility: str, aliases: Mapping[str, str]) -> list[JsonDict]:
    """CWE/CE -> its codings (primary, then alternate), each as sent."""
    code, display, system, alt_code, alt_display, alt_system, version, alt_version = comps(rep, 8)
    out: list[JsonDict] = []
    if code:
        out.append(_coding(code, display, system, version, facility, aliases))
    if alt_code:
        out.append(_coding(alt_code, alt_display, alt_system, alt_version, facility, aliases))
    return out


def _coding(
    code: str, display: str, system: str, version: str, facility: str, aliases: Mapping[str, str]
) -> JsonDict:
    coding: JsonDict = {
        "system": coding_system(system, facility=facility, aliases=aliases),
        "code": code,
    }
    if version:
        coding["version"] = version
    if display:
        coding["display"] = display
    return coding


# ---------------------------------------------------------------- numbers and quantities

#: Unit strings as laboratories send them -> UCUM codes.
UCUM: dict[str, str] = {
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "μmol/l": "umol/L",
    "µmol/l": "umol/L",
    "nmol/l": "nmol/L",
    "pmol/l": "pmol/L",
    "mol/l": "mol/L",
    "g/l": "g/L",
    "g/dl": "g/dL",
    "mg/dl": "mg/dL",
    "mg/l": "mg/L",
    "ug/l": "ug/L",
    "ng/ml": "ng/mL",
    "pg/ml": "pg/mL",
    "ug/ml": "ug/mL",
    "u/l": "U/L",
    "iu/l": "[IU]/L",
    "miu/ml": "m[IU]/mL",
    "uiu/ml": "u[IU]/mL",
    "meq/l": "meq/L",
    "%": "%",
    "fl": "fL",
    "pg": "pg",
    "10*9/l": "10*9/L",
    "10^9/l": "10*9/L",
    "x10^9/l": "10*9/L",
    "×10^9/l": "10*9/L",
    "10*12/l": "10*12/L",
    "10^12/l": "10*12/L",
    "x10^12/l": "10*12/L",
    "×10^12/l": "10*12/L",
    "mm/h": "mm/h",
    "mm/hr": "mm/h",
    "s": "s",
    "sec": "s",
    "min": "min",
    "ml/min": "mL/min",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "mmhg": "mm[Hg]",
    "kg": "kg",
    "g": "g",
    "cm": "cm",
    "mm": "mm",
    "/ul": "/uL",
    "cells/ul": "/uL",
    "/hpf": "/[HPF]",
    "ratio": "{ratio}",
    "1": "1",
}


def ucum(unit: str) -> str | None:
    """The UCUM code for a unit string as sent, when it is in the table."""
    return UCUM.get(unit.strip().lower())


def decimal(value: str) -> int | float:
    """HL7 NM -> a JSON number. Raises MessageContentError (102) if not numeric."""
    whole, dot, frac = value.partition(".")
    if value.isascii() and whole.isdigit() and (not dot or frac.isdigit()):
        return float(value) if dot else int(value)  # the usual case, without the regex
    match = _NM.match(value)
    if match is None or not (match.group(2) or match.group(3)):
        raise MessageContentError("not a valid numeric (NM) value", hl7_code="102")
    sign, digits, fraction = match.groups()
    number = (sign or "") + (digits or "0") + (f".{fraction}" if fraction else "")
    return float(number) if fraction else int(number)


def quantity(value: str, unit_rep: Rep | None) -> JsonDict:
    """NM value plus CWE unit (OBX-6) -> Quantity; UCUM system and code where known.

    Raises MessageContentError (102) for a non-numeric value.
    """
    out: JsonDict = {"value": decimal(value)}
    unit, text, unit_system = comps(unit_rep, 3)
    if unit:
        text, code = _unit(unit, text, unit_system)
        out["unit"] = text
        if code:
            out["system"] = UCUM_SYSTEM
            out["code"] = code
    return out


@lru_cache(maxsize=1024)
def _unit(unit: str, text: str, unit_system: str) -> tuple[str, str | None]:
    """CWE unit (identifier, text, coding system) -> (unit text, UCUM code or ``None``)."""
    text = text or unit
    if unit_system.upper() == "UCUM":
        return text, unit
    return text, ucum(unit) or ucum(text)


_COMPARATORS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}


def sn_value(rep: Rep, unit_rep: Rep | None) -> tuple[str, Any]:
    """SN -> (``value[x]`` key, value): Quantity with comparator, Range, Ratio or string.

    Raises MessageContentError (102) for non-numeric parts.
    """
    comparator, num1, sep, num2 = comps(rep, 4)
    if not num1 and not num2:
        raise MessageContentError("structured numeric (SN) without a number", hl7_code="102")
    if sep in ("-", "") and num2 and not comparator:
        low, high = quantity(num1, unit_rep), quantity(num2, unit_rep)
        return "valueRange", {"low": low, "high": high}
    if sep in (":", "/") and num2:
        return "valueRatio", {
            "numerator": {"value": decimal(num1)},
            "denominator": {"value": decimal(num2)},
        }
    if sep or num2:
        return "valueString", "".join((comparator, num1, sep, num2))
    q = quantity(num1, unit_rep)
    if comparator in _COMPARATORS:
        q = {"value": q["value"], "comparator": _COMPARATORS[comparator], **q}
    elif comparator not in ("", "="):
        return "valueString", comparator + num1
    return "valueQuantity", q


_RANGE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(?:-|~|－|～|—)\s*(-?\d+(?:\.\d+)?)\s*\Z")
_BOUND = re.compile(r"\s*(<=|>=|<|>|≤|≥)\s*(-?\d+(?:\.\d+)?)\s*\Z")


def reference_range(text: str, unit_rep: Rep | None) -> JsonDict | None:
    """OBX-7 -> referenceRange element: low/high where it parses, else its text."""
    if not text.strip():
        return None
    match = _RANGE.match(text)
    if match:
        return {
            "low": quantity(match.group(1), unit_rep),
            "high": quantity(match.group(2), unit_rep),
        }
    match = _BOUND.match(text)
    if match:
        key = "high" if match.group(1) in ("<", "<=", "≤") else "low"
        return {key: quantity(match.group(2), unit_rep), "text": text.strip()}
    return {"text": text.strip()}


# ---------------------------------------------------------------- result flags and status

_INTERPRETATION_CODES = {
    "<": "Below absolute low-off instrument scale",
    ">": "Above absolute high-off instrument scale",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "B": "Better",
    "D": "Significant change down",
    "DET": "Detected",
    "H": "High",
    "HH": "Critical high",
    "HU": "Significantly high",
    "I": "Intermediate",
    "IND": "Indeterminate",
    "L": "Low",
    "LL": "Critical low",
    "LU": "Significantly low",
    "MS": "moderately susceptible",
    "N": "Normal",
    "NEG": "Negative",
    "ND": "Not detected",
    "NR": "Non-reactive",
    "POS": "Positive",
    "R": "Resistant",
    "RR": "Reactive",
    "S": "Susceptible",
    "U": "Significant change up",
    "VS": "very susceptible",
    "W": "Worse",
}
_INTERPRETATION_ALIASES = {"H>": "HH", "L<": "LL", "HU": "HU", "LU": "LU"}


def interpretation(code: str) -> JsonDict:
    """HL7 table 0078 abnormal flag -> CodeableConcept in v3 ObservationInterpretation
    (codes outside that system are kept with the v2-0078 system)."""
    key = _INTERPRETATION_ALIASES.get(code.upper(), code.upper())
    if key in _INTERPRETATION_CODES:
        return {
            "coding": [
                {
                    "system": INTERPRETATION_SYSTEM,
                    "code": key,
                    "display": _INTERPRETATION_CODES[key],
                }
            ]
        }
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0078", "code": code}]}


_OBSERVATION_STATUS = {
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "W": "entered-in-error",
    "X": "cancelled",
}


def observation_status(code: str) -> str | None:
    """HL7 table 0085 result status -> Observation.status (``None`` if not in the table)."""
    if not code:
        return "unknown"
    return _OBSERVATION_STATUS.get(code.upper())
