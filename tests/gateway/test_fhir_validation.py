"""Validation in the request path (gateway/fhir.py ``validate_resource``), pure unit tests:
every problem reported with its location, every resource type and element that FHIR R4 does
not have rejected with 422 (the lists derived mechanically: the R4B models of fhir.resources
against the R4 StructureDefinitions in gateway/fhir_r4_elements.json), and no input, however
malformed, ends in anything but a 4xx OperationOutcome.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import pkgutil
from pathlib import Path
from typing import Any

import fhir.resources.R4B as r4b
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import outcome_for
from gateway.errors import InvalidInputError
from gateway.fhir import prepare_bundle, r4_issues, validate_resource
from tests.fhir_validator import ValidatorUnavailable, validator_home
from tests.gateway.conftest import demo_bundle

R4 = json.loads(
    (Path(__file__).resolve().parents[2] / "gateway" / "fhir_r4_elements.json").read_text("utf-8")
)
CONTEXTS: dict[str, dict[str, str]] = R4["contexts"]
SKIP_KEYS = {"resourceType", "fhir_comments", "resource_type"}


def _r4b_resource_types() -> set[str]:
    out = set()
    for info in pkgutil.iter_modules(r4b.__path__):
        try:
            module = importlib.import_module(f"fhir.resources.R4B.{info.name}")
        except ImportError:
            continue
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, Resource)
                and value.__module__ == module.__name__
                and name.lower() == info.name
            ):
                out.add(name)
    return out - {"Resource", "DomainResource"}


#: Resource types R4B has and R4 does not (13: SubscriptionTopic, Citation, Ingredient ...).
R4B_ONLY_TYPES = sorted(_r4b_resource_types() - set(R4["resources"]))


def _r4b_only_elements() -> list[tuple[str, str]]:
    """(R4 type, element) for every element the R4B model of an R4 type has and R4 does not
    (ActivityDefinition.subjectCanonical, Extension.valueCodeableReference ...)."""
    out = []
    for name in sorted(k for k in CONTEXTS if "." not in k):
        try:
            model = get_fhir_model_class(name)
        except (KeyError, ValueError):
            continue  # an R4 type R4B dropped: rejected as a whole
        keys = {f.alias or k for k, f in model.model_fields.items()}
        for key in sorted(keys - set(CONTEXTS[name]) - SKIP_KEYS):
            if not key.startswith("_") and not key.endswith("__ext"):
                out.append((name, key))
    return out


R4B_ONLY_ELEMENTS = _r4b_only_elements()


def _placed(type_name: str, key: str) -> tuple[dict[str, Any], str]:
    """A resource with element ``key`` set inside a ``type_name``, and that element's path."""
    if type_name in R4["resources"]:
        return {"resourceType": type_name, key: "x"}, f"{type_name}.{key}"
    # A datatype: under the first element of that type in some resource.
    for context, keys in CONTEXTS.items():
        root = context.split(".")[0]
        if root not in R4["resources"]:
            continue
        for element, child in keys.items():
            if child == type_name:
                resource: dict[str, Any] = {"resourceType": root}
                node = resource
                for part in [*context.split(".")[1:], element]:
                    node[part] = {}
                    node = node[part]
                node[key] = "x"
                return resource, f"{context}.{element}.{key}"
    raise AssertionError(f"{type_name} is used nowhere")


def test_the_r4_table_is_what_the_generator_makes_from_hapi() -> None:
    """gateway/fhir_r4_elements.json is scripts/gen_fhir_r4_elements.py's output over the R4
    StructureDefinitions in the reference validator's build, unedited."""
    try:
        home = validator_home()
    except ValidatorUnavailable as exc:
        if "1" in (os.environ.get("GATEWAY_REQUIRE_SERVICES"), os.environ.get("CI")):
            pytest.fail(f"the reference validator build is required: {exc}")
        pytest.skip(f"no reference validator build: {exc}")
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "gen_fhir_r4_elements", root / "scripts" / "gen_fhir_r4_elements.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    (jar,) = sorted((home / "lib").glob("hapi-fhir-validation-resources-r4-*.jar"))
    assert json.loads(json.dumps(gen.build(jar))) == R4


def test_the_differences_are_found() -> None:
    assert len(R4B_ONLY_TYPES) == 13
    assert {"SubscriptionTopic", "Citation", "NutritionProduct", "Ingredient"} <= set(
        R4B_ONLY_TYPES
    )
    assert ("ActivityDefinition", "subjectCanonical") in R4B_ONLY_ELEMENTS
    assert ("Extension", "valueCodeableReference") in R4B_ONLY_ELEMENTS


def _reject(resource: Any, where: str = "X") -> tuple[int, list[dict[str, Any]]]:
    with pytest.raises(InvalidInputError) as info:
        validate_resource(resource, where=where)
    status, outcome = outcome_for(info.value)
    issues: list[dict[str, Any]] = outcome["issue"]  # type: ignore[assignment]
    return status, issues


@pytest.mark.parametrize("rtype", R4B_ONLY_TYPES)
def test_r4b_only_type_is_422_alone_contained_and_in_a_bundle(rtype: str) -> None:
    status, issues = _reject({"resourceType": rtype, "id": "a"}, rtype)
    assert status == 422 and issues[0]["code"] == "not-supported"
    assert issues[0]["expression"] == [f"{rtype}.resourceType"]
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "x"},
        "contained": [
            {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "y"}},
            {"resourceType": rtype, "id": "c"},
        ],
    }
    status, issues = _reject(report, "DiagnosticReport")
    assert status == 422
    assert issues[0]["expression"] == ["DiagnosticReport.contained[1].resourceType"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": report, "request": {"method": "POST", "url": "DiagnosticReport"}}],
    }
    with pytest.raises(InvalidInputError) as info:
        prepare_bundle(bundle, max_entries=10)
    assert outcome_for(info.value)[0] == 422


@pytest.mark.parametrize(("type_name", "key"), R4B_ONLY_ELEMENTS, ids=lambda v: str(v))
def test_r4b_only_element_is_422(type_name: str, key: str) -> None:
    resource, path = _placed(type_name, key)
    status, issues = _reject(resource, resource["resourceType"])
    assert status == 422
    assert [path] in [i.get("expression") for i in issues], issues


def test_valid_resources_pass_and_the_r4_walk_is_silent() -> None:
    for entry in demo_bundle()["entry"]:
        resource = entry["resource"]
        assert validate_resource(resource, where="X") == resource["resourceType"]
        assert r4_issues(resource, where="X") == []
    # A primitive's extension (``_status``) and a contained R4 resource are R4.
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs["_status"] = {"extension": [{"url": "urn:x", "valueString": "y"}]}
    obs["contained"] = [{"resourceType": "Specimen", "id": "s"}]
    assert validate_resource(obs, where="X") == "Observation"


def test_every_problem_has_its_own_issue() -> None:
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs["status"] = 7
    obs["effectiveDateTime"] = "2026-13-01"
    obs["valueQuantity"]["value"] = "many"
    obs["colour"] = "red"
    status, issues = _reject(obs, "Bundle.entry[1].resource")
    where = [i["expression"][0] for i in issues]
    assert status == 422  # colour is not in R4
    assert set(where) >= {
        "Bundle.entry[1].resource.status",
        "Bundle.entry[1].resource.effectiveDateTime",
        "Bundle.entry[1].resource.valueQuantity.value",
        "Bundle.entry[1].resource.colour",
    }
    assert len(where) == len(set(where))  # one issue per place
    del obs["colour"]
    status, issues = _reject(obs, "Observation")
    assert status == 400 and len(issues) == 3


def test_issues_are_capped() -> None:
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs["note"] = [{"text": i} for i in range(500)]  # 500 non-strings
    status, issues = _reject(obs, "Observation")
    assert status == 400 and len(issues) == 100
    assert issues[-1]["diagnostics"] == "401 more problems not listed"


# ------------------------------------------------------------------ fuzz: never a 5xx

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "resourceType",
                    "id",
                    "status",
                    "code",
                    "contained",
                    "extension",
                    "_status",
                    "valueQuantity",
                    "subject",
                    "coding",
                    "url",
                    "value",
                    "x",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)
TYPES = st.sampled_from(["Observation", "Patient", "DiagnosticReport", "Citation", "Foo", ""])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _check(resource: Any) -> None:
    try:
        validate_resource(resource, where="X")
    except InvalidInputError as exc:
        status, outcome = outcome_for(exc)
        assert 400 <= status < 500
        issues = outcome["issue"]
        assert isinstance(issues, list) and issues
        assert all(i["diagnostics"] for i in issues)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=TYPES, body=st.dictionaries(st.text(max_size=6), JSON, max_size=6))
def test_fuzz_random_resources_never_5xx(rtype: str, body: dict[str, Any]) -> None:
    _check({**body, "resourceType": rtype})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=JSON)
def test_fuzz_mutated_valid_resources_never_5xx(data: st.DataObject, value: Any) -> None:
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs["contained"] = [{"resourceType": "Specimen", "id": "s", "type": {"text": "blood"}}]
    path = data.draw(st.sampled_from(_paths(obs)[1:]))
    node: Any = obs
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    _check(obs)
