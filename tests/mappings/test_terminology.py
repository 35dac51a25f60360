"""The unified dictionary: loading and its refusals (one test per rule), versioning, forward
and reverse matches, the equivalence rules, and the FHIR operations ($translate, $lookup,
$validate-code, search) as pure functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mappings import terminology_ops as ops
from mappings.terminology import (
    DEFAULT_DIR,
    EQUIVALENCE_URL,
    EQUIVALENCES,
    SOURCE_INSTITUTION_URL,
    DictionaryError,
    Terminology,
    bundle_sha256,
)

LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICPC2 = "http://hl7.org/fhir/sid/icpc-2"
HOSP_T_LIS = "urn:alliance:facility:HOSP-T:cs:LIS"
CLINIC_E_LIS = "urn:alliance:facility:CLINIC-E:cs:LIS"
SRC = "urn:test:src"


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Terminology.load_default()


def test_default_dictionary_translates(term: Terminology) -> None:
    assert term.translate("urn:alliance:codesystem:lab", "GLU") == [
        {
            "system": LOINC,
            "code": "14749-6",
            "display": "Glucose [Moles/volume] in Serum or Plasma",
        }
    ]
    assert term.translate("urn:alliance:codesystem:diagnosis", "D002")[0]["code"] == "I10"
    assert term.translate("urn:alliance:codesystem:lab", "NOPE") == []
    assert term.aliases["ALB"] == "urn:alliance:codesystem:lab"
    assert term.display("urn:alliance:codesystem:lab", "K") == "钾"
    assert term.has_maps_for("urn:alliance:codesystem:lab")
    assert Terminology.empty().translate("urn:alliance:codesystem:lab", "GLU") == []


def test_two_institutions_codes_reach_the_same_loinc(term: Terminology) -> None:
    a = term.translate(HOSP_T_LIS, "GLU")
    b = term.translate(CLINIC_E_LIS, "1001")
    assert a == b and a[0]["code"] == "14749-6"


def test_dictionary_files_are_valid_r4() -> None:
    paths = sorted(DEFAULT_DIR.glob("*.json"))
    assert len(paths) >= 25
    for path in paths:
        resource = json.loads(path.read_text("utf-8"))
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_version_is_a_hash_of_the_canonical_content(tmp_path: Path) -> None:
    copy = tmp_path / "dict"
    shutil.copytree(DEFAULT_DIR, copy)
    base = Terminology.load_default()
    assert Terminology.load(copy).version == base.version
    path = copy / "ConceptMap-hosp-t-lis-to-loinc.json"
    resource = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps(resource, indent=7, ensure_ascii=True), "utf-8")  # reformatted
    assert Terminology.load(copy).version == base.version
    resource["group"][0]["element"][0]["target"][0]["code"] = "2345-7"
    path.write_text(json.dumps(resource), "utf-8")
    changed = Terminology.load(copy)
    assert changed.version != base.version
    assert [f.name for f in changed.files] == sorted(p.name for p in copy.glob("*.json"))
    differing = [f.name for f, g in zip(changed.files, base.files, strict=True) if f != g]
    assert differing == [path.name]
    assert bundle_sha256(changed) != bundle_sha256(base)


# ---------------------------------------------------------------- loader refusals


def _cmap(*elements: dict[str, Any], target: str = LOINC, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ConceptMap",
        "url": "urn:test:map",
        "status": "active",
        "group": [{"source": SRC, "target": target, "element": list(elements)}],
        **extra,
    }


def _el(code: str, *targets: dict[str, Any]) -> dict[str, Any]:
    return {"code": code, "target": list(targets)}


def _load(*resources: Any) -> Terminology:
    return Terminology.from_resources((f"f{i}.json", r) for i, r in enumerate(resources))


def test_refuses_file_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json", "utf-8")
    with pytest.raises(DictionaryError, match=r"x\.json cannot be loaded"):
        Terminology.load(tmp_path)


def test_refuses_unsupported_resource_type() -> None:
    with pytest.raises(DictionaryError, match=r"f0\.json: resourceType 'Patient'"):
        _load({"resourceType": "Patient", "url": "urn:x"})


def test_refuses_resource_without_url() -> None:
    with pytest.raises(DictionaryError, match=r"f0.json: ConceptMap.url is missing"):
        _load({"resourceType": "ConceptMap", "group": []})


def test_refuses_duplicate_source_code() -> None:
    cm = _cmap(
        _el("A", {"code": "2345-7", "equivalence": "equivalent"}),
        _el("A", {"code": "14749-6", "equivalence": "equivalent"}),
    )
    with pytest.raises(DictionaryError, match=r"group\[0\]\.element\[1\]\.code 'A'.*duplicate"):
        _load(cm)


def test_refuses_duplicate_source_code_across_files() -> None:
    one = _cmap(_el("A", {"code": "2345-7", "equivalence": "equivalent"}))
    two = _cmap(_el("A", {"code": "2345-7", "equivalence": "equivalent"}), url="urn:test:2")
    with pytest.raises(DictionaryError, match=r"f1.json: .*duplicate source code.*in f0.json"):
        _load(one, two)


def test_refuses_unknown_equivalence() -> None:
    cm = _cmap(_el("A", {"code": "2345-7", "equivalence": "same-ish"}))
    with pytest.raises(DictionaryError, match=r"element\[0\]\.target\[0\]\.equivalence 'same-ish'"):
        _load(cm)


def test_refuses_element_without_target() -> None:
    with pytest.raises(DictionaryError, match=r"element\[0\]\.target is missing"):
        _load(_cmap({"code": "A"}))


def test_refuses_target_without_code() -> None:
    cm = _cmap(_el("A", {"equivalence": "wider"}))
    with pytest.raises(DictionaryError, match=r"target\[0\]\.code is missing \(missing target\)"):
        _load(cm)


def test_refuses_target_code_not_in_the_dictionarys_own_code_system() -> None:
    cs = {
        "resourceType": "CodeSystem",
        "url": "urn:test:cs",
        "content": "complete",
        "concept": [{"code": "X"}],
    }
    cm = _cmap(_el("A", {"code": "Y", "equivalence": "equivalent"}), target="urn:test:cs")
    with pytest.raises(DictionaryError, match=r"f1.json: .*code 'Y' is not in CodeSystem"):
        _load(cs, cm)


def test_refuses_unknown_target_system() -> None:
    cm = _cmap(_el("A", {"code": "1", "equivalence": "equivalent"}), target="urn:nobody:knows")
    with pytest.raises(DictionaryError, match=r"target system urn:nobody:knows is named by no"):
        _load(cm)


def test_refuses_duplicate_code_system_and_duplicate_concept() -> None:
    cs = {"resourceType": "CodeSystem", "url": "urn:test:cs", "concept": [{"code": "X"}]}
    with pytest.raises(DictionaryError, match=r"already defined in f0\.json"):
        _load(cs, cs)
    twice = {**cs, "concept": [{"code": "X"}, {"code": "X"}]}
    with pytest.raises(DictionaryError, match=r"concept\[1\]\.code 'X' is a duplicate"):
        _load(twice)


def test_refuses_value_set_on_unknown_system_or_filter() -> None:
    vs = {
        "resourceType": "ValueSet",
        "url": "urn:test:vs",
        "compose": {"include": [{"system": "urn:nobody"}]},
    }
    with pytest.raises(DictionaryError, match=r"include\[0\]\.system urn:nobody"):
        _load(vs)
    vs["compose"] = {"include": [{"system": ICD10, "filter": [{"op": "regex", "value": "F"}]}]}
    with pytest.raises(DictionaryError, match=r"filter\[0\] is not a supported filter"):
        _load(vs)


def test_gateway_start_refuses_an_invalid_dictionary(tmp_path: Path) -> None:
    from gateway.config import default_settings_for_tests
    from gateway.errors import ConfigurationError
    from gateway.runtime import Gateway

    bad = tmp_path / "dict"
    bad.mkdir()
    cm = _cmap(_el("A", {"code": "1", "equivalence": "nearly"}))
    (bad / "ConceptMap-bad.json").write_text(json.dumps(cm), "utf-8")
    settings = default_settings_for_tests(tmp_path / "gw", dictionary_dir=bad)
    with pytest.raises(ConfigurationError, match=r"ConceptMap-bad.json: .*equivalence 'nearly'"):
        Gateway(settings)


# ---------------------------------------------------------------- equivalence rules

RECORDED_OR_SILENT = (
    "equivalent",
    "equal",
    "wider",
    "narrower",
    "relatedto",
    "subsumes",
    "specializes",
)


def _every_equivalence() -> Terminology:
    targets = [
        {"code": f"{n}", "equivalence": eq} if eq != "unmatched" else {"equivalence": "unmatched"}
        for n, eq in enumerate(sorted(EQUIVALENCES))
    ]
    return _load(_cmap(_el("A", *targets), target=ICD10))


def test_only_equivalent_and_equal_translate_silently() -> None:
    t = _every_equivalence()
    by_eq = {m.equivalence: m for m in t.matches(SRC, "A")}
    assert set(by_eq) == EQUIVALENCES  # $translate sees every one
    mapped = t.mapped(SRC, "A")
    got = {c["code"]: c.get("extension", [{}])[0].get("valueCode") for c in mapped}
    expected = {
        by_eq[eq].target_code: (None if eq in ("equivalent", "equal") else eq)
        for eq in RECORDED_OR_SILENT
    }
    assert got == expected
    for c in mapped:
        for ext in c.get("extension", []):
            assert ext["url"] == EQUIVALENCE_URL
    for never in ("inexact", "unmatched", "disjoint"):
        assert by_eq[never].target_code not in got


def test_institution_keyed_maps_apply_to_their_institution_first() -> None:
    mine = _cmap(
        _el("A", {"code": "2345-7", "equivalence": "equivalent"}),
        extension=[{"url": SOURCE_INSTITUTION_URL, "valueString": "clinic-x"}],
    )
    everyone = _cmap(_el("A", {"code": "14749-6", "equivalence": "equivalent"}), url="urn:t:2")
    t = _load(mine, everyone)
    assert [c["code"] for c in t.translate(SRC, "A", "clinic-x")] == ["2345-7", "14749-6"]
    assert [c["code"] for c in t.translate(SRC, "A", "hosp-y")] == ["14749-6"]


# ---------------------------------------------------------------- $translate


def _params(out: dict[str, Any]) -> dict[str, list[Any]]:
    assert out["resourceType"] == "Parameters"
    got: dict[str, list[Any]] = {}
    for p in out["parameter"]:
        value = p.get("part") or next(v for k, v in p.items() if k.startswith("value"))
        got.setdefault(p["name"], []).append(value)
    return got


def _match(part: list[dict[str, Any]]) -> dict[str, Any]:
    return {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in part}


def test_translate_forward(term: Terminology) -> None:
    out = _params(ops.translate(term, {"system": [HOSP_T_LIS], "code": ["GLU"]}))
    assert out["result"] == [True]
    (match,) = [_match(m) for m in out["match"]]
    assert match["equivalence"] == "equivalent"
    assert match["concept"]["system"] == LOINC and match["concept"]["code"] == "14749-6"
    assert match["source"] == "urn:alliance:conceptmap:hosp-t-lis-to-loinc"


def test_translate_coding_and_codeable_concept_forms(term: Terminology) -> None:
    coding = {"system": CLINIC_E_LIS, "code": "1001"}
    a = ops.translate(term, {"coding": [coding]})
    b = ops.translate(term, {"codeableConcept": [{"coding": [coding]}]})
    assert a == b and _params(a)["result"] == [True]


def test_translate_reverse_finds_every_source(term: Terminology) -> None:
    out = _params(
        ops.translate(term, {"system": [LOINC], "code": ["14749-6"], "reverse": ["true"]})
    )
    sources = {
        (m["concept"]["system"], m["concept"]["code"], m["equivalence"])
        for m in map(_match, out["match"])
    }
    assert (HOSP_T_LIS, "GLU", "equivalent") in sources
    assert (CLINIC_E_LIS, "1001", "equivalent") in sources
    assert (CLINIC_E_LIS, "1090", "inexact") in sources
    # reverse with a target system restricts to it
    only = _params(
        ops.translate(
            term,
            {
                "system": [LOINC],
                "code": ["14749-6"],
                "reverse": ["true"],
                "targetsystem": [HOSP_T_LIS],
            },
        )
    )
    assert [_match(m)["concept"]["code"] for m in only["match"]] == ["GLU"]


def test_translate_reverse_turns_wider_into_narrower() -> None:
    t = _load(_cmap(_el("PANEL", {"code": "1742-6", "equivalence": "wider"})))
    out = _params(ops.translate(t, {"system": [LOINC], "code": ["1742-6"], "reverse": [True]}))
    assert _match(out["match"][0])["equivalence"] == "narrower"


def test_translate_no_match(term: Terminology) -> None:
    out = _params(ops.translate(term, {"system": [HOSP_T_LIS], "code": ["NOPE"]}))
    assert out["result"] == [False] and "match" not in out
    assert "no mapping" in out["message"][0]


def test_translate_several_matches() -> None:
    t = _load(
        _cmap(
            _el(
                "A",
                {"code": "2345-7", "equivalence": "equivalent"},
                {"code": "14749-6", "equivalence": "narrower"},
            )
        )
    )
    out = _params(ops.translate(t, {"system": [SRC], "code": ["A"]}))
    assert out["result"] == [True]
    assert [_match(m)["concept"]["code"] for m in out["match"]] == ["2345-7", "14749-6"]
    assert "2 matches" in out["message"][0]


@pytest.mark.parametrize("equivalence", sorted(EQUIVALENCES))
def test_translate_each_equivalence(equivalence: str) -> None:
    target = {"equivalence": equivalence}
    if equivalence != "unmatched":
        target["code"] = "2345-7"
    t = _load(_cmap(_el("A", target)))
    out = _params(ops.translate(t, {"system": [SRC], "code": ["A"]}))
    (match,) = map(_match, out["match"])
    assert match["equivalence"] == equivalence
    assert out["result"] == [equivalence not in ("unmatched", "disjoint")]
    assert ("concept" in match) == (equivalence != "unmatched")


def test_translate_parameter_errors(term: Terminology) -> None:
    with pytest.raises(ops.OperationError, match="system is required"):
        ops.translate(term, {"code": ["GLU"]})
    with pytest.raises(ops.OperationError, match="exactly one of"):
        ops.translate(term, {})
    with pytest.raises(ops.OperationError, match="given 2 times"):
        ops.translate(term, {"system": [LOINC, LOINC], "code": ["x"]})
    with pytest.raises(ops.OperationError, match="reverse must be true or false"):
        ops.translate(term, {"system": [LOINC], "code": ["x"], "reverse": ["maybe"]})


def test_translate_target_and_url_filters(term: Terminology) -> None:
    base = {"system": [ICPC2], "code": ["K86"]}
    assert _params(ops.translate(term, {**base, "targetsystem": [ICD10]}))["result"] == [True]
    assert _params(ops.translate(term, {**base, "targetsystem": [LOINC]}))["result"] == [False]
    url = "urn:alliance:conceptmap:icpc2-to-icd10"
    assert _params(ops.translate(term, {**base, "url": [url]}))["result"] == [True]
    assert _params(ops.translate(term, {**base, "url": ["urn:other"]}))["result"] == [False]


def test_params_from_posted_resource() -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "system", "valueUri": LOINC},
            {"name": "code", "valueCode": "x"},
            {"name": "reverse", "valueBoolean": True},
        ],
    }
    assert ops.params_from_resource(body) == {
        "system": [LOINC],
        "code": ["x"],
        "reverse": [True],
    }
    with pytest.raises(ops.OperationError):
        ops.params_from_resource({"resourceType": "Bundle"})


# ---------------------------------------------------------------- $lookup, $validate-code, search


def test_lookup_gives_display_and_chinese_designation(term: Terminology) -> None:
    out = _params(ops.lookup(term, {"system": [HOSP_T_LIS], "code": ["GLU"]}))
    assert out["display"] == ["Glucose"] and out["version"] == ["2026.2"]
    (designation,) = [_match(d) for d in out["designation"]]
    assert designation == {"language": "zh", "value": "葡萄糖"}
    loinc = _params(ops.lookup(term, {"system": [LOINC], "code": ["14749-6"]}))
    assert loinc["display"] == ["Glucose [Moles/volume] in Serum or Plasma"]
    with pytest.raises(ops.OperationError) as err:
        ops.lookup(term, {"system": [HOSP_T_LIS], "code": ["NOPE"]})
    assert err.value.status == 404


def test_validate_code_in_sensitive_value_sets(term: Terminology) -> None:
    url = "urn:alliance:valueset:sensitive-hiv"
    yes = _params(ops.validate_code(term, {"url": [url], "system": [ICD10], "code": ["B24"]}))
    assert yes["result"] == [True]
    no = _params(ops.validate_code(term, {"url": [url], "system": [ICD10], "code": ["I10"]}))
    assert no["result"] == [False] and "not in value set" in no["message"][0]
    with pytest.raises(ops.OperationError) as err:
        ops.validate_code(term, {"url": ["urn:nope"], "system": [ICD10], "code": ["B24"]})
    assert err.value.status == 404


def test_search_by_url_and_version(term: Terminology) -> None:
    url = "urn:alliance:conceptmap:icpc2-to-icd10"
    hit = ops.search(term, "ConceptMap", {"url": [url]})
    assert hit["total"] == 1 and hit["entry"][0]["resource"]["url"] == url
    assert ops.search(term, "ConceptMap", {"url": [url], "version": ["1999"]})["total"] == 0
    assert ops.search(term, "ConceptMap", {"url": [f"{url}|2026.2"]})["total"] == 1
    assert ops.search(term, "CodeSystem", {})["total"] >= 8
    with pytest.raises(ops.OperationError, match="not supported"):
        ops.search(term, "CodeSystem", {"name": ["x"]})
