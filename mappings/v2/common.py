"""Shared pieces of the HL7 v2 -> FHIR converters: options, result, the per-message
context (stable ids, locations on errors, code translation) and the segments every family
uses (MSH -> Organization, PID -> Patient, PV1 -> Encounter, NTE -> Annotation).

Raises :class:`mappings.errors.MessageContentError` for missing patient identifiers (101),
malformed values (102) and, under the ``strict_codes`` policy, unmapped local codes (103);
every error carries the segment, occurrence and field where it was found.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

from mappings.errors import ConversionWarning, MappingError, MessageContentError
from mappings.terminology import Terminology
from mappings.v2 import datatypes as dt
from mappings.v2.parse import ParsedMessage, Rep, Segment, comp, comps

__all__ = [
    "Context",
    "ConversionOptions",
    "ConversionResult",
    "JsonDict",
    "UnmappedCode",
    "stable_id",
]

JsonDict = dict[str, Any]
T = TypeVar("T")

V2_TABLE = "http://terminology.hl7.org/CodeSystem/v2-{}"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_V3_MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
#: HL7 table 0002 -> the coding FHIR R4's marital-status value set has for the same meaning,
#: used instead of the v2 coding (the original message is kept beside the resources). Codes
#: with no equivalent there (A separated, C common law, G living together, O other,
#: T unreported) keep their v2 coding.
_MARITAL_V2_TO_V3: dict[str, tuple[str, str]] = {
    "M": (_V3_MARITAL, "M"),
    "S": (_V3_MARITAL, "S"),
    "D": (_V3_MARITAL, "D"),
    "W": (_V3_MARITAL, "W"),
    "E": (_V3_MARITAL, "L"),
    "N": (_V3_MARITAL, "A"),
    "I": (_V3_MARITAL, "I"),
    "P": (_V3_MARITAL, "T"),
    "R": (_V3_MARITAL, "T"),
    "B": (_V3_MARITAL, "U"),
    "U": ("http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "UNK"),
}

_SHA256_BLOCK = 64
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))

_CLASS: dict[str, tuple[str, str]] = {
    "E": ("EMER", "emergency"),
    "I": ("IMP", "inpatient encounter"),
    "B": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "R": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"),
}


@dataclass(frozen=True)
class ConversionOptions:
    """What a conversion needs besides the message (no settings globals).

    ``default_tz``: IANA zone applied to times sent without a UTC offset.
    ``master_id_system``: system URI (or assigning-authority namespace) of the alliance's
    master patient identifier. ``institution``: this gateway's institution (part of every
    resource id, and the facility of DICOM input). ``imaging_endpoint_base``: DICOMweb base
    URL for ImagingStudy endpoints. ``authority_systems``: assigning authority namespace or
    universal id -> system URI. ``strict_codes``: reject local clinical codes the dictionary
    cannot map (103) instead of keeping them as sent. ``id_secret``: when set, resource ids
    are HMAC-SHA256 instead of SHA-256 of their source identifiers. ``strict_types``: reject
    (102) a value that does not fit its type (a non-numeric OBX-5 under NM) instead of keeping
    it as text with a warning; :func:`mappings.v2.convert.convert` can override it per
    message (the sender's profile).

    ``memo`` (not an argument, not copied by ``dataclasses.replace``) memoises conversions
    that depend only on these options and on values that recur from message to message
    (coded concepts, reference ranges); see :meth:`Context.memoised`.
    """

    default_tz: str = "Asia/Shanghai"
    master_id_system: str | None = None
    institution: str = "local"
    imaging_endpoint_base: str | None = None
    terminology: Terminology = field(default_factory=Terminology.empty)
    authority_systems: Mapping[str, str] = field(default_factory=dict)
    strict_codes: bool = False
    id_secret: bytes | None = None
    strict_types: bool = False
    memo: dict[tuple[str, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for the conversion workers) as its arguments, without the memo: the same
        for the compiled build of this module (mypyc) as for the pure one."""
        return (
            ConversionOptions,
            (
                self.default_tz,
                self.master_id_system,
                self.institution,
                self.imaging_endpoint_base,
                self.terminology,
                self.authority_systems,
                self.strict_codes,
                self.id_secret,
                self.strict_types,
            ),
        )


#: Entries kept in ``ConversionOptions.memo`` before it is emptied and refilled.
MEMO_SIZE = 4096


class UnmappedCode(NamedTuple):
    """A local clinical code the unified dictionary has no mapping for, and where it was sent
    (segment name, occurrence, field): what the sender's ``unmapped_codes`` policy acts on."""

    system: str
    code: str
    segment: str
    segment_index: int
    field: int


@dataclass
class ConversionResult:
    """Resources produced from one message, plus what the pipeline needs to pseudonymise."""

    resources: list[JsonDict]
    patient_identifiers: list[tuple[str, str]]
    master_identifier: tuple[str, str] | None
    message_type: str
    #: Values kept although they did not fit (ERR of severity W in the ACK).
    warnings: list[ConversionWarning] = field(default_factory=list)
    #: (system, value) identifiers of a patient this message merges into the patient (A40).
    prior_identifiers: list[tuple[str, str]] = field(default_factory=list)
    #: Local clinical codes the dictionary did not map, kept as sent (not ``strict_codes``).
    unmapped: list[UnmappedCode] = field(default_factory=list)


@lru_cache(maxsize=16)
def _hmac_pads(secret: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after the inner and outer HMAC key blocks of ``secret`` (RFC 2104).

    Copying them is about three times faster than ``hmac.digest``, which sets up the
    OpenSSL digest again on every call.
    """
    key = hashlib.sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
    key = key.ljust(_SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(key.translate(_IPAD))
    outer = hashlib.sha256(key.translate(_OPAD))
    return inner, outer


def stable_id(options: ConversionOptions, resource_type: str, *parts: str) -> str:
    """A FHIR id (32 hex digits) derived from the institution and source identifiers.

    With ``options.id_secret`` it is HMAC-SHA256 (same value as ``hmac.digest``).
    """
    data = "\x1f".join((options.institution, resource_type, *parts)).encode()
    if options.id_secret is not None:
        inner_pad, outer_pad = _hmac_pads(options.id_secret)
        inner = inner_pad.copy()
        inner.update(data)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:32]
    return hashlib.sha256(data).hexdigest()[:32]


def patient_key(
    identifiers: list[JsonDict], master: tuple[str, str] | None
) -> tuple[str, str] | None:
    """The identifier a Patient id derives from: first MR, else first, else the master."""
    for ident in identifiers:
        codes = [c.get("code") for c in ident.get("type", {}).get("coding", [])]
        if "MR" in codes:
            return ident["system"], ident["value"]
    if identifiers:
        return identifiers[0]["system"], identifiers[0]["value"]
    return master


class Context:
    """State of one conversion: message, options, produced resources and references."""

    def __init__(
        self,
        msg: ParsedMessage,
        options: ConversionOptions,
        strict_types: bool | None = None,
        strict_codes: bool | None = None,
    ) -> None:
        self.msg = msg
        self.options = options
        self.strict_types = options.strict_types if strict_types is None else strict_types
        self.strict_codes = options.strict_codes if strict_codes is None else strict_codes
        self.warnings: list[ConversionWarning] = []
        self.unmapped: list[UnmappedCode] = []
        self.prior_identifiers: list[tuple[str, str]] = []
        self.tz = options.default_tz
        self.term = options.terminology
        self.memo = options.memo
        self.systems = options.authority_systems
        self.facility = msg.sending_facility_id or msg.msh.text(3)
        if not self.facility:
            raise MessageContentError(
                "sending facility (MSH-4) is empty", segment="MSH", segment_index=1, field=4
            )
        self.resources: list[JsonDict] = []
        self._positions: dict[str, int] = {}  # reference -> index in resources
        self.patient_ref: str | None = None
        self.encounter_ref: str | None = None
        self.organization_ref: str | None = None
        self.patient_identifiers: list[tuple[str, str]] = []
        self.master: tuple[str, str] | None = None

    # ------------------------------------------------------------ helpers

    def id(self, resource_type: str, *parts: str) -> str:
        """Stable id of a resource of this facility."""
        return stable_id(self.options, resource_type, self.facility, *parts)

    def add(self, resource: JsonDict) -> str:
        """Append a resource (replacing one with the same id); return its reference."""
        ref = f"{resource['resourceType']}/{resource['id']}"
        position = self._positions.get(ref)
        if position is None:
            self._positions[ref] = len(self.resources)
            self.resources.append(resource)
        else:
            self.resources[position] = resource
        return ref

    @staticmethod
    def at(seg: Segment, n: int, fn: Callable[[], T]) -> T:
        """Run ``fn``, locating any MappingError it raises at ``seg``-``n``."""
        try:
            return fn()
        except MappingError as exc:
            raise exc.locate(seg.name, seg.index, n) from exc.__cause__

    def datetime(self, seg: Segment, n: int, component: int = 1) -> str | None:
        """Field ``n`` (DTM/TS, component) -> FHIR dateTime, or ``None`` when absent."""
        value = seg.text(n, component)
        if not value:
            return None
        try:  # self.at inlined: this is on the hot path
            return dt.to_datetime(value, default_tz=self.tz)
        except MappingError as exc:
            raise exc.locate(seg.name, seg.index, n) from exc.__cause__

    def instant(self, seg: Segment, n: int, component: int = 1) -> str | None:
        """Field ``n`` -> FHIR instant, or ``None`` when absent or without a time."""
        value = seg.text(n, component)
        if not value:
            return None
        try:
            return dt.to_instant(value, default_tz=self.tz)
        except MappingError as exc:
            raise exc.locate(seg.name, seg.index, n) from exc.__cause__

    def date(self, seg: Segment, n: int) -> str | None:
        """Field ``n`` -> FHIR date, or ``None`` when absent."""
        value = seg.text(n)
        if not value:
            return None
        try:
            return dt.to_date(value)
        except MappingError as exc:
            raise exc.locate(seg.name, seg.index, n) from exc.__cause__

    def concept(
        self, seg: Segment, n: int, rep: Rep | None = None, *, clinical: bool = False
    ) -> JsonDict | None:
        """CWE/CE field -> CodeableConcept with the original coding first, then the
        dictionary's standard codings; ``clinical`` codes obey the ``strict_codes`` policy
        (otherwise an unmapped one is noted in ``unmapped``, kept as sent).

        Raises MessageContentError (103) under ``strict_codes`` for an unmapped local code.
        """
        if rep is None:
            rep = seg.rep(n)
        if rep is None:
            return None
        # Everything but the strict_codes check depends only on CWE.1-9 and the facility.
        key = ("CWE", self.facility, *comps(rep, 9))
        found = self.memo.get(key)
        if found is None:
            found = self.memoised(key, self._concept_parts(rep))
        codings, mapped, text = found
        if codings and clinical and not mapped:
            standard = set(dt.CODING_SYSTEMS.values())
            if not any(c["system"] in standard for c in codings):
                first = codings[0]
                if self.strict_codes:
                    # Codes are public facts (never patient data): the ERR names it.
                    raise MessageContentError(
                        f"local code {first['code']!r} of system {first['system']} has no "
                        "mapping in the unified dictionary",
                        hl7_code="103",
                        segment=seg.name,
                        segment_index=seg.index,
                        field=n,
                    )
                self.unmapped.append(
                    UnmappedCode(str(first["system"]), str(first["code"]), seg.name, seg.index, n)
                )
        out: JsonDict = {}
        if codings:
            out["coding"] = [dict(c) for c in codings]  # copies: the memo is shared
        if text:
            out["text"] = text
        return out or None

    def _concept_parts(self, rep: Rep) -> tuple[tuple[JsonDict, ...], bool, str]:
        """(codings as sent then standard ones, whether any standard one was added, text).

        The dictionary's rules (:meth:`Terminology.mapped`, keyed by the sending facility):
        equivalent/equal codings added silently, wider/narrower/relatedto with their
        equivalence in an extension, inexact/unmatched/disjoint never."""
        codings = dt.cwe_codings(rep, facility=self.facility, aliases=self.term.aliases)
        extra: list[JsonDict] = []
        for coding in codings:
            for mapped in self.term.translate(coding["system"], coding["code"], self.facility):
                if mapped not in codings and mapped not in extra:
                    extra.append(mapped)
            if "display" not in coding:
                display = self.term.display(coding["system"], coding["code"])
                if display:
                    coding["display"] = display
        return tuple(codings + extra), bool(extra), comp(rep, 9) or comp(rep, 2)

    def memoised(self, key: tuple[str, ...], value: T) -> T:
        """Store ``value`` in the options' memo under ``key`` (a tuple of strings starting
        with the kind of value) and return it. Memoised values are shared between messages:
        callers copy them before they end up in a resource.
        """
        memo = self.memo
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[key] = value
        return value

    def table_concept(self, seg: Segment, n: int, table: str) -> JsonDict | None:
        """An IS/ID field of an HL7 table -> CodeableConcept in that v2 table's system."""
        code = seg.text(n)
        if not code:
            return None
        return {"coding": [{"system": V2_TABLE.format(table), "code": code}]}

    def practitioner(self, seg: Segment, n: int) -> JsonDict | None:
        """XCN field -> logical Reference (identifier + display)."""
        return dt.xcn_reference(seg.rep(n), facility=self.facility, systems=self.systems)

    def notes(self, segments: list[Segment]) -> list[JsonDict]:
        """NTE segments -> Annotations (NTE-3 repetitions joined by line breaks)."""
        out = []
        for nte in segments:
            text = "\n".join(comp(r, 1) for r in nte.reps(3))
            if text:
                out.append({"text": text})
        return out

    # ------------------------------------------------------------ common segments

    def organization(self) -> str:
        """MSH-4 -> Organization of the sending facility; returns its reference."""
        msh = self.msg.msh
        oid = msh.text(4, 2)
        ident: JsonDict = (
            {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{oid}"}
            if oid and msh.text(4, 3).upper() in ("ISO", "")
            else {"system": "urn:alliance:facility", "value": self.facility}
        )
        org: JsonDict = {
            "resourceType": "Organization",
            "id": self.id("Organization"),
            "identifier": [ident],
            "active": True,
            "name": msh.text(4, 1) or self.facility,
        }
        self.organization_ref = self.add(org)
        return self.organization_ref

    def patient(self, pid: Segment | None) -> str:
        """PID -> Patient (all identifiers, names, telecom, address ...); returns its reference.

        Raises MessageContentError: no PID or no patient identifier (101), bad values (102).
        """
        if pid is None:
            raise MessageContentError("PID segment is missing", segment="PID")
        identifiers = self.identifiers(pid, (3, 2, 4))
        master = self._master(identifiers)
        self.patient_identifiers += [(i["system"], i["value"]) for i in identifiers]
        if self.master is None:
            self.master = master
        key = patient_key(identifiers, master)
        assert key is not None
        patient: JsonDict = {
            "resourceType": "Patient",
            "id": stable_id(self.options, "Patient", *key),
            "identifier": identifiers,
        }
        names = [h for n in (5, 9) for r in pid.reps(n) if (h := dt.human_name(r))]
        if names:
            patient["name"] = names
        telecom = [c for n in (13, 14) for r in pid.reps(n) if (c := dt.contact_point(r))]
        if telecom:
            patient["telecom"] = telecom
        gender = pid.text(8).upper()
        if gender:
            patient["gender"] = {"M": "male", "F": "female", "O": "other", "A": "other"}.get(
                gender, "unknown"
            )
        birth = self.date(pid, 7)
        if birth:
            patient["birthDate"] = birth
            if len(pid.text(7)) > 8:
                birth_time = self.datetime(pid, 7)
                patient["_birthDate"] = {
                    "extension": [
                        {
                            "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                            "valueDateTime": birth_time,
                        }
                    ]
                }
        death = self.datetime(pid, 29)
        if death:
            patient["deceasedDateTime"] = death
        elif pid.text(30).upper() in ("Y", "N"):
            patient["deceasedBoolean"] = pid.text(30).upper() == "Y"
        addresses = [a for r in pid.reps(11) if (a := dt.address(r))]
        if addresses:
            patient["address"] = addresses
        marital = self.table_concept(pid, 16, "0002")
        if marital:
            v3 = _MARITAL_V2_TO_V3.get(marital["coding"][0]["code"].upper())
            if v3:
                marital["coding"] = [{"system": v3[0], "code": v3[1]}]
            patient["maritalStatus"] = marital
        language = self.concept(pid, 15)
        if language:
            patient["communication"] = [{"language": language}]
        contacts = self._contacts()
        if contacts:
            patient["contact"] = contacts
        if self.organization_ref:
            patient["managingOrganization"] = {"reference": self.organization_ref}
        self.patient_ref = self.add(patient)
        return self.patient_ref

    def identifiers(self, seg: Segment, fields: tuple[int, ...]) -> list[JsonDict]:
        """The distinct identifiers (CX) in ``fields`` of ``seg``, in order. Raises
        MessageContentError: none at all (101 at the first field), bad values (102)."""
        identifiers: list[JsonDict] = []
        for n in fields:
            for rep in seg.reps(n):
                try:
                    ident = dt.identifier(rep, facility=self.facility, systems=self.systems)
                except MappingError as exc:
                    raise exc.locate(seg.name, seg.index, n) from exc.__cause__
                if ident is not None and ident not in identifiers:
                    identifiers.append(ident)
        if not identifiers:
            raise MessageContentError(
                f"no patient identifier in {seg.name}-{fields[0]}",
                segment=seg.name,
                segment_index=seg.index,
                field=fields[0],
            )
        return identifiers

    def _master(self, identifiers: list[JsonDict]) -> tuple[str, str] | None:
        """The first of ``identifiers`` in the master identifier system (marked ``official``),
        or None."""
        master_system = self.options.master_id_system
        if not master_system:
            return None
        for ident in identifiers:
            if (
                ident["system"] == master_system
                or ident.get("assigner", {}).get("display") == master_system
            ):
                ident["use"] = "official"
                return ident["system"], ident["value"]
        return None

    def prior_patient(self, mrg: Segment) -> str:
        """MRG-1 (the prior patient's identifiers) -> the id that patient's Patient has (as
        computed for any PID); the identifiers go to ``prior_identifiers``. Raises
        MessageContentError: no identifier in MRG-1 (101), bad values (102)."""
        identifiers = self.identifiers(mrg, (1,))
        key = patient_key(identifiers, self._master(identifiers))
        assert key is not None
        self.prior_identifiers = [(i["system"], i["value"]) for i in identifiers]
        return stable_id(self.options, "Patient", *key)

    def _contacts(self) -> list[JsonDict]:
        out: list[JsonDict] = []
        for nk1 in self.msg.all("NK1"):
            contact: JsonDict = {}
            relationship = self.concept(nk1, 3)
            if relationship:
                contact["relationship"] = [relationship]
            name = next((h for r in nk1.reps(2) if (h := dt.human_name(r))), None)
            if name:
                contact["name"] = name
            telecom = [c for n in (5, 6) for r in nk1.reps(n) if (c := dt.contact_point(r))]
            if telecom:
                contact["telecom"] = telecom
            addr = next((a for r in nk1.reps(4) if (a := dt.address(r))), None)
            if addr:
                contact["address"] = addr
            if contact:
                out.append(contact)
        return out

    def encounter(self, pv1: Segment | None, *, status: str | None = None) -> str | None:
        """PV1 -> Encounter (none for a missing PV1 or patient class ``N``); its reference.

        ``status`` overrides the status derived from admit/discharge times.
        """
        if pv1 is None or pv1.text(2).upper() == "N":
            return None
        assert self.patient_ref is not None
        visit = pv1.rep(19)
        visit_id = (
            self.at(
                pv1,
                19,
                lambda: dt.identifier(
                    visit, facility=self.facility, systems=self.systems, kind="visit"
                ),
            )
            if visit
            else None
        )
        admit = self.datetime(pv1, 44)
        discharge = self.datetime(pv1, 45)
        if visit_id is not None:
            eid = self.id("Encounter", visit_id["system"], visit_id["value"])
        elif admit:
            eid = self.id("Encounter", self.patient_ref, pv1.text(44))
        else:
            eid = self.id("Encounter", self.patient_ref, "control", self.msg.control_id)
        code, display = _CLASS.get(pv1.text(2).upper(), ("", ""))
        klass: JsonDict = (
            {"system": ACT_CODE, "code": code, "display": display}
            if code
            else {
                "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
                "code": "UNK",
                "display": "unknown",
            }
        )
        if status is None:
            status = "finished" if discharge else ("in-progress" if admit else "unknown")
        enc: JsonDict = {"resourceType": "Encounter", "id": eid}
        if visit_id is not None:
            enc["identifier"] = [visit_id]
        enc["status"] = status
        enc["class"] = klass
        service = self.table_concept(pv1, 10, "0069")
        if service:
            enc["serviceType"] = service
        enc["subject"] = {"reference": self.patient_ref}
        participants = []
        for n, code_ in ((7, "ATND"), (8, "REF"), (9, "CON"), (17, "ADM")):
            for rep in pv1.reps(n):
                individual = dt.xcn_reference(rep, facility=self.facility, systems=self.systems)
                if individual:
                    participants.append(
                        {
                            "type": [
                                {
                                    "coding": [
                                        {
                                            "system": "http://terminology.hl7.org/CodeSystem/"
                                            "v3-ParticipationType",
                                            "code": code_,
                                        }
                                    ]
                                }
                            ],
                            "individual": individual,
                        }
                    )
        if participants:
            enc["participant"] = participants
        if admit or discharge:
            period: JsonDict = {}
            if admit:
                period["start"] = admit
            if discharge:
                period["end"] = discharge
            enc["period"] = period
        hospitalization: JsonDict = {}
        admit_source = self.table_concept(pv1, 14, "0023")
        if admit_source:
            hospitalization["admitSource"] = admit_source
        disposition = self.table_concept(pv1, 36, "0112")
        if disposition:
            hospitalization["dischargeDisposition"] = disposition
        if hospitalization:
            enc["hospitalization"] = hospitalization
        location = pv1.rep(3)
        if location:
            parts = [comp(location, i) for i in (4, 1, 2, 3)]
            display = " / ".join(p for p in parts if p)
            if display:
                enc["location"] = [{"location": {"display": display}}]
        if self.organization_ref:
            enc["serviceProvider"] = {"reference": self.organization_ref}
        self.encounter_ref = self.add(enc)
        return self.encounter_ref

    def subject(self, resource: JsonDict, *, encounter_key: str = "encounter") -> None:
        """Set ``subject`` (and the encounter reference, if any) on a resource."""
        assert self.patient_ref is not None
        resource["subject"] = {"reference": self.patient_ref}
        if self.encounter_ref and encounter_key:
            resource[encounter_key] = {"reference": self.encounter_ref}

    def result(self) -> ConversionResult:
        """The ConversionResult of this context."""
        return ConversionResult(
            resources=self.resources,
            patient_identifiers=self.patient_identifiers,
            master_identifier=self.master,
            message_type=self.msg.message_type,
            warnings=self.warnings,
            prior_identifiers=self.prior_identifiers,
            unmapped=self.unmapped,
        )


def group_after(
    msg: ParsedMessage, anchor: Segment, names: set[str], stop: set[str]
) -> list[Segment]:
    """Segments named ``names`` following ``anchor`` until one named in ``stop``."""
    out = []
    for seg in msg.segments[anchor.position :]:
        if seg.name in stop:
            break
        if seg.name in names:
            out.append(seg)
    return out
