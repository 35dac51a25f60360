"""Provenance of FHIR input, on both profiles: every FHIR REST write (a single resource, a
transaction or batch) stores a Provenance naming the versions it wrote, when, the
authenticated client (a Device by client id) and its institution, and the ledger leaves that
anchor them (the sender's receipts); it is searchable by ``Provenance?target=`` and holds no
patient data. (Its R4 validity: tests/gateway/test_fhir_conformance.py.)"""

from __future__ import annotations

import json
from typing import Any

import httpx

from gateway.fhir import CLIENT_ID_SYSTEM, INSTITUTION_SYSTEM, LEDGER_LEAF_SYSTEM
from tests.gateway.conftest import FHIR, demo_bundle

MASTER = "urn:oid:2.16.156.10011.1.19"


async def _provenance(client: httpx.AsyncClient, response: httpx.Response) -> dict[str, Any]:
    where = response.headers["X-Provenance"]
    assert where.startswith("Provenance/") and where.endswith("/_history/1"), where
    got = await client.get(f"/fhir/{where}")
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def _identifiers(prov: dict[str, Any]) -> dict[str, str]:
    out = {}
    for agent in prov["agent"]:
        for ref in (agent["who"], agent.get("onBehalfOf") or {}):
            if "identifier" in ref:
                code = agent["type"]["coding"][0]["code"]
                key = f"{code}:{ref['type']}"
                out[key] = ref["identifier"]["value"]
                assert ref["identifier"]["system"] in (CLIENT_ID_SYSTEM, INSTITUTION_SYSTEM)
    return out


async def test_single_write_has_a_provenance(client: httpx.AsyncClient) -> None:
    institution = client.app.state.gateway.settings.institution  # type: ignore[attr-defined]
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": MASTER, "value": "HC-PROV-1"}],
        "name": [{"family": "Testpatient"}],
    }
    created = await client.put("/fhir/Patient/pv1", content=json.dumps(patient), headers=FHIR)
    assert created.status_code == 201, created.text
    prov = await _provenance(client, created)
    assert prov["target"] == [{"reference": "Patient/pv1/_history/1"}]
    assert prov["recorded"].endswith("Z")
    assert prov["activity"]["coding"][0]["code"] == "CREATE"
    assert _identifiers(prov) == {
        "author:Device": "test-his",  # the client the token was issued to
        "author:Organization": institution,
        "custodian:Organization": institution,
    }
    leaf = created.headers["X-Ledger-Leaf-Index"]
    assert prov["entity"] == [
        {
            "role": "source",
            "what": {
                "identifier": {"system": LEDGER_LEAF_SYSTEM, "value": leaf},
                "display": "ledger receipt of the request",
            },
        }
    ]
    assert "HC-PROV-1" not in json.dumps(prov) and "Testpatient" not in json.dumps(prov)
    # an update names the new version
    updated = await client.put("/fhir/Patient/pv1", content=json.dumps(patient), headers=FHIR)
    prov2 = await _provenance(client, updated)
    assert prov2["target"] == [{"reference": "Patient/pv1/_history/2"}]
    assert prov2["activity"]["coding"][0]["code"] == "UPDATE"
    # searchable by target, with or without the version
    found = await client.get("/fhir/Provenance", params={"target": "Patient/pv1"})
    assert found.status_code == 200, found.text
    ids = {e["resource"]["id"] for e in found.json()["entry"]}
    assert ids == {prov["id"], prov2["id"]}
    found = await client.get("/fhir/Provenance", params={"target": "Patient/pv1/_history/2"})
    assert {e["resource"]["id"] for e in found.json()["entry"]} >= {prov2["id"]}
    bad = await client.get("/fhir/Provenance", params={"target": "pv1"})
    assert bad.status_code == 400
    # and as _revinclude of the resource it traces
    r = await client.get("/fhir/Patient", params={"_id": "pv1", "_revinclude": "Provenance:target"})
    assert r.status_code == 200, r.text
    included = {e["resource"]["id"] for e in r.json()["entry"] if e["search"]["mode"] == "include"}
    assert included == {prov["id"], prov2["id"]}


async def test_a_transaction_has_one_provenance_of_every_entry(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
    assert r.status_code == 200, r.text
    prov = await _provenance(client, r)
    locations = [e["response"]["location"] for e in r.json()["entry"]]
    assert [t["reference"] for t in prov["target"]] == locations
    leaves = {
        str(x["valueUnsignedInt"])
        for e in r.json()["entry"]
        for x in e["response"]["extension"][0]["extension"]
        if x["url"] == "leafIndex"
    }
    assert {e["what"]["identifier"]["value"] for e in prov["entity"]} == leaves
    assert prov["activity"]["text"] == "FHIR transaction"
    # Each stored record is traced to it.
    first = "/".join(locations[0].split("/")[:2])
    found = await client.get("/fhir/Provenance", params={"target": first})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [prov["id"]]
