"""What the HL7 v2 and DICOM conversions produce from every fixture is valid FHIR R4 4.0.1 by
the reference: HAPI FHIR's instance validator (tests/fhir_validator.py), zero errors.

The resources are converted afresh here (not read from the expected outputs), all sent to the
session's one validator JVM in one call. A deliberately broken resource must come back with
errors, so that these tests can fail.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mappings.imaging import imaging_study_from_dicom_json
from mappings.v2.convert import ConversionOptions
from tests.fhir_validator import ReferenceValidator, Result, describe
from tests.mappings.conftest import HL7_DIR, REGEN

DICOM_DIR = HL7_DIR.parent / "dicom"


def _converted(options: ConversionOptions) -> list[tuple[str, dict[str, Any]]]:
    """(fixture name, resource) for every resource every fixture converts to."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(HL7_DIR.glob("*.hl7")):
        results = REGEN.convert_fixture(path, options)
        for result in results if isinstance(results, list) else [results]:
            out += [(path.name, r) for r in result["resources"]]
    for path in sorted(DICOM_DIR.glob("*.json")):
        doc = json.loads(path.read_text("utf-8"))
        out.append((path.name, imaging_study_from_dicom_json(doc, options=options)))
    return out


@pytest.fixture(scope="module")
def validated(
    reference_validator: ReferenceValidator, options: ConversionOptions
) -> list[tuple[str, Result]]:
    converted = _converted(options)
    results = reference_validator.validate(r for _, r in converted)
    return [(name, res) for (name, _), res in zip(converted, results, strict=True)]


def test_every_fixture_is_covered(validated: list[tuple[str, Result]]) -> None:
    names = {name for name, _ in validated}
    assert names == {p.name for p in HL7_DIR.glob("*.hl7")} | {
        p.name for p in DICOM_DIR.glob("*.json")
    }
    # The conversions make about five resources a message; every one was validated.
    assert len(validated) >= 70
    assert {r.resource_type for _, r in validated} >= {
        "Patient",
        "Encounter",
        "Observation",
        "DiagnosticReport",
        "ServiceRequest",
        "ImagingStudy",
        "Appointment",
        "DocumentReference",
        "Condition",
        "Specimen",
    }


def test_conversions_have_no_errors(validated: list[tuple[str, Result]]) -> None:
    bad = [res for _, res in validated if res.errors]
    assert not bad, describe(bad)


def test_no_value_set_warning_we_can_fix(validated: list[tuple[str, Result]]) -> None:
    """The warnings fixed in the mapping stay fixed: marital status, language, appointment
    type. (Identifier types HC and VN, and contact relationship SPO, have no code in R4's
    extensible value sets: those warnings stay, see docs/architecture.md.)"""
    fixed = ("maritalStatus", "communication", "appointmentType")
    found = [
        f"{res.resource_type} {i.location}: {i.message}"
        for _, res in validated
        for i in res.warnings
        if any(part in i.location for part in fixed)
    ]
    assert not found, found


def test_appointment_type_is_in_table_0276(validated: list[tuple[str, Result]]) -> None:
    (appt,) = [res for _, res in validated if res.resource_type == "Appointment"]
    assert not appt.errors


def test_a_broken_resource_has_errors(
    reference_validator: ReferenceValidator, options: ConversionOptions
) -> None:
    """The oracle can say no: each defect below must be reported as an error at its place."""
    base = next(r for _, r in _converted(options) if r["resourceType"] == "Observation")
    cases: list[tuple[str, dict[str, Any]]] = []
    bad_status = copy.deepcopy(base)
    bad_status["status"] = "done"  # not in the required binding ObservationStatus
    cases.append(("Observation.status", bad_status))
    unknown_element = copy.deepcopy(base)
    unknown_element["colour"] = "red"
    cases.append(("Observation", unknown_element))
    appt_0277 = {
        "resourceType": "Appointment",
        "status": "booked",
        "appointmentType": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v2-0277", "code": "FOLLOWUP"}
            ]
        },
        "participant": [{"actor": {"display": "x"}, "status": "accepted"}],
        "start": "2026-03-25T09:30:00+08:00",
        "end": "2026-03-25T10:00:00+08:00",
    }
    cases.append(("Appointment.appointmentType", appt_0277))
    r4b_only = {"resourceType": "SubscriptionTopic", "url": "urn:x", "status": "active"}
    cases.append(("", r4b_only))
    results = reference_validator.validate((r for _, r in cases), tally=False)
    for (where, _), result in zip(cases, results, strict=True):
        assert result.errors, f"no error for a defect at {where or 'the root'}"
        if where:
            assert any(i.location.startswith(where) for i in result.errors), describe([result])


def test_profiles_dir_has_the_receipt_extension() -> None:
    sd = json.loads(
        (
            Path(__file__).resolve().parents[2] / "fixtures/fhir/profiles/ledger-receipt.json"
        ).read_text("utf-8")
    )
    assert sd["url"] == "https://alliance.example/fhir/StructureDefinition/ledger-receipt"
    assert sd["fhirVersion"] == "4.0.1" and sd["type"] == "Extension"
