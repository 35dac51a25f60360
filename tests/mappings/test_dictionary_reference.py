"""The dictionary's content checked with the reference: HAPI FHIR's R4 instance validator
(tests/fhir_validator.py, the session's one JVM), offline.

The validator checks UCUM codes with its built-in UCUM service (the UCUM essence shipped with
``org.fhir:ucum``) and codes of the HL7 v2 tables, the v3 code systems and the FHIR code
systems against the FHIR 4.0.1 definitions it ships. So:

- every file of ``mappings/dictionary`` (CodeSystem, ConceptMap, ValueSet, StructureDefinition)
  is valid R4: zero errors;
- every UCUM unit the dictionary produces (the lab maps' unit products and the unit map's
  targets) is a valid UCUM code as ``Observation.valueQuantity.code``: zero errors, no warning
  at the quantity;
- every target code of the maps into HL7 v2 tables, v3 and FHIR code systems, put with the
  display its map gives into the element bound to its value set (``Patient.gender``,
  ``Patient.maritalStatus``, ``Observation.interpretation``, ``Observation.status``,
  ``Appointment.status``, ``Appointment.appointmentType``): zero errors, and no warning at the
  element (a code outside an extensible or preferred binding, or a wrong display, is one);
- every source code of the maps from HL7 v2 tables exists in that table (a coding of the table
  in ``Basic.code``: an unknown code is an error);
- negative controls: a unit that is not UCUM, a code not in its table, a wrong display are
  reported at the element, so each check can fail.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mappings.dictionary_apply import apply_dictionary
from mappings.terminology import (
    DEFAULT_DIR,
    EQUIVALENCE_URL,
    LOCAL_UNITS,
    SOURCE_INSTITUTION_URL,
    UCUM,
    Terminology,
)
from tests.fhir_validator import ReferenceValidator, Result, describe

Json = dict[str, Any]
V2 = "http://terminology.hl7.org/CodeSystem/v2-"


def _resources() -> list[Json]:
    return [json.loads(p.read_text("utf-8")) for p in sorted(DEFAULT_DIR.glob("*.json"))]


def _maps() -> Iterator[tuple[str, str, str, Json]]:
    """(map id, source system, target system, target) for every target of every map."""
    for r in _resources():
        if r["resourceType"] != "ConceptMap":
            continue
        for group in r["group"]:
            for element in group["element"]:
                for target in element["target"]:
                    yield (
                        r["id"],
                        group["source"],
                        group["target"],
                        {
                            **target,
                            "source_code": element["code"],
                        },
                    )


def _units() -> list[str]:
    units = {
        p["value"]
        for _, _, _, t in _maps()
        for p in t.get("product", [])
        if p.get("system") == UCUM
    }
    units |= {t["code"] for _, source, target, t in _maps() if source == LOCAL_UNITS}
    return sorted(units)


def _observation(**extra: Any) -> Json:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "14749-6"}]},
        **extra,
    }


def _appointment(**extra: Any) -> Json:
    appt: Json = {
        "resourceType": "Appointment",
        "status": "booked",
        "participant": [{"actor": {"display": "clinic"}, "status": "accepted"}],
        "start": "2026-03-25T09:30:00+08:00",
        "end": "2026-03-25T10:00:00+08:00",
    }
    appt.update(extra)
    return appt


def _cc(system: str, code: str, display: str | None) -> Json:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


#: Target system -> (FHIRPath of the bound element, resource carrying system|code|display).
BOUND: dict[str, tuple[str, Callable[[str, str, str | None], Json]]] = {
    "http://hl7.org/fhir/administrative-gender": (
        "Patient.gender",
        lambda s, c, d: {"resourceType": "Patient", "gender": c},
    ),
    "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus": (
        "Patient.maritalStatus",
        lambda s, c, d: {"resourceType": "Patient", "maritalStatus": _cc(s, c, d)},
    ),
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation": (
        "Observation.interpretation",
        lambda s, c, d: _observation(interpretation=[_cc(s, c, d)]),
    ),
    "http://hl7.org/fhir/observation-status": (
        "Observation.status",
        lambda s, c, d: _observation(status=c),
    ),
    "http://hl7.org/fhir/appointmentstatus": (
        "Appointment.status",
        lambda s, c, d: _appointment(status=c),
    ),
    V2 + "0276": (
        "Appointment.appointmentType",
        lambda s, c, d: _appointment(appointmentType=_cc(s, c, d)),
    ),
}


#: A warning left on purpose: a UCUM annotation (``{1.73_m2}`` in eGFR's mL/min/{1.73_m2},
#: the unit LOINC gives for it) is valid UCUM, and the validator advises against annotations.
ALLOWED_WARNINGS = frozenset({"TYPE_SPECIFIC_CHECKS_DT_QTY_UCUM_ANNOTATIONS"})


def _at(result: Result, where: str) -> list[str]:
    """Errors and warnings of ``result`` located at ``where`` (or below it), but for
    ALLOWED_WARNINGS."""
    return [
        f"{i.severity} {i.location}: {i.message}"
        for i in result.issues
        if i.severity in ("error", "fatal", "warning")
        and i.location.startswith(where)
        and i.message_id not in ALLOWED_WARNINGS
    ]


def _bound_cases() -> list[tuple[str, str, Json]]:
    """(label, element, resource) for each distinct target code of the maps into BOUND."""
    seen: set[tuple[str, str]] = set()
    cases = []
    for map_id, _, target_system, t in _maps():
        if target_system not in BOUND or "code" not in t:
            continue
        if (target_system, t["code"]) in seen:
            continue
        seen.add((target_system, t["code"]))
        element, build = BOUND[target_system]
        resource = build(target_system, t["code"], t.get("display"))
        cases.append((f"{map_id}: {t['code']}", element, resource))
    return cases


# ---------------------------------------------------------------- the files themselves


def test_every_code_system_map_and_value_set_is_valid_r4(
    reference_validator: ReferenceValidator,
) -> None:
    """The maps' targets and sources are checked against the code systems and value sets the
    validator knows (HL7 v2 tables, v3 and FHIR code systems), their displays too; cmd-1 (a
    narrower or inexact mapping has a comment) and source[x]/target[x] naming value sets."""
    resources = [r for r in _resources() if r["resourceType"] != "StructureDefinition"]
    assert {r["resourceType"] for r in resources} == {"CodeSystem", "ConceptMap", "ValueSet"}
    results = reference_validator.validate(resources)
    assert len(results) == len(resources) >= 25
    bad = [r for r in results if r.errors or _display_warnings(r)]
    assert not bad, describe(bad, severities=("error", "fatal", "warning"))


def _display_warnings(result: Result) -> list[str]:
    return [i.message for i in result.warnings if "DISPLAY" in i.message_id]


def test_every_extension_definition_holds_in_use(reference_validator: ReferenceValidator) -> None:
    """The StructureDefinitions are not validated as instances: generating the snapshot of a
    differential needs the R4 core package from packages.fhir.org, which the offline validator
    refuses. They are loaded as profiles (tests/fhir_validator.py), where an extension they do
    not define, or define otherwise, is an error: so each is used as the gateway uses it
    (a mapped resource, a ConceptMap of one institution; the sensitive value sets carry the
    security label) and must validate; a wrong value type must not."""
    term = Terminology.load_default()
    panel = apply_dictionary(
        _observation(code=_cc("urn:alliance:facility:CLINIC-E:cs:LIS", "1091", None)), term
    ).resource
    assert any("extension" in c for c in panel["code"]["coding"]), panel
    patient = apply_dictionary({"resourceType": "Patient", "gender": "M"}, term).resource
    assert patient["gender"] == "male" and "_gender" in patient, patient
    cmap = next(r for r in _resources() if r["id"] == "hosp-t-ris-to-loinc")
    cmap = {**cmap, "extension": [{"url": SOURCE_INSTITUTION_URL, "valueString": "HOSP-T"}]}
    labelled = [r for r in _resources() if r["resourceType"] == "ValueSet"]
    assert all(r.get("extension") for r in labelled)
    used = [panel, patient, cmap, *labelled]
    urls = {e["url"] for r in used for e in _extensions(r)}
    defined = {r["url"] for r in _resources() if r["resourceType"] == "StructureDefinition"}
    assert defined <= urls, defined - urls
    results = reference_validator.validate(used)
    bad = [r for r in results if r.errors]
    assert not bad, describe(bad)
    wrong = copy.deepcopy(panel)
    added = next(c for c in wrong["code"]["coding"] if "extension" in c)
    added["extension"][0] = {"url": EQUIVALENCE_URL, "valueString": "wider"}
    (result,) = reference_validator.validate([wrong], tally=False)
    assert result.errors, "an extension of the wrong value type must be an error"


def _extensions(node: Any) -> Iterator[Json]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "extension" and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict))
            yield from _extensions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _extensions(item)


# ---------------------------------------------------------------- UCUM


def test_every_ucum_unit_is_valid_ucum(reference_validator: ReferenceValidator) -> None:
    units = _units()
    assert len(units) >= 15
    observations = [
        _observation(valueQuantity={"value": 1, "unit": u, "system": UCUM, "code": u})
        for u in units
    ]
    results = reference_validator.validate(observations)
    found = {
        unit: _at(result, "Observation.value")
        for unit, result in zip(units, results, strict=True)
        if result.errors or _at(result, "Observation.value")
    }
    assert not found, found


@pytest.mark.parametrize("unit", ["mmol per litre", "mmol/litre", "mg/dl/"])
def test_a_unit_that_is_not_ucum_is_an_error(
    reference_validator: ReferenceValidator, unit: str
) -> None:
    obs = _observation(valueQuantity={"value": 1, "unit": unit, "system": UCUM, "code": unit})
    (result,) = reference_validator.validate([obs], tally=False)
    assert any(i.location.startswith("Observation.value") for i in result.errors), describe(
        [result], severities=("error", "fatal", "warning", "information")
    )


# ---------------------------------------------------------------- v2 tables and value sets


def test_targets_are_in_the_value_sets_of_their_elements(
    reference_validator: ReferenceValidator,
) -> None:
    cases = _bound_cases()
    # Every bound target system is covered by at least one map.
    assert {element for _, element, _ in cases} == {element for element, _ in BOUND.values()}
    assert len(cases) >= 40
    results = reference_validator.validate(r for _, _, r in cases)
    found = {
        label: result.errors or _at(result, element)
        for (label, element, _), result in zip(cases, results, strict=True)
        if result.errors or _at(result, element)
    }
    assert not found, found


def test_v2_source_codes_exist_in_their_tables(reference_validator: ReferenceValidator) -> None:
    cases = sorted(
        {
            (source, t["source_code"])
            for _, source, _, t in _maps()
            if source.startswith(V2) and not source.endswith("-0276")
        }
    )
    assert {s for s, _ in cases} == {V2 + t for t in ("0001", "0002", "0078", "0085", "0277")}
    resources = [
        {"resourceType": "Basic", "code": {"coding": [{"system": s, "code": c}]}} for s, c in cases
    ]
    results = reference_validator.validate(resources)
    bad = [r for r in results if r.errors or _at(r, "Basic.code")]
    assert not bad, describe(bad, severities=("error", "fatal", "warning"))


def test_wrong_codes_and_displays_are_reported(reference_validator: ReferenceValidator) -> None:
    """The oracle can say no: each defect must be reported at its place (errors for codes,
    warnings for displays), in a map as in a resource."""
    maps = {r["id"]: r for r in _resources() if r["resourceType"] == "ConceptMap"}

    def broken(map_id: str, change: Callable[[Json], None]) -> Json:
        cmap = copy.deepcopy(maps[map_id])
        change(cmap["group"][0]["element"][0])
        return cmap

    def target(field: str, value: str) -> Callable[[Json], None]:
        return lambda element: element["target"][0].__setitem__(field, value)

    def source(field: str, value: str) -> Callable[[Json], None]:
        return lambda element: element.__setitem__(field, value)

    element = "ConceptMap.group[0].element[0]"
    cases: list[tuple[str, str, Json]] = [
        ("error", f"{element}.target[0].code", broken(map_id, target("code", "ZZZ")))
        for map_id in (
            "v2-0001-to-administrative-gender",
            "v2-0002-to-v3-maritalstatus",
            "v2-0078-to-v3-observationinterpretation",
            "v2-0085-to-observation-status",
            "v2-0277-to-appointmentstatus",
            "hosp-t-appointment-reason-to-v2-0276",
        )
    ]
    cases += [
        (
            "warning",
            f"{element}.target[0].code",
            broken("v2-0078-to-v3-observationinterpretation", target("display", "Critical low")),
        ),
        (
            "error",
            f"{element}.code",
            broken("v2-0078-to-v3-observationinterpretation", source("code", "QQ")),
        ),
        (
            "warning",
            f"{element}.code",
            broken("v2-0002-to-v3-maritalstatus", source("display", "Wed")),
        ),
        ("error", "Patient.gender", {"resourceType": "Patient", "gender": "M"}),
        ("error", "Observation.status", _observation(status="F")),
        (
            "error",
            "Patient.maritalStatus",  # common law: a code R4's v3-MaritalStatus does not have
            {
                "resourceType": "Patient",
                "maritalStatus": _cc(
                    "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "C", None
                ),
            },
        ),
        ("error", "Basic.code", {"resourceType": "Basic", "code": _cc(V2 + "0001", "X", None)}),
    ]
    results = reference_validator.validate((r for _, _, r in cases), tally=False)
    for (severity, where, _), result in zip(cases, results, strict=True):
        found = [i for i in result.issues if i.severity == severity and i.location == where]
        assert found, (where, describe([result], severities=("error", "warning")))
