"""Conditional writes on both profiles (SQLite embedded, PostgreSQL and Redis for
production): ``If-None-Exist`` on create and in transaction/batch entries, conditional update
``PUT /fhir/{type}?identifier=``, ``If-Match`` on PUT and DELETE, with HAPI FHIR's answers
(200 and no write for a match, 412 for several matches or a stale version); ten concurrent
conditional creates (one gateway, and two processes of one gateway) make one resource; a
conditional transaction re-sent ten times creates each resource once."""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.conditional import (
    WriteLocks,
    condition_key,
    parse_condition,
    parse_if_match,
)
from gateway.errors import InvalidInputError
from tests.gateway.conftest import FHIR
from tests.gateway.test_records import _clients, _shared

MASTER = "urn:oid:2.16.156.10011.1.19"
LAB = "urn:lab:result-id"
LOINC = "http://loinc.org"


def _patient(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MASTER, "value": value}],
        "name": [{"family": "Testpatient"}],
        **extra,
    }


def _obs(value: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": LAB, "value": value}],
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "718-7"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 13.2, "unit": "g/dL"},
    }


async def _total(client: httpx.AsyncClient, url: str) -> int:
    r = await client.get(f"/fhir/{url}")
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


async def _create(
    client: httpx.AsyncClient, resource: dict[str, Any], condition: str
) -> httpx.Response:
    return await client.post(
        f"/fhir/{resource['resourceType']}",
        content=json.dumps(resource),
        headers={**FHIR, "If-None-Exist": condition},
    )


def _leaves(client: httpx.AsyncClient) -> int:
    """The ``record`` leaves of clinical records on the ledger (the access log's ``access``
    leaves and containers are not: an authenticated read or match is logged)."""
    return int(client.app.state.gateway.index.leaf_kinds["record"])  # type: ignore[attr-defined]


# ---- pure parts ------------------------------------------------------------------------------


def test_conditions_and_etags_parse() -> None:
    assert parse_condition("Patient", "identifier=a|b", where="x") == [("identifier", "a|b")]
    assert parse_condition("Patient", "Patient?identifier=a%7Cb", where="x") == [
        ("identifier", "a|b")
    ]
    assert parse_condition("Patient", "?identifier=a&_count=1", where="x") == [("identifier", "a")]
    for bad in ("", "identifier", "identifier=", "Observation?identifier=a", "&&", "=x"):
        with pytest.raises(InvalidInputError):
            parse_condition("Patient", bad, where="If-None-Exist")
    key = condition_key("inst", "Patient", [("identifier", "a"), ("_id", "b")])
    assert key == condition_key("inst", "Patient", [("_id", "b"), ("identifier", "a")])
    assert key != condition_key("other", "Patient", [("identifier", "a"), ("_id", "b")])
    assert parse_if_match('W/"3"') == 3
    assert parse_if_match('"12"') == 12
    assert parse_if_match("7") == 7
    for bad in ('W/"x"', "", 'W/"0"', "*", 'W/"1", W/"2"'):
        with pytest.raises(InvalidInputError):
            parse_if_match(bad)


async def test_locks_serialise_one_key_and_not_others() -> None:
    locks = WriteLocks(None, wait=5.0)
    order: list[str] = []

    async def hold(name: str, keys: list[str]) -> None:
        async with locks.hold(keys):
            order.append(f"in-{name}")
            await asyncio.sleep(0.02)
            order.append(f"out-{name}")

    await asyncio.gather(hold("a", ["k1"]), hold("b", ["k1", "k2"]), hold("c", ["k3"]))
    # a and b share k1: one runs entirely before the other; c overlaps freely
    ia, oa, ib, ob = (order.index(x) for x in ("in-a", "out-a", "in-b", "out-b"))
    assert oa < ib or ob < ia
    assert not locks._local  # every per-key lock was dropped when released


# ---- If-None-Exist on create -------------------------------------------------------------


async def test_if_none_exist_creates_once_then_answers_the_match(
    client: httpx.AsyncClient,
) -> None:
    first = await _create(client, _patient("HC-C1"), f"identifier={MASTER}|HC-C1")
    assert first.status_code == 201, first.text
    pid = first.json()["id"]
    before = _leaves(client)
    again = await _create(client, _patient("HC-C1"), f"identifier={MASTER}|HC-C1")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == pid and again.json()["meta"]["versionId"] == "1"
    assert again.headers["ETag"] == 'W/"1"'
    assert again.headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert _leaves(client) == before  # nothing written
    assert await _total(client, f"Patient?identifier={MASTER}|HC-C1") == 1
    # the type prefix form of the header, and a condition on another parameter
    same = await _create(client, _patient("HC-C1"), f"Patient?_id={pid}")
    assert same.status_code == 200 and same.json()["id"] == pid


async def test_if_none_exist_with_several_matches_is_412(client: httpx.AsyncClient) -> None:
    for pid in ("dup-1", "dup-2"):
        r = await client.put(
            f"/fhir/Patient/{pid}", content=json.dumps(_patient("HC-DUP")), headers=FHIR
        )
        assert r.status_code == 201, r.text
    r = await _create(client, _patient("HC-DUP"), f"identifier={MASTER}|HC-DUP")
    assert r.status_code == 412, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _total(client, f"Patient?identifier={MASTER}|HC-DUP") == 2


async def test_malformed_conditions_are_400(client: httpx.AsyncClient) -> None:
    for condition in ("identifier", "name=Testpatient", "foo=bar", "Observation?_id=x"):
        r = await _create(client, _patient("HC-BAD"), condition)
        assert r.status_code == 400, (condition, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    assert await _total(client, f"Patient?identifier={MASTER}|HC-BAD") == 0


async def test_ten_concurrent_conditional_creates_make_one_resource(
    client: httpx.AsyncClient,
) -> None:
    answers = await asyncio.gather(
        *(_create(client, _patient("HC-RACE"), f"identifier={MASTER}|HC-RACE") for _ in range(10))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 9 + [201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert await _total(client, f"Patient?identifier={MASTER}|HC-RACE") == 1


@pytest.mark.services
async def test_two_processes_of_one_gateway_make_one_resource(
    services: Any, tmp_path: Path
) -> None:
    """Ten conditional creates of one identifier, alternating between two processes of one
    institution (one stream, one Redis, one PostgreSQL index): one resource."""
    settings = _shared(tmp_path, services, ["c1", "c2"], same_institution=True)
    async with AsyncExitStack() as stack:
        one, two = await _clients(stack, settings)
        value = f"HC-2P-{uuid.uuid4().hex[:6]}"
        answers = await asyncio.gather(
            *(
                _create((one, two)[i % 2], _patient(value), f"identifier={MASTER}|{value}")
                for i in range(10)
            )
        )
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 9 + [201], [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        for c in (one, two):
            assert await _total(c, f"Patient?identifier={MASTER}|{value}") == 1


# ---- conditional update ------------------------------------------------------------------


async def test_conditional_update(client: httpx.AsyncClient) -> None:
    url = f"/fhir/Patient?identifier={MASTER}|HC-U1"
    created = await client.put(url, content=json.dumps(_patient("HC-U1")), headers=FHIR)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    updated = await client.put(
        url, content=json.dumps(_patient("HC-U1", gender="female")), headers=FHIR
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == pid and updated.json()["meta"]["versionId"] == "2"
    got = await client.get(f"/fhir/Patient/{pid}")
    assert got.json()["gender"] == "female"
    # the body's id must be the matched one
    r = await client.put(url, content=json.dumps(_patient("HC-U1", id="other")), headers=FHIR)
    assert r.status_code == 400, r.text
    # no match and the body names an id: created with it; an id that exists is 409
    r = await client.put(
        f"/fhir/Patient?identifier={MASTER}|HC-U2",
        content=json.dumps(_patient("HC-U2", id="u2")),
        headers=FHIR,
    )
    assert r.status_code == 201 and r.json()["id"] == "u2", r.text
    r = await client.put(
        f"/fhir/Patient?identifier={MASTER}|HC-U3",
        content=json.dumps(_patient("HC-U3", id="u2")),
        headers=FHIR,
    )
    assert r.status_code == 409, r.text
    # several matches: 412; no condition at all: 400
    for pid2 in ("ud-1", "ud-2"):
        await client.put(
            f"/fhir/Patient/{pid2}", content=json.dumps(_patient("HC-UD")), headers=FHIR
        )
    r = await client.put(
        f"/fhir/Patient?identifier={MASTER}|HC-UD",
        content=json.dumps(_patient("HC-UD")),
        headers=FHIR,
    )
    assert r.status_code == 412, r.text
    r = await client.put("/fhir/Patient", content=json.dumps(_patient("HC-U4")), headers=FHIR)
    assert r.status_code == 400, r.text


# ---- If-Match ----------------------------------------------------------------------------


async def test_if_match_on_put_and_delete(client: httpx.AsyncClient) -> None:
    body = json.dumps(_patient("HC-M1"))
    assert (await client.put("/fhir/Patient/m1", content=body, headers=FHIR)).status_code == 201
    ok = await client.put("/fhir/Patient/m1", content=body, headers={**FHIR, "If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["ETag"] == 'W/"2"', ok.text
    stale = await client.put(
        "/fhir/Patient/m1", content=body, headers={**FHIR, "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412, stale.text
    assert stale.json()["resourceType"] == "OperationOutcome"
    bad = await client.put("/fhir/Patient/m1", content=body, headers={**FHIR, "If-Match": "x"})
    assert bad.status_code == 400
    missing = await client.put(
        "/fhir/Patient/m-none", content=body, headers={**FHIR, "If-Match": 'W/"1"'}
    )
    assert missing.status_code == 412
    r = await client.delete("/fhir/Patient/m1", headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert (await client.get("/fhir/Patient/m1")).status_code == 200
    r = await client.delete("/fhir/Patient/m1", headers={"If-Match": 'W/"2"'})
    assert r.status_code == 204
    assert (await client.get("/fhir/Patient/m1")).status_code == 410


async def test_concurrent_if_match_updates_one_wins(client: httpx.AsyncClient) -> None:
    body = json.dumps(_patient("HC-M2"))
    assert (await client.put("/fhir/Patient/m2", content=body, headers=FHIR)).status_code == 201
    answers = await asyncio.gather(
        *(
            client.put("/fhir/Patient/m2", content=body, headers={**FHIR, "If-Match": 'W/"1"'})
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in answers) == [200] + [412] * 4
    got = await client.get("/fhir/Patient/m2")
    assert got.json()["meta"]["versionId"] == "2"


# ---- transactions and batches ------------------------------------------------------------


def _conditional_transaction(patient_value: str, obs_values: list[str]) -> dict[str, Any]:
    purl = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": purl,
            "resource": _patient(patient_value),
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={MASTER}|{patient_value}",
            },
        }
    ]
    for v in obs_values:
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": _obs(v, purl),
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={LAB}|{v}",
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def test_conditional_transaction_resent_ten_times_creates_once(
    client: httpx.AsyncClient,
) -> None:
    bundle = _conditional_transaction("HC-T1", ["R-1", "R-2"])
    locations: list[list[str]] = []
    for i in range(10):
        r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
        assert r.status_code == 200, r.text
        statuses = [e["response"]["status"] for e in r.json()["entry"]]
        assert statuses == (["201 Created"] * 3 if i == 0 else ["200 OK"] * 3), statuses
        locations.append([e["response"]["location"] for e in r.json()["entry"]])
        if i == 0:
            after_first = _leaves(client)
    assert all(loc == locations[0] for loc in locations)
    assert _leaves(client) == after_first  # the re-sends wrote nothing
    pid = locations[0][0].split("/")[1]
    assert await _total(client, f"Patient?identifier={MASTER}|HC-T1") == 1
    assert await _total(client, f"Observation?patient={pid}") == 2
    # A new result in the same shape: the urn:uuid of the matched Patient resolves to it.
    r = await client.post(
        "/fhir",
        content=json.dumps(_conditional_transaction("HC-T1", ["R-1", "R-3"])),
        headers=FHIR,
    )
    assert r.status_code == 200, r.text
    assert [e["response"]["status"] for e in r.json()["entry"]] == [
        "200 OK",
        "200 OK",
        "201 Created",
    ]
    new_obs = r.json()["entry"][2]["response"]["location"].split("/")[1]
    got = await client.get(f"/fhir/Observation/{new_obs}")
    assert got.json()["subject"]["reference"] == f"Patient/{pid}"
    assert await _total(client, f"Observation?patient={pid}") == 3


async def test_ten_concurrent_conditional_transactions(client: httpx.AsyncClient) -> None:
    bundle = json.dumps(_conditional_transaction("HC-T2", ["R-21"]))
    answers = await asyncio.gather(
        *(client.post("/fhir", content=bundle, headers=FHIR) for _ in range(10))
    )
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    created = [
        e["response"]["status"]
        for r in answers
        for e in r.json()["entry"]
        if "201" in e["response"]["status"]
    ]
    assert len(created) == 2
    assert await _total(client, f"Patient?identifier={MASTER}|HC-T2") == 1
    assert await _total(client, f"Observation?identifier={LAB}|R-21") == 1


async def test_batch_entry_with_several_matches_is_412_the_rest_stored(
    client: httpx.AsyncClient,
) -> None:
    for pid in ("bd-1", "bd-2"):
        await client.put(
            f"/fhir/Patient/{pid}", content=json.dumps(_patient("HC-BD")), headers=FHIR
        )
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": _patient("HC-BD"),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={MASTER}|HC-BD",
                },
            },
            {
                "resource": _patient("HC-B2"),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={MASTER}|HC-B2",
                },
            },
            {
                "resource": _patient("HC-B3"),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": "nonsense"},
            },
        ],
    }
    r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["412 Precondition Failed", "201 Created", "400 Bad Request"]
    # the same as a transaction: all or nothing
    bundle["type"] = "transaction"
    bundle["entry"] = bundle["entry"][:2]
    r = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 412, r.text


async def test_capability_statement_declares_conditional_support(
    client: httpx.AsyncClient,
) -> None:
    cs = (await client.get("/fhir/metadata")).json()
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    patient = by_type["Patient"]
    assert patient["conditionalCreate"] is True and patient["conditionalUpdate"] is True
    assert patient["versioning"] == "versioned-update"
    assert patient["conditionalDelete"] == "not-supported"
    assert by_type["Binary"]["conditionalCreate"] is False  # not searchable: no conditions
