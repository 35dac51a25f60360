"""ImagingStudy from imaging metadata: the shared builder used by the HL7 v2 converters
(ORU radiology reports, ORM/OMI orders from a RIS/PACS) and the DICOM JSON path
(PS3.18 ``application/dicom+json`` study, series or instance metadata).

Both produce the same shape: the Study Instance UID as a ``urn:dicom:uid`` identifier
(and the resource id), the accession number, modalities, series and instance counts,
body site (per series), start time, and a contained WADO-RS Endpoint.

Raises :class:`mappings.errors.MessageContentError` for DICOM JSON without a Study Instance
UID or patient id (101) or with malformed values (102), and
:class:`mappings.errors.ParseError` for input that is not DICOM JSON.
"""

from __future__ import annotations

from typing import Any

from mappings.errors import MessageContentError, ParseError
from mappings.v2 import datatypes as dt
from mappings.v2.common import ConversionOptions, JsonDict, stable_id

__all__ = [
    "DICOM_MODALITIES",
    "RADIOLOGY_SECTIONS",
    "dicom_patient_identifier",
    "imaging_study",
    "imaging_study_from_dicom_json",
]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: HL7 table 0074 sections that denote imaging.
RADIOLOGY_SECTIONS = frozenset(
    {
        "RAD",
        "RX",
        "CT",
        "MR",
        "MRI",
        "US",
        "NMR",
        "NMS",
        "XR",
        "CR",
        "DX",
        "MG",
        "PT",
        "RF",
        "XA",
        "VUS",
        "CUS",
        "IMG",
    }
)
#: DICOM modality codes (CID 29 and common ones) accepted as ImagingStudy.modality.
DICOM_MODALITIES = frozenset(
    {
        "CR",
        "CT",
        "DX",
        "ES",
        "IO",
        "MG",
        "MR",
        "NM",
        "OT",
        "PT",
        "RF",
        "RG",
        "SR",
        "US",
        "XA",
        "XC",
        "OP",
        "BDUS",
        "ECG",
        "IVUS",
        "OCT",
        "PX",
        "SM",
        "DOC",
        "KO",
        "PR",
    }
)


def _modality(code: str) -> JsonDict:
    return {"system": DCM, "code": code}


def imaging_study(
    *,
    options: ConversionOptions,
    study_uid: str,
    status: str,
    patient_ref: str,
    accession: str = "",
    accession_system: str | None = None,
    modalities: list[str] | None = None,
    started: str | None = None,
    procedure: JsonDict | None = None,
    based_on: str | None = None,
    series: list[JsonDict] | None = None,
    number_of_series: int | None = None,
    number_of_instances: int | None = None,
    endpoint: str | None = None,
    description: str = "",
) -> JsonDict:
    """Build an ImagingStudy; the id derives from the Study Instance UID only (plus the
    institution), so the v2 and DICOM JSON paths meet on the same resource."""
    study: JsonDict = {
        "resourceType": "ImagingStudy",
        "id": stable_id(options, "ImagingStudy", study_uid),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
    }
    if accession:
        acc: JsonDict = {
            "type": {"coding": [{"system": dt.V2_0203, "code": "ACSN"}]},
            "value": accession,
        }
        if accession_system:
            acc = {"type": acc["type"], "system": accession_system, "value": accession}
        study["identifier"].append(acc)
    study["status"] = status
    mods = sorted(set(modalities or []))
    if mods:
        study["modality"] = [_modality(m) for m in mods]
    study["subject"] = {"reference": patient_ref}
    if started:
        study["started"] = started
    if based_on:
        study["basedOn"] = [{"reference": based_on}]
    url = endpoint or (
        f"{options.imaging_endpoint_base.rstrip('/')}/studies/{study_uid}"
        if options.imaging_endpoint_base
        else None
    )
    if url:
        study["contained"] = [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "address": url,
            }
        ]
        study["endpoint"] = [{"reference": "#wado"}]
    if number_of_series is not None:
        study["numberOfSeries"] = number_of_series
    if number_of_instances is not None:
        study["numberOfInstances"] = number_of_instances
    if procedure:
        study["procedureCode"] = [procedure]
    if description:
        study["description"] = description
    if series:
        study["series"] = series
    return study


# ---------------------------------------------------------------- DICOM JSON

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
ACCESSION, MODALITIES, MODALITY = "00080050", "00080061", "00080060"
N_SERIES, N_INSTANCES = "00201206", "00201208"
N_SERIES_INSTANCES = "00201209"
BODY_PART, RETRIEVE_URL = "00180015", "00081190"
PATIENT_ID, ISSUER = "00100020", "00100021"
STUDY_DATE, STUDY_TIME, TZ_OFFSET = "00080020", "00080030", "00080201"
STUDY_DESCRIPTION, SERIES_NUMBER, SERIES_DESCRIPTION = "00081030", "00200011", "0008103E"


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _str(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    if not values or values[0] is None:
        return ""
    first = values[0]
    if isinstance(first, dict):  # PN
        first = first.get("Alphabetic", "")
    return str(first).strip()


def _int(item: dict[str, Any], tag: str) -> int | None:
    text = _str(item, tag)
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError as exc:
        raise MessageContentError(f"DICOM tag {tag} is not a number", hl7_code="102") from exc


def _started(item: dict[str, Any], default_tz: str) -> str | None:
    date = _str(item, STUDY_DATE)
    if not date:
        return None
    time = _str(item, STUDY_TIME).replace(":", "")
    offset = _str(item, TZ_OFFSET)
    try:
        return dt.to_datetime(date + time + offset, default_tz=default_tz)
    except MessageContentError as exc:
        raise MessageContentError(
            "DICOM StudyDate/StudyTime is not a valid date/time", hl7_code="102"
        ) from exc


def dicom_patient_identifier(
    doc: JsonDict | list[JsonDict], *, options: ConversionOptions
) -> tuple[str, str]:
    """The patient's identifier in DICOM JSON: (system, PatientID). The system is the one
    the Issuer of Patient ID (0010,0021) names as an assigning authority, else this
    institution's own (an id without an issuer means something only here).
    Raises MessageContentError (101) without a PatientID."""
    items = doc if isinstance(doc, list) else [doc]
    patient_id = next((_str(i, PATIENT_ID) for i in items if _str(i, PATIENT_ID)), "")
    if not patient_id:
        raise MessageContentError("PatientID (00100020) is missing", segment="00100020")
    issuer = _str(items[0], ISSUER)
    system = dt.authority_system(issuer, "", "", options.authority_systems) or (
        dt.facility_system(options.institution)
    )
    return system, patient_id


def imaging_study_from_dicom_json(
    doc: list[Any] | dict[str, Any], *, options: ConversionOptions
) -> JsonDict:
    """DICOM JSON (one study object, a list of study/series/instance objects of one study)
    -> ImagingStudy. Series and instance counts are taken from the tags when sent, else
    counted from the series/instance objects.

    The subject is the Patient whose id the v2 path derives from PatientID with
    IssuerOfPatientID as assigning authority (empty issuer: scoped to ``options.institution``).
    Raises ParseError for input that is not DICOM JSON objects, MessageContentError for a
    missing Study Instance UID or PatientID (101), several studies in one document or
    malformed values (102).
    """
    items = doc if isinstance(doc, list) else [doc]
    if not items or not all(isinstance(i, dict) for i in items):
        raise ParseError("DICOM JSON must be an object or a non-empty array of objects")
    study_uids = {_str(i, STUDY_UID) for i in items} - {""}
    if not study_uids:
        raise MessageContentError("StudyInstanceUID (0020000D) is missing", segment="0020000D")
    if len(study_uids) > 1:
        raise MessageContentError("DICOM JSON holds more than one study", hl7_code="102")
    study_uid = study_uids.pop()
    first = items[0]
    system, patient_id = dicom_patient_identifier(items, options=options)
    patient_ref = f"Patient/{stable_id(options, 'Patient', system, patient_id)}"
    modalities: set[str] = set()
    for item in items:
        modalities.update(str(v) for v in _values(item, MODALITIES) if v)
        if _str(item, MODALITY):
            modalities.add(_str(item, MODALITY))
    series_map: dict[str, JsonDict] = {}
    instances: dict[str, set[str]] = {}
    for item in items:
        suid = _str(item, SERIES_UID)
        if not suid:
            continue
        entry = series_map.setdefault(suid, {"uid": suid})
        modality = _str(item, MODALITY)
        if modality and "modality" not in entry:
            entry["modality"] = _modality(modality)
        number = _int(item, SERIES_NUMBER)
        if number is not None and "number" not in entry:
            entry["number"] = number
        description = _str(item, SERIES_DESCRIPTION)
        if description and "description" not in entry:
            entry["description"] = description
        body = _str(item, BODY_PART)
        if body and "bodySite" not in entry:
            entry["bodySite"] = {"system": "urn:dicom:body-part-examined", "code": body}
        count = _int(item, N_SERIES_INSTANCES)
        if count is not None:
            entry["numberOfInstances"] = count
        sop = _str(item, SOP_UID)
        if sop:
            instances.setdefault(suid, set()).add(sop)
    series: list[JsonDict] = []
    for suid, entry in series_map.items():
        if "numberOfInstances" not in entry and suid in instances:
            entry["numberOfInstances"] = len(instances[suid])
        entry.setdefault("modality", _modality(next(iter(sorted(modalities)), "OT")))
        ordered: JsonDict = {
            k: entry[k]
            for k in ("uid", "number", "modality", "description", "numberOfInstances", "bodySite")
            if k in entry
        }
        series.append(ordered)
    n_series = _int(first, N_SERIES)
    if n_series is None and series:
        n_series = len(series)
    n_instances = _int(first, N_INSTANCES)
    if n_instances is None and instances:
        n_instances = sum(len(v) for v in instances.values())
    return imaging_study(
        options=options,
        study_uid=study_uid,
        status="available",
        patient_ref=patient_ref,
        accession=_str(first, ACCESSION),
        accession_system=dt.facility_system(options.institution, "accession"),
        modalities=sorted(modalities),
        started=_started(first, options.default_tz),
        series=sorted(series, key=lambda s: (s.get("number", 0), s["uid"])) or None,
        number_of_series=n_series,
        number_of_instances=n_instances,
        endpoint=_str(first, RETRIEVE_URL) or None,
        description=_str(first, STUDY_DESCRIPTION),
        procedure=_procedure_code(first, options),
    )


#: Procedure Code Sequence and the code item's Code Value, Coding Scheme Designator, Meaning.
PROCEDURE_CODES, CODE_VALUE, CODING_SCHEME, CODE_MEANING = (
    "00081032",
    "00080100",
    "00080102",
    "00080104",
)


def _procedure_code(item: dict[str, Any], options: ConversionOptions) -> JsonDict | None:
    """The study's Procedure Code Sequence as a CodeableConcept (codes as sent; the scheme
    designator named like an HL7 v2 coding system: local schemes scoped to the institution),
    or None. The unified dictionary adds standard codings later."""
    codings = []
    for code_item in _values(item, PROCEDURE_CODES) or []:
        if not isinstance(code_item, dict):
            continue
        code = _str(code_item, CODE_VALUE)
        if not code:
            continue
        scheme = _str(code_item, CODING_SCHEME)
        system = dt.coding_system(
            scheme, facility=options.institution, aliases=options.terminology.aliases
        )
        coding: JsonDict = {"system": system, "code": code}
        meaning = _str(code_item, CODE_MEANING)
        if meaning:
            coding["display"] = meaning
        codings.append(coding)
    return {"coding": codings} if codings else None
