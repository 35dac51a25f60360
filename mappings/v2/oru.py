"""ORU^R01 (laboratory and radiology results) -> DiagnosticReport per OBR, Observation per
OBX (NM, SN, ST, TX, FT, CE, CWE, DT, DTM, TM; UCUM units where known, reference ranges,
interpretation, status), Specimen per SPM and, for radiology, an ImagingStudy.

Radiology orders (OBR-24 a radiology section, a ZDS segment or an OBX carrying the DICOM
Study Instance UID) keep their report text in ``DiagnosticReport.presentedForm`` and the
impression in ``conclusion`` instead of one Observation per text line. Encapsulated data
(OBX-2 ``ED``, such as a PDF report) becomes a ``presentedForm`` attachment.

Raises :class:`mappings.errors.MessageContentError` for a missing OBR-4 (101), values that
do not fit OBX-2 (102) under ``strict_types`` (otherwise an NM, SN, DT, DTM, TS or TM value
that does not fit is kept as ``valueString`` with a note, and reported as a warning 102),
unknown result status under ``strict_codes`` (103), more than one patient in one message
(207).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from mappings.errors import ConversionWarning, MappingError, MessageContentError
from mappings.imaging import DICOM_MODALITIES, RADIOLOGY_SECTIONS, imaging_study
from mappings.v2 import datatypes as dt
from mappings.v2.common import Context, JsonDict, group_after
from mappings.v2.parse import Rep, Segment, comp, comps

__all__ = ["convert_oru", "report_status", "specimen"]

STUDY_UID_CODES = frozenset({"113014", "STUDYUID", "STUDY_INSTANCE_UID"})
_REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "P": "preliminary",
    "A": "partial",
    "R": "partial",
    "N": "partial",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
}
_CATEGORY_LAB = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "laboratory",
            "display": "Laboratory",
        }
    ]
}
_CATEGORY_IMAGING = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "imaging",
            "display": "Imaging",
        }
    ]
}
_ED_TYPES = {
    "PDF": "application/pdf",
    "HTML": "text/html",
    "XML": "application/xml",
    "RTF": "application/rtf",
    "JPEG": "image/jpeg",
    "PNG": "image/png",
}


def report_status(code: str) -> str | None:
    """HL7 table 0123 result status -> DiagnosticReport.status (``None`` if unknown)."""
    if not code:
        return "unknown"
    return _REPORT_STATUS.get(code.upper())


def _text_of(rep: Rep, seg: Segment) -> str:
    enc = seg.enc
    return enc.component.join(enc.subcomponent.join(subs) for subs in rep).strip()


def _obx_code(obx: Segment) -> str:
    return obx.text(3, 1) or obx.text(3, 1, 2)


def _upper_code(obx: Segment, codes: dict[int, str]) -> str:
    """OBX-3 code in upper case, read once per OBX (``codes``: position -> code)."""
    code = codes.get(obx.position)
    if code is None:
        code = codes[obx.position] = _obx_code(obx).upper()
    return code


def ed_attachment(rep: Rep, *, where: str = "OBX-5") -> JsonDict:
    """ED -> Attachment (base64 data kept as sent after a check; other encodings encoded).

    Raises MessageContentError (102) for data that is not valid in its declared encoding.
    """
    subtype = comp(rep, 3).upper()
    encoding = comp(rep, 4).upper()
    data = comp(rep, 5)
    content_type = _ED_TYPES.get(subtype) or (
        "text/plain;charset=utf-8" if comp(rep, 2).upper() == "TEXT" else "application/octet-stream"
    )
    try:
        if encoding in ("BASE64", "B64"):
            raw = base64.b64decode(data, validate=True)
        elif encoding == "HEX":
            raw = bytes.fromhex(data)
        else:
            raw = data.encode("utf-8")
    except (ValueError, binascii.Error) as exc:
        raise MessageContentError(
            f"encapsulated data in {where} is not valid", hl7_code="102"
        ) from exc
    return {"contentType": content_type, "data": base64.b64encode(raw).decode("ascii")}


def observation_value(
    ctx: Context, obx: Segment, vtype: str | None = None
) -> tuple[str, Any] | None:
    """OBX-5 by OBX-2 -> (``value[x]`` key, value), or ``None`` when no value was sent.

    ``vtype`` is OBX-2 in upper case when the caller has already read it.
    Raises MessageContentError (102) for a value that does not fit its type.
    """
    reps = obx.reps(5)
    if not reps:
        return None
    if vtype is None:
        vtype = obx.text(2).upper()
    return _located_value(ctx, obx, vtype, reps, obx.rep(6))


#: Value types whose unreadable values are kept as text (with a warning) unless strict.
_KEPT_AS_TEXT = frozenset(("NM", "SN", "DT", "DTM", "TS", "TM"))


def _located_value(
    ctx: Context, obx: Segment, vtype: str, reps: list[Rep], unit: Rep | None
) -> tuple[str, Any] | None:
    """:func:`_typed_value`, locating its MappingError at OBX-5. A value that does not fit
    its type (102) is kept as ``valueString`` with a warning, unless ``ctx.strict_types``."""
    try:  # ctx.at inlined: this is on the hot path
        return _typed_value(ctx, obx, vtype, reps, unit)
    except MappingError as exc:
        exc.locate(obx.name, obx.index, 5)
        if exc.hl7_code == "102" and vtype in _KEPT_AS_TEXT and not ctx.strict_types:
            text = "\n".join(t for r in reps if (t := _text_of(r, obx)))
            if text:
                ctx.warnings.append(
                    ConversionWarning(
                        "102",
                        f"value does not fit its type {vtype}; kept as text",
                        exc.segment,
                        exc.segment_index,
                        exc.field,
                        exc.component,
                        exc.repetition,
                    )
                )
                return "valueString", text
        raise exc from exc.__cause__


def _typed_value(
    ctx: Context, obx: Segment, vtype: str, reps: list[Rep], unit: Rep | None
) -> tuple[str, Any] | None:
    """OBX-5 (``reps``, not empty) as OBX-2 ``vtype`` says, with OBX-6 ``unit``."""
    first = reps[0]
    if vtype == "NM":
        return "valueQuantity", dt.quantity(comp(first, 1), unit)
    if vtype == "SN":
        return dt.sn_value(first, unit)
    if vtype in ("CE", "CWE", "CNE", "CF"):
        concept = ctx.concept(obx, 5, rep=first)
        return ("valueCodeableConcept", concept) if concept else None
    if vtype in ("DT", "DTM", "TS"):
        return "valueDateTime", dt.to_datetime(comp(first, 1), default_tz=ctx.tz)
    if vtype == "TM":
        raw = comp(first, 1).split("+")[0].split("-")[0].split(".")[0]
        if not raw.isdigit() or len(raw) not in (2, 4, 6):
            raise MessageContentError("not a valid time (TM)", hl7_code="102")
        raw = raw.ljust(6, "0")
        return "valueTime", f"{raw[:2]}:{raw[2:4]}:{raw[4:6]}"
    text = "\n".join(t for r in reps if (t := _text_of(r, obx)))
    return ("valueString", text) if text else None


def specimen(ctx: Context, spm: Segment) -> str:
    """SPM -> Specimen; returns its reference."""
    ids = spm.rep(2)
    placer = [[s] for s in ids[0]] if ids else None
    filler = [[s] for s in ids[1]] if ids and len(ids) > 1 else None
    identifiers = [
        i
        for i in (
            dt.ei_identifier(filler, facility=ctx.facility, systems=ctx.systems, kind="specimen"),
            dt.ei_identifier(placer, facility=ctx.facility, systems=ctx.systems, kind="specimen"),
        )
        if i
    ]
    key = (
        (identifiers[0]["system"], identifiers[0]["value"])
        if identifiers
        else (ctx.patient_ref or "", ctx.msg.control_id, str(spm.index))
    )
    res: JsonDict = {"resourceType": "Specimen", "id": ctx.id("Specimen", *key)}
    if identifiers:
        res["identifier"] = identifiers
    kind = ctx.concept(spm, 4)
    if kind:
        res["type"] = kind
    res["subject"] = {"reference": ctx.patient_ref}
    received = ctx.instant(spm, 18)
    if received:
        res["receivedTime"] = received
    collection: JsonDict = {}
    collected = ctx.datetime(spm, 17, 1)
    collected_end = ctx.datetime(spm, 17, 2)
    if collected and collected_end:
        collection["collectedPeriod"] = {"start": collected, "end": collected_end}
    elif collected:
        collection["collectedDateTime"] = collected
    body_site = ctx.concept(spm, 8)
    if body_site:
        collection["bodySite"] = body_site
    if collection:
        res["collection"] = collection
    return ctx.add(res)


def _order_identifiers(ctx: Context, obr: Segment, orc: Segment | None) -> list[JsonDict]:
    out: list[JsonDict] = []
    for n_obr, n_orc, kind, code in (
        (3, 3, "filler-order", "FILL"),
        (2, 2, "placer-order", "PLAC"),
    ):
        rep = obr.rep(n_obr) or (orc.rep(n_orc) if orc is not None else None)
        ident = dt.ei_identifier(
            rep, facility=ctx.facility, systems=ctx.systems, kind=kind, type_code=code
        )
        if ident:
            out.append(ident)
    return out


def _is_radiology(obr: Segment, group: list[Segment], codes: dict[int, str]) -> bool:
    if obr.text(24).upper() in RADIOLOGY_SECTIONS:
        return True
    return any(
        s.name == "ZDS" or (s.name == "OBX" and _upper_code(s, codes) in STUDY_UID_CODES)
        for s in group
    )


def convert_oru(ctx: Context) -> None:
    """Convert an ORU^R01 message into ``ctx.resources``."""
    msg = ctx.msg
    pids = msg.all("PID")
    if len(pids) > 1:
        raise MessageContentError(
            "more than one patient in one message is not supported",
            hl7_code="207",
            segment="PID",
            segment_index=2,
        )
    ctx.organization()
    ctx.patient(pids[0] if pids else None)
    ctx.encounter(msg.first("PV1"))
    for obr in msg.all("OBR"):
        group = group_after(msg, obr, {"OBX", "NTE", "SPM", "ZDS"}, {"OBR", "ORC", "PID"})
        orc = None
        before = msg.segments[obr.position - 2] if obr.position >= 2 else None
        if before is not None and before.name == "ORC":
            orc = before
        _convert_order(ctx, obr, orc, group)


def _convert_order(ctx: Context, obr: Segment, orc: Segment | None, group: list[Segment]) -> None:
    obx_codes: dict[int, str] = {}  # OBX position -> OBX-3 code in upper case, read once
    radiology = _is_radiology(obr, group, obx_codes)
    identifiers = _order_identifiers(ctx, obr, orc)
    if identifiers:
        report_key: tuple[str, ...] = (identifiers[0]["system"], identifiers[0]["value"])
    else:
        report_key = (ctx.patient_ref or "", obr.text(4), obr.text(7), obr.text(1))
    code = ctx.concept(obr, 4, clinical=True)
    if code is None:
        raise MessageContentError(
            "required field universal service identifier is missing",
            segment="OBR",
            segment_index=obr.index,
            field=4,
        )
    status = report_status(obr.text(25))
    if status is None:
        if ctx.strict_codes:
            raise MessageContentError(
                "result status not in HL7 table 0123",
                hl7_code="103",
                segment="OBR",
                segment_index=obr.index,
                field=25,
            )
        status = "unknown"
    effective = ctx.datetime(obr, 7)
    effective_end = ctx.datetime(obr, 8)
    specimens = [specimen(ctx, s) for s in group if s.name == "SPM"]
    study_uid = ""
    for seg in group:
        if seg.name == "ZDS" and seg.text(1):
            study_uid = seg.text(1)
        elif seg.name == "OBX" and _upper_code(seg, obx_codes) in STUDY_UID_CODES and seg.text(5):
            study_uid = seg.text(5)
    results: list[str] = []
    text_sections: list[str] = []
    conclusion: list[str] = []
    forms: list[JsonDict] = []
    seen: dict[str, int] = {}
    current_obs: JsonDict | None = None
    for seg in group:
        if seg.name == "NTE":
            if current_obs is not None:
                notes = ctx.notes([seg])
                if notes:
                    current_obs.setdefault("note", []).extend(notes)
            continue
        if seg.name != "OBX":
            continue
        current_obs = None
        vtype = seg.text(2).upper()
        obx_code = obx_codes[seg.position]
        if obx_code in STUDY_UID_CODES:
            continue
        if vtype == "ED":
            for rep in seg.reps(5):
                forms.append(ctx.at(seg, 5, lambda rep=rep: ed_attachment(rep)))  # type: ignore[misc]
            continue
        if radiology and vtype in ("TX", "FT", "ST"):
            value = observation_value(ctx, seg, vtype)
            if value is not None:
                text_sections.append(value[1])
                if obx_code.endswith("IMP"):
                    conclusion.append(value[1])
            continue
        sub_id = seg.text(4)
        occurrence_key = f"{seg.raw(3)}|{sub_id}"
        seen[occurrence_key] = seen.get(occurrence_key, 0) + 1
        obs = _observation(
            ctx, seg, report_key, seen[occurrence_key], radiology, effective, vtype, sub_id
        )
        if specimens:
            obs["specimen"] = {"reference": specimens[0]}
        current_obs = obs
        results.append(ctx.add(obs))
    study_ref = None
    if study_uid:
        modality = obr.text(24).upper()
        study = imaging_study(
            options=ctx.options,
            study_uid=study_uid,
            status="available",
            patient_ref=ctx.patient_ref or "",
            accession=obr.text(18) or (identifiers[0]["value"] if identifiers else ""),
            accession_system=dt.facility_system(ctx.facility, "accession"),
            modalities=[modality] if modality in DICOM_MODALITIES else [],
            started=effective,
            procedure=code,
        )
        study_ref = ctx.add(study)
    report: JsonDict = {
        "resourceType": "DiagnosticReport",
        "id": ctx.id("DiagnosticReport", *report_key),
    }
    if identifiers:
        report["identifier"] = identifiers
    report["status"] = status
    section = obr.text(24)
    if section:
        report["category"] = [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": section}
                ]
            }
        ]
    report["code"] = code
    ctx.subject(report)
    if effective and effective_end:
        report["effectivePeriod"] = {"start": effective, "end": effective_end}
    elif effective:
        report["effectiveDateTime"] = effective
    issued = ctx.instant(obr, 22)
    if issued:
        report["issued"] = issued
    if ctx.organization_ref:
        report["performer"] = [{"reference": ctx.organization_ref}]
    interpreter = obr.rep(32)
    if interpreter:
        ref = dt.xcn_reference(
            [[s] for s in interpreter[0]], facility=ctx.facility, systems=ctx.systems
        )
        if ref:
            report["resultsInterpreter"] = [ref]
    if specimens:
        report["specimen"] = [{"reference": r} for r in specimens]
    if results:
        report["result"] = [{"reference": r} for r in results]
    if study_ref:
        report["imagingStudy"] = [{"reference": study_ref}]
    if conclusion:
        report["conclusion"] = "\n".join(conclusion)
    if text_sections:
        body = "\n\n".join(text_sections).encode("utf-8")
        forms.insert(
            0,
            {"contentType": "text/plain;charset=utf-8", "data": base64.b64encode(body).decode()},
        )
    if forms:
        report["presentedForm"] = forms
    ctx.add(report)


def _observation(
    ctx: Context,
    obx: Segment,
    report_key: tuple[str, ...],
    occurrence: int,
    radiology: bool,
    report_effective: str | None,
    vtype: str,
    sub_id: str,
) -> JsonDict:
    """OBX -> Observation; ``vtype`` and ``sub_id`` are OBX-2 (upper case) and OBX-4."""
    status = dt.observation_status(obx.text(11))
    if status is None:
        if ctx.strict_codes:
            raise MessageContentError(
                "result status not in HL7 table 0085",
                hl7_code="103",
                segment="OBX",
                segment_index=obx.index,
                field=11,
            )
        status = "unknown"
    code = ctx.concept(obx, 3, clinical=True)
    if code is None:
        raise MessageContentError(
            "required field observation identifier is missing",
            segment="OBX",
            segment_index=obx.index,
            field=3,
        )
    obs: JsonDict = {
        "resourceType": "Observation",
        "id": ctx.id("Observation", *report_key, obx.raw(3), sub_id, str(occurrence)),
        "status": status,
        "category": [_CATEGORY_IMAGING if radiology else _CATEGORY_LAB],
        "code": code,
    }
    ctx.subject(obs)
    effective = ctx.datetime(obx, 14) or report_effective
    if effective:
        obs["effectiveDateTime"] = effective
    issued = ctx.instant(obx, 19)
    if issued:
        obs["issued"] = issued
    performer = obx.text(23)
    if performer:
        obs["performer"] = [{"display": performer}]
    elif ctx.organization_ref:
        obs["performer"] = [{"reference": ctx.organization_ref}]
    # observation_value, keeping OBX-6 for the reference range (read only with a value, as
    # there an unreadable OBX-6 is not located at OBX-7)
    reps = obx.reps(5)
    unit = obx.rep(6) if reps else None
    warned = len(ctx.warnings)
    value = _located_value(ctx, obx, vtype, reps, unit) if reps else None
    if value is not None:
        obs[value[0]] = value[1]
        if len(ctx.warnings) > warned:
            obs["note"] = [{"text": f"OBX-5 did not fit value type {vtype}; kept as text"}]
    flags = [dt.interpretation(flag) for r in obx.reps(8) if (flag := comp(r, 1))]
    if flags:
        obs["interpretation"] = flags
    method = ctx.concept(obx, 17)
    if method:
        obs["method"] = method
    ref_text = obx.text(7)
    if ref_text:
        try:
            ref_range = _reference_range(ctx, ref_text, unit if reps else obx.rep(6))
        except MappingError as exc:
            raise exc.locate(obx.name, obx.index, 7) from exc.__cause__
        if ref_range:
            obs["referenceRange"] = [ref_range]
    return obs


def _reference_range(ctx: Context, text: str, unit: Rep | None) -> JsonDict | None:
    """:func:`dt.reference_range`, memoised per (text, unit) in the options' memo."""
    key = ("RANGE", text, *comps(unit, 3))  # the components dt.quantity reads
    found: JsonDict | None = ctx.memo.get(key)
    if found is None:
        found = ctx.memoised(key, dt.reference_range(text, unit))
        if found is None:
            return None
    # copies (Quantity values are flat dicts): the memo is shared between messages
    return {k: dict(v) if isinstance(v, dict) else v for k, v in found.items()}
