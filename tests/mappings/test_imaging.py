"""DICOM JSON (PS3.18) -> ImagingStudy, meeting the v2 path on the same resource."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mappings.errors import MessageContentError, ParseError
from mappings.imaging import imaging_study_from_dicom_json
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import parse
from tests.mappings.conftest import HL7_DIR

UID = "1.2.156.112604.1.2.1.20260317.7"


def _el(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def _instance(series: str, sop: str, modality: str, number: int) -> dict[str, Any]:
    return {
        "0020000D": _el("UI", UID),
        "0020000E": _el("UI", series),
        "00080018": _el("UI", sop),
        "00080060": _el("CS", modality),
        "00200011": _el("IS", number),
        "00080050": _el("SH", "ACC-2026-0007"),
        "00100020": _el("LO", "MRN000123"),
        "00100021": _el("LO", "HOSPA"),
        "00080020": _el("DA", "20260317"),
        "00080030": _el("TM", "140512"),
        "00180015": _el("CS", "CHEST"),
    }


def test_instances_grouped_into_series(options: ConversionOptions) -> None:
    doc = [
        _instance("1.2.3.1", "1.2.3.1.1", "CT", 1),
        _instance("1.2.3.1", "1.2.3.1.2", "CT", 1),
        _instance("1.2.3.2", "1.2.3.2.1", "SR", 2),
    ]
    study = imaging_study_from_dicom_json(doc, options=options)
    ImagingStudy.model_validate(study)
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 3
    assert [m["code"] for m in study["modality"]] == ["CT", "SR"]
    assert study["series"][0]["numberOfInstances"] == 2
    assert study["series"][0]["bodySite"]["code"] == "CHEST"
    assert study["started"] == "2026-03-17T14:05:12+08:00"
    assert study["contained"][0]["address"].endswith(f"/studies/{UID}")


def test_same_study_and_patient_as_v2(options: ConversionOptions) -> None:
    study_doc = {
        "0020000D": _el("UI", UID),
        "00080061": _el("CS", "CT"),
        "00201206": _el("IS", 3),
        "00201208": _el("IS", 240),
        "00100020": _el("LO", "MRN000123"),
        "00100021": _el("LO", "HOSPA"),
        "00081190": _el("UR", f"https://pacs.example/wado/studies/{UID}"),
    }
    study = imaging_study_from_dicom_json(study_doc, options=options)
    ImagingStudy.model_validate(study)
    v2 = convert(parse((HL7_DIR / "oru_r01_radiology.hl7").read_bytes()), options=options)
    v2_study = next(r for r in v2.resources if r["resourceType"] == "ImagingStudy")
    v2_patient = next(r for r in v2.resources if r["resourceType"] == "Patient")
    assert study["id"] == v2_study["id"]
    assert study["subject"] == {"reference": f"Patient/{v2_patient['id']}"}
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 240)
    assert study["contained"][0]["address"] == f"https://pacs.example/wado/studies/{UID}"


def test_dicom_json_errors(options: ConversionOptions) -> None:
    with pytest.raises(ParseError):
        imaging_study_from_dicom_json([], options=options)
    with pytest.raises(MessageContentError):
        imaging_study_from_dicom_json({"00100020": _el("LO", "1")}, options=options)
    with pytest.raises(MessageContentError):
        imaging_study_from_dicom_json({"0020000D": _el("UI", UID)}, options=options)
