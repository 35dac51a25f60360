"""Every HL7 v2 fixture converts to its checked-in expected output, and that output is
valid FHIR R4 (R4B models), internally consistent and stable across messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mappings.errors import MessageContentError
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import parse
from tests.mappings.conftest import HL7_DIR, REGEN

FIXTURES = sorted(HL7_DIR.glob("*.hl7"))
FAMILIES = {"adt", "oru", "orm", "oml", "mdm", "siu", "batch"}


def _results(path: Path, options: ConversionOptions) -> list[dict[str, Any]]:
    out = REGEN.convert_fixture(path, options)
    return out if isinstance(out, list) else [out]


def test_fixture_set_covers_every_message_family() -> None:
    assert {p.name.split("_")[0] for p in FIXTURES} == FAMILIES
    assert len(FIXTURES) >= 15


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_matches_expected(path: Path, options: ConversionOptions) -> None:
    expected = json.loads((HL7_DIR / "expected" / f"{path.stem}.json").read_text("utf-8"))
    assert REGEN.convert_fixture(path, options) == expected


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_resource_is_valid_r4(path: Path, options: ConversionOptions) -> None:
    for result in _results(path, options):
        assert result["resources"]
        for resource in result["resources"]:
            model = get_fhir_model_class(resource["resourceType"])
            model.model_validate(resource)


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_references_resolve_and_ids_unique(path: Path, options: ConversionOptions) -> None:
    for result in _results(path, options):
        keys = [f"{r['resourceType']}/{r['id']}" for r in result["resources"]]
        assert len(keys) == len(set(keys))
        # A merge (A40) links to the prior Patient, which the message does not carry.
        merged = [
            link["other"]["reference"]
            for r in result["resources"]
            for link in r.get("link", [])
            if r["resourceType"] == "Patient" and link["type"] == "replaces"
        ]
        for ref in _references(result["resources"]):
            assert ref.startswith("#") or ref in keys or ref in merged, ref


def _ids(name: str, options: ConversionOptions) -> dict[str, set[str]]:
    result = convert(parse((HL7_DIR / f"{name}.hl7").read_bytes()), options=options)
    out: dict[str, set[str]] = {}
    for r in result.resources:
        out.setdefault(r["resourceType"], set()).add(r["id"])
    return out


def test_updates_map_to_the_same_ids(options: ConversionOptions) -> None:
    a01, a03, a08 = (_ids(n, options) for n in ("adt_a01_utf8", "adt_a03", "adt_a08"))
    oru = _ids("oru_r01_lab", options)
    assert a01["Patient"] == a03["Patient"] == a08["Patient"] == oru["Patient"]
    assert a01["Encounter"] == a03["Encounter"] == a08["Encounter"] == oru["Encounter"]
    a28, a31 = _ids("adt_a28_latin1", options), _ids("adt_a31", options)
    assert a28["Patient"] == a31["Patient"]
    assert "Encounter" not in a28


def test_a40_links_the_surviving_patient_to_the_prior_one(options: ConversionOptions) -> None:
    raw = (HL7_DIR / "adt_a40.hl7").read_bytes()
    result = convert(parse(raw), options=options)
    (patient,) = [r for r in result.resources if r["resourceType"] == "Patient"]
    assert patient["id"] == _ids("adt_a01_utf8", options)["Patient"].pop()
    # The prior id is the one a PID with MRG-1's identifiers gets.
    prior_pid = raw.split(b"\rMRG|")[0].split(b"PID|1||")[0] + (
        b"PID|1||MRN000999^^^HOSPA^MR~T0000777^^^HOSPA^PI\r"
    )
    prior = convert(
        parse(prior_pid.replace(b"ADT^A40^ADT_A39", b"ADT^A31^ADT_A05")), options=options
    )
    (prior_patient,) = [r for r in prior.resources if r["resourceType"] == "Patient"]
    assert patient["link"] == [
        {"other": {"reference": f"Patient/{prior_patient['id']}"}, "type": "replaces"}
    ]
    assert result.prior_identifiers == [
        ("urn:oid:1.2.156.112604.1.2.1", "MRN000999"),
        ("urn:oid:1.2.156.112604.1.2.1", "T0000777"),
    ]
    assert result.prior_identifiers == prior.patient_identifiers
    no_mrg = raw.split(b"MRG|")[0]
    with pytest.raises(MessageContentError) as info:
        convert(parse(no_mrg), options=options)
    assert (info.value.hl7_code, info.value.segment, info.value.field) == ("101", "MRG", 1)
    empty_mrg = no_mrg + b"MRG|\r"
    with pytest.raises(MessageContentError) as info:
        convert(parse(empty_mrg), options=options)
    assert (info.value.hl7_code, info.value.segment, info.value.field) == ("101", "MRG", 1)


def test_order_report_and_study_link_up(options: ConversionOptions) -> None:
    order, report = _ids("orm_o01_ris", options), _ids("oru_r01_radiology", options)
    assert order["ImagingStudy"] == report["ImagingStudy"]


def test_a08_explicit_null_removes_phone(options: ConversionOptions) -> None:
    result = convert(parse((HL7_DIR / "adt_a08.hl7").read_bytes()), options=options)
    patient = next(r for r in result.resources if r["resourceType"] == "Patient")
    assert "telecom" not in patient
    assert patient["address"][0]["line"] == ["淮海路200号"]


def test_master_identifier_and_facility_scoped_identifier(options: ConversionOptions) -> None:
    a01 = convert(parse((HL7_DIR / "adt_a01_utf8.hl7").read_bytes()), options=options)
    assert a01.master_identifier == ("urn:alliance:resident-health-card", "H3101011985050512X")
    gb = convert(parse((HL7_DIR / "adt_a01_gb18030.hl7").read_bytes()), options=options)
    assert gb.master_identifier is None
    assert gb.patient_identifiers == [("urn:alliance:facility:HOSPB:id", "0045678")]


def test_dictionary_codes_keep_original_beside_standard(options: ConversionOptions) -> None:
    result = convert(parse((HL7_DIR / "oru_r01_lab.hl7").read_bytes()), options=options)
    glucose = next(
        r
        for r in result.resources
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "GLU"
    )
    assert [c["system"] for c in glucose["code"]["coding"]] == [
        "urn:alliance:codesystem:lab",
        "http://loinc.org",
    ]
    assert glucose["valueQuantity"]["code"] == "mmol/L"
    assert glucose["interpretation"][0]["coding"][0]["code"] == "H"
    assert glucose["referenceRange"][0]["low"]["value"] == 3.9
    assert glucose["note"] == [{"text": "空腹采血"}]
