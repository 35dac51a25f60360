"""The FHIR record pipeline end to end, on both profiles: round trip, receipts, bad input."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from gateway.demo import check_receipt, receipt_of
from ledger.merkle import leaf_hash
from tests.gateway.conftest import FHIR, demo_bundle


def _strip(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


async def _leaf(client: httpx.AsyncClient, index: int) -> bytes:
    r = await client.get("/ledger/leaves", params={"start": index, "end": index + 1})
    assert r.status_code == 200
    return base64.b64decode(r.json()["leaves"][0])


async def test_transaction_round_trip_with_receipts(client: httpx.AsyncClient) -> None:
    bundle = demo_bundle()
    r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "transaction-response"
    assert len(out["entry"]) == len(bundle["entry"])
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    locations = []
    for sent, entry in zip(bundle["entry"], out["entry"], strict=True):
        resp = entry["response"]
        assert resp["status"] == "201 Created"
        receipt = receipt_of(resp)
        check_receipt(receipt, leaf_hash(await _leaf(client, receipt["leafIndex"])), gw.trusted)
        rtype, rid = resp["location"].split("/")[:2]
        locations.append(f"{rtype}/{rid}")
        back = await client.get(f"/fhir/{rtype}/{rid}")
        assert back.status_code == 200
        got = back.json()
        assert got["id"] == rid and got["meta"]["versionId"] == "1"
        expected = _strip(sent["resource"])
        if "subject" in expected:
            expected["subject"] = {"reference": locations[0]}
        assert _strip(got) == expected
    # The Chinese name survived unchanged.
    patient = (await client.get(f"/fhir/{locations[0]}")).json()
    assert patient["name"][0]["text"] == "王秀英"


async def test_single_create_update_and_versions(client: httpx.AsyncClient) -> None:
    patient = demo_bundle()["entry"][0]["resource"]
    r = await client.put("/fhir/Patient/p-1", content=json.dumps(patient), headers=FHIR)
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == 'W/"1"'
    patient["gender"] = "other"
    r2 = await client.put("/fhir/Patient/p-1", content=json.dumps(patient), headers=FHIR)
    assert r2.status_code == 200
    assert r2.headers["etag"] == 'W/"2"'
    assert int(r2.headers["x-ledger-leaf-index"]) > int(r.headers["x-ledger-leaf-index"])
    got = (await client.get("/fhir/Patient/p-1")).json()
    assert got["gender"] == "other" and got["meta"]["versionId"] == "2"
    obs = demo_bundle()["entry"][1]["resource"]
    obs["subject"] = {"reference": "Patient/p-1"}
    r3 = await client.post("/fhir/Observation", content=json.dumps(obs), headers=FHIR)
    assert r3.status_code == 201
    assert r3.headers["location"].startswith("http://gw/fhir/Observation/")


def _outcome(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    issue: dict[str, Any] = body["issue"][0]
    return issue


async def test_bad_input_gets_operation_outcome_and_service_stays_up(
    client: httpx.AsyncClient,
) -> None:
    size_before = client.app.state.gateway.ledger.size  # type: ignore[attr-defined]
    r = await client.post("/fhir", content=b'{"resourceType": "Bundle", "type": ', headers=FHIR)
    assert r.status_code == 400 and "malformed JSON" in _outcome(r)["diagnostics"]

    r = await client.post("/fhir", content=json.dumps({"resourceType": "Patientx"}), headers=FHIR)
    assert r.status_code == 400 and _outcome(r)["expression"] == ["Bundle.resourceType"]

    obs = demo_bundle()["entry"][1]["resource"]
    obs["subject"] = {"identifier": {"system": "urn:x", "value": "1"}}
    r = await client.post(
        "/fhir/Observation", content=json.dumps({**obs, "resourceType": "Foo"}), headers=FHIR
    )
    assert r.status_code == 422 and _outcome(r)["code"] == "not-supported"

    r = await client.post("/fhir/Patient", content=json.dumps(obs), headers=FHIR)
    assert r.status_code == 400 and "does not match" in _outcome(r)["diagnostics"]

    bundle = demo_bundle()
    bundle["entry"][2]["resource"]["effectiveDateTime"] = "2026-02-30T99:00:00"
    r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 400
    assert _outcome(r)["expression"] == ["Bundle.entry[2].resource.effectiveDateTime"]

    big = b'{"resourceType":"Patient","text":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = await client.post("/fhir/Patient", content=big, headers=FHIR)
    assert r.status_code == 413 and _outcome(r)["code"] == "too-costly"

    many = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Basic", "code": {"text": "x"}},
                "request": {"method": "POST", "url": "Basic"},
            }
            for _ in range(10_000)
        ],
    }
    r = await client.post("/fhir", content=json.dumps(many), headers=FHIR)
    assert r.status_code == 413 and _outcome(r)["expression"] == ["Bundle.entry"]

    r = await client.post(
        "/fhir", content=b"<Bundle/>", headers={"content-type": "application/xml"}
    )
    assert r.status_code == 415

    r = await client.get("/fhir/Patient/does-not-exist")
    assert r.status_code == 404 and _outcome(r)["code"] == "not-found"

    obs = demo_bundle()["entry"][1]["resource"]
    obs["subject"] = {"reference": "Patient/unknown-here"}
    r = await client.post("/fhir/Observation", content=json.dumps(obs), headers=FHIR)
    assert r.status_code == 422 and _outcome(r)["code"] == "processing"

    # Still serving, and nothing was stored by the failed requests.
    assert (await client.get("/fhir/metadata")).status_code == 200
    assert client.app.state.gateway.ledger.size == size_before  # type: ignore[attr-defined]


async def test_batch_answers_per_entry(client: httpx.AsyncClient) -> None:
    bundle = demo_bundle()
    bundle["type"] = "batch"
    bundle["entry"][2]["resource"]["effectiveDateTime"] = "2026-02-30T99:00:00"
    kinds = client.app.state.gateway.index.leaf_kinds  # type: ignore[attr-defined]
    records_before = kinds["record"]
    r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == [
        "201 Created",
        "201 Created",
        "400 Bad Request",
        "201 Created",
        "201 Created",
    ]
    bad = r.json()["entry"][2]["response"]["outcome"]["issue"][0]
    assert bad["expression"] == ["Bundle.entry[2].resource.effectiveDateTime"]
    # four records and the Provenance of the request (beside them, the access log's leaves)
    assert kinds["record"] == records_before + 5


async def test_capability_statement_and_ops(client: httpx.AsyncClient) -> None:
    cap = (await client.get("/fhir/metadata")).json()
    assert cap["fhirVersion"] == "4.0.1"
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
    metrics = (await client.get("/metrics")).text
    assert 'gateway_records_stored_total{type="Observation"} 4.0' in metrics
    size = client.app.state.gateway.ledger.size  # type: ignore[attr-defined]
    assert f"gateway_ledger_size {size:.1f}" in metrics


@pytest.mark.parametrize("bad", [{"index": 99}, {"tree_size": 0}, {"leaf_hash": "zz"}])
async def test_ledger_proof_errors(client: httpx.AsyncClient, bad: dict[str, Any]) -> None:
    await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
    r = await client.get("/ledger/proof/inclusion", params=bad)
    assert r.status_code == 400
