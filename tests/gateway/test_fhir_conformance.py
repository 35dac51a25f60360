"""FHIR conformance of the API, on both profiles: what it serves back is valid R4 by the
reference validator (HAPI FHIR, tests/fhir_validator.py), real R4 resources from a public
package are stored or refused with a 4xx OperationOutcome (never a 5xx), and a resource type
that R4 does not have, contained ones included, is a 422.

Public data: the FHIR R4 examples (npm ``hl7.fhir.r4.examples`` 4.0.1) and the R4B examples
(``hl7.fhir.r4b.examples`` 4.3.0), fetched at test time (tests/fhir_packages.py).

Every API call here is in this one file, so that an authentication header can be added in one
place (``_put`` / ``_post`` / ``_get``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.fhir import SUPPORTED_TYPES
from tests.fhir_packages import R4_EXAMPLES, R4B_EXAMPLES, PackageUnavailable, examples
from tests.fhir_validator import ReferenceValidator, Result, describe
from tests.gateway.conftest import FHIR, demo_bundle

R4_TABLE = Path(__file__).resolve().parents[2] / "gateway" / "fhir_r4_elements.json"
RECEIPT_URL = "https://alliance.example/fhir/StructureDefinition/ledger-receipt"
#: Stored first, so that the resources referencing them can be linked to their patient.
FIRST = ("Patient", "Organization", "Practitioner")


def _package(spec: tuple[str, str]) -> dict[str, dict[str, Any]]:
    try:
        return examples(*spec)
    except PackageUnavailable as exc:
        if "1" in (os.environ.get("GATEWAY_REQUIRE_SERVICES"), os.environ.get("CI")):
            pytest.fail(f"public FHIR package {spec[0]} unavailable: {exc}")
        pytest.skip(f"public FHIR package {spec[0]} unavailable: {exc}")


@pytest.fixture(scope="module")
def r4_examples() -> list[dict[str, Any]]:
    """The R4 examples of the types this gateway stores, patients first."""
    found = [r for r in _package(R4_EXAMPLES).values() if r["resourceType"] in SUPPORTED_TYPES]
    order = {t: i for i, t in enumerate(FIRST)}
    return sorted(found, key=lambda r: order.get(r["resourceType"], len(FIRST)))


@pytest.fixture(scope="module")
def not_r4() -> list[dict[str, Any]]:
    """One R4B example of each resource type that R4 does not have (the difference is taken
    against the R4 StructureDefinitions, gateway/fhir_r4_elements.json)."""
    r4_types = set(json.loads(R4_TABLE.read_text("utf-8"))["resources"])
    by_type: dict[str, dict[str, Any]] = {}
    for resource in _package(R4B_EXAMPLES).values():
        if resource["resourceType"] not in r4_types:
            by_type.setdefault(resource["resourceType"], resource)
    return [by_type[t] for t in sorted(by_type)]


async def _put(client: httpx.AsyncClient, resource: dict[str, Any]) -> httpx.Response:
    path = f"/fhir/{resource['resourceType']}/{resource['id']}"
    return await client.put(path, content=json.dumps(resource), headers=FHIR)


async def _post(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    return await client.post(path, content=json.dumps(body), headers=FHIR)


async def _get(client: httpx.AsyncClient, path: str) -> httpx.Response:
    return await client.get(path)


def _errors(result: Result) -> set[tuple[str, str]]:
    return {(i.location, i.message) for i in result.errors}


async def test_what_the_api_serves_is_valid_r4(
    client: httpx.AsyncClient, reference_validator: ReferenceValidator
) -> None:
    """The transaction-response (receipts in entry.response), a single create's response
    (receipt in meta.extension), every read and the Provenance of each write: zero
    errors."""
    r = await _post(client, "/fhir", demo_bundle())
    assert r.status_code == 200, r.text
    served: list[dict[str, Any]] = [r.json()]
    assert served[0]["entry"][0]["response"]["extension"][0]["url"] == RECEIPT_URL
    locations = [e["response"]["location"] for e in served[0]["entry"]]
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs["subject"] = {"reference": "/".join(locations[0].split("/")[:2])}
    created = await _post(client, "/fhir/Observation", obs)
    assert created.status_code == 201, created.text
    assert created.json()["meta"]["extension"][0]["url"] == RECEIPT_URL
    served.append(created.json())
    for location in locations:
        got = await _get(client, "/fhir/" + "/".join(location.split("/")[:2]))
        assert got.status_code == 200
        served.append(got.json())
    # The Provenance of each write (the transaction's and the single create's).
    for where in (r.headers["X-Provenance"], created.headers["X-Provenance"]):
        got = await _get(client, f"/fhir/{where}")
        assert got.status_code == 200 and got.json()["resourceType"] == "Provenance"
        served.append(got.json())
    results = reference_validator.validate(served)
    assert len(results) == 4 + len(locations)
    bad = [res for res in results if res.errors]
    assert not bad, describe(bad)


async def test_r4_examples_are_stored_or_refused_never_5xx(
    client: httpx.AsyncClient,
    profile: str,
    r4_examples: list[dict[str, Any]],
    request: pytest.FixtureRequest,
) -> None:
    """Every R4 example of a stored type, sent as is with PUT: stored (201), or 422 when it
    names a patient this gateway does not have. A read gives the example back as sent; the
    PUT response (the example with its receipt in meta) has no error by the reference
    validator that the example itself does not have (checked on one profile: the served JSON
    does not depend on the backends, and the run over 480 resources takes a while)."""
    patients = {f"Patient/{r['id']}" for r in r4_examples if r["resourceType"] == "Patient"}
    stored: list[dict[str, Any]] = []
    responses: list[dict[str, Any]] = []
    refused = []
    for resource in r4_examples:
        r = await _put(client, resource)
        assert r.status_code < 500, (resource["resourceType"], resource["id"], r.text)
        if r.status_code == 201:
            stored.append(resource)
            responses.append(r.json())
            continue
        assert r.status_code == 422, (resource["resourceType"], resource["id"], r.text)
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "processing"
        refused.append(resource)
    # Refused only for a patient that is not here.
    for resource in refused:
        refs = [
            v.get("reference")
            for k in ("subject", "patient", "beneficiary")
            if isinstance(v := resource.get(k), dict)
        ]
        assert any(str(ref).startswith("Patient/") and ref not in patients for ref in refs), (
            resource["resourceType"],
            resource["id"],
        )
    assert len(stored) >= 200 and len(stored) + len(refused) == len(r4_examples)
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    for resource in stored:
        got = await _get(client, f"/fhir/{resource['resourceType']}/{resource['id']}")
        assert got.status_code == 200
        # The read is the example as sent with the unified dictionary applied (codings added
        # beside the originals, which are kept); the gateway sets meta only.
        mapped = gw.terminology.map(resource, source=gw.settings.institution).resource
        assert _no_meta(got.json()) == _no_meta(mapped)
    if profile != "embedded":
        return
    reference_validator: ReferenceValidator = request.getfixturevalue("reference_validator")
    # Not in the session's tally: the examples' own findings are not the gateway's.
    results = reference_validator.validate([*stored, *responses], tally=False)
    n = len(stored)
    originals, back = results[:n], results[n:]
    added = [
        f"{b.resource_type}/{b.id}: {sorted(_errors(b) - _errors(o))}"
        for o, b in zip(originals, back, strict=True)
        if _errors(b) - _errors(o)
    ]
    assert not added, "\n".join(added)


def _no_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


async def test_a_type_r4_does_not_have_is_422_even_contained(
    client: httpx.AsyncClient,
    r4_examples: list[dict[str, Any]],
    not_r4: list[dict[str, Any]],
) -> None:
    """R4 DiagnosticReports with a contained R4B resource (SubscriptionTopic, Citation ...):
    422 naming the contained resource's type, alone or in a transaction; nothing stored and the
    service stays up. The same R4B resources sent on their own: 422 too."""
    assert len(not_r4) >= 10  # R4B added 13 resource types
    reports = [r for r in r4_examples if r["resourceType"] == "DiagnosticReport"]
    for patient in (r for r in r4_examples if r["resourceType"] == "Patient"):
        assert (await _put(client, patient)).status_code == 201
    size = client.app.state.gateway.ledger.size  # type: ignore[attr-defined]
    for i, foreign in enumerate(not_r4):
        report = copy.deepcopy(reports[i % len(reports)])
        report["contained"] = [{**foreign, "id": "c1"}]
        for r in (
            await _put(client, report),
            await _post(
                client,
                "/fhir",
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [{"resource": report, "request": {"method": "POST", "url": "x"}}],
                },
            ),
        ):
            assert r.status_code == 422, r.text
            issues = r.json()["issue"]
            assert any(
                i["code"] == "not-supported"
                and i["expression"][0].endswith("contained[0].resourceType")
                for i in issues
            ), issues
        alone = await _post(client, f"/fhir/{foreign['resourceType']}", foreign)
        assert alone.status_code == 422, alone.text
    assert client.app.state.gateway.ledger.size == size  # type: ignore[attr-defined]
    assert (await _get(client, "/fhir/metadata")).status_code == 200


async def test_every_problem_is_reported_with_its_location(client: httpx.AsyncClient) -> None:
    obs = copy.deepcopy(demo_bundle()["entry"][1]["resource"])
    obs.pop("subject", None)
    obs["status"] = 7
    obs["effectiveDateTime"] = "2026-02-30"
    obs["code"]["coding"][0]["system"] = ["not", "a", "uri"]
    r = await _post(client, "/fhir/Observation", obs)
    assert r.status_code == 400, r.text
    where = {i["expression"][0] for i in r.json()["issue"]}
    assert {
        "Observation.status",
        "Observation.effectiveDateTime",
        "Observation.code.coding[0].system",
    } <= where
    # An element R4B added to an R4 type (ActivityDefinition.subjectCanonical): 422.
    ad: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    ad["extension"] = [{"url": "urn:x", "valueCodeableReference": {"concept": {"text": "x"}}}]
    r = await _post(client, "/fhir/Observation", ad)
    assert r.status_code == 422, r.text
    assert r.json()["issue"][0]["expression"] == ["Observation.extension[0].valueCodeableReference"]
