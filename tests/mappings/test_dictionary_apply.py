"""apply_dictionary on FHIR resources of several types, and labels()."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mappings.dictionary_apply import Unmapped, apply_dictionary, labels
from mappings.terminology import EQUIVALENCE_URL, ORIGINAL_CODE_URL, UCUM, Terminology

LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICPC2 = "http://hl7.org/fhir/sid/icpc-2"
CLINIC_E_LIS = "urn:alliance:facility:CLINIC-E:cs:LIS"
HOSP_T = "urn:alliance:facility:HOSP-T:cs:"


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Terminology.load_default()


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def test_observation_code_value_and_unit(term: Terminology) -> None:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": _cc(CLINIC_E_LIS, "1001", "血糖"),
        "valueQuantity": {"value": 7.8, "unit": "mmol/l"},
        "referenceRange": [{"low": {"value": 3.9, "unit": "mmol/l"}}],
    }
    before = copy.deepcopy(obs)
    applied = apply_dictionary(obs, term, source="clinic-e")
    assert obs == before, "the input is never modified"
    out = applied.resource
    assert out["code"]["coding"][0] == before["code"]["coding"][0], "original kept, first"
    assert out["code"]["coding"][1] == {
        "system": LOINC,
        "code": "14749-6",
        "display": "Glucose [Moles/volume] in Serum or Plasma",
    }
    assert out["valueQuantity"] == {
        "value": 7.8,
        "unit": "mmol/l",
        "system": UCUM,
        "code": "mmol/L",
    }
    assert out["referenceRange"][0]["low"]["code"] == "mmol/L"
    assert applied.unmapped == () and applied.changed and applied.version == term.version


@pytest.mark.parametrize(
    ("rtype", "element", "system", "code", "expected"),
    [
        ("Condition", "code", ICPC2, "K86", (ICD10, "I10")),
        ("Condition", "code", HOSP_T + "DX", "ZD0102", (ICD10, "E11.9")),
        ("DiagnosticReport", "code", HOSP_T + "LIS", "HBA1C", (LOINC, "4548-4")),
        ("ServiceRequest", "code", HOSP_T + "RIS", "CT-CHEST", (LOINC, "24627-2")),
        ("Procedure", "code", HOSP_T + "RIS", "MR-BRAIN", (LOINC, "24590-2")),
        (
            "Observation",
            "valueCodeableConcept",
            "http://terminology.hl7.org/CodeSystem/v2-0078",
            "POS",
            ("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "POS"),
        ),
    ],
)
def test_every_coded_element_is_mapped(
    term: Terminology,
    rtype: str,
    element: str,
    system: str,
    code: str,
    expected: tuple[str, str],
) -> None:
    res = {"resourceType": rtype, "id": "x", element: _cc(system, code)}
    out = apply_dictionary(res, term).resource
    codings = [(c["system"], c["code"]) for c in out[element]["coding"]]
    assert codings == [(system, code), expected]


def test_component_codes_are_mapped_with_their_path_when_not(term: Terminology) -> None:
    obs = {
        "resourceType": "Observation",
        "component": [
            {"code": _cc(HOSP_T + "LIS", "WBC")},
            {"code": _cc(HOSP_T + "LIS", "NOT-A-CODE")},
        ],
    }
    applied = apply_dictionary(obs, term)
    assert applied.resource["component"][0]["code"]["coding"][1]["code"] == "6690-2"
    assert applied.unmapped == (
        Unmapped("Observation.component[1].code.coding", HOSP_T + "LIS", "NOT-A-CODE"),
    )


def test_non_equivalent_mapping_records_its_equivalence(term: Terminology) -> None:
    cond = {"resourceType": "Condition", "code": _cc(ICPC2, "T93")}  # lipid disorder, wider
    (added,) = apply_dictionary(cond, term).resource["code"]["coding"][1:]
    assert added["code"] == "E78.5"
    assert added["extension"] == [{"url": EQUIVALENCE_URL, "valueCode": "wider"}]


def test_inexact_mapping_is_never_added_and_counts_as_unmapped(term: Terminology) -> None:
    obs = {"resourceType": "Observation", "code": _cc(CLINIC_E_LIS, "1090")}  # capillary
    applied = apply_dictionary(obs, term, source="clinic-e")
    assert applied.resource is obs and not applied.changed
    assert [u.code for u in applied.unmapped] == ["1090"]


def test_standard_codes_are_left_alone(term: Terminology) -> None:
    obs = {
        "resourceType": "Observation",
        "code": _cc(LOINC, "2345-7"),
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "lab")],
        "valueQuantity": {"value": 1, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
    }
    applied = apply_dictionary(obs, term)
    assert applied.resource is obs and applied.unmapped == ()


def test_a_concept_with_a_standard_coding_beside_a_local_one_is_not_unmapped(
    term: Terminology,
) -> None:
    cc = {"coding": [{"system": HOSP_T + "LIS", "code": "XYZ"}, {"system": LOINC, "code": "1-8"}]}
    applied = apply_dictionary({"resourceType": "Observation", "code": cc}, term)
    assert applied.unmapped == ()


def test_unknown_unit_is_unmapped(term: Terminology) -> None:
    obs = {"resourceType": "Observation", "valueQuantity": {"value": 1, "unit": "无单位"}}
    (u,) = apply_dictionary(obs, term).unmapped
    assert (u.element, u.code) == ("Observation.valueQuantity.unit", "无单位")


def test_gender_code_element_takes_the_mapped_value_and_keeps_the_original(
    term: Terminology,
) -> None:
    out = apply_dictionary({"resourceType": "Patient", "gender": "F"}, term).resource
    assert out["gender"] == "female"
    assert out["_gender"]["extension"] == [
        {
            "url": ORIGINAL_CODE_URL,
            "valueCoding": {"system": "http://terminology.hl7.org/CodeSystem/v2-0001", "code": "F"},
        }
    ]
    ambiguous = apply_dictionary({"resourceType": "Patient", "gender": "A"}, term).resource
    assert ambiguous["gender"] == "other"
    assert {"url": EQUIVALENCE_URL, "valueCode": "wider"} in ambiguous["_gender"]["extension"]
    same = {"resourceType": "Patient", "gender": "male"}
    assert apply_dictionary(same, term).resource is same
    bad = apply_dictionary({"resourceType": "Patient", "gender": "Q"}, term)
    assert bad.unmapped == (
        Unmapped("Patient.gender", "http://terminology.hl7.org/CodeSystem/v2-0001", "Q"),
    )


def test_labels_from_sensitive_value_sets(term: Terminology) -> None:
    def codes(res: dict[str, Any]) -> list[str]:
        return [label["code"] for label in labels(res, term)]

    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "B24")}) == ["HIV"]
    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "F32.9")}) == ["PSY"]
    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "F10.2")}) == ["ETH"]
    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "O03.9")}) == ["SEX"]
    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "Q90.9")}) == ["GDIS"]
    assert codes({"resourceType": "Condition", "code": _cc(ICD10, "I10")}) == []
    hiv_test = {"resourceType": "Observation", "code": _cc(LOINC, "56888-1")}
    assert codes(hiv_test) == ["HIV"]
    # A local code counts once mapped: the label comes from the unified coding.
    local = {"resourceType": "Condition", "code": _cc(ICPC2, "B90")}
    assert codes(apply_dictionary(local, term).resource) == ["HIV"]
    two = {
        "resourceType": "Condition",
        "code": {"coding": [{"system": ICD10, "code": "B24"}, {"system": ICD10, "code": "F20.9"}]},
    }
    assert codes(two) == ["HIV", "PSY"]
