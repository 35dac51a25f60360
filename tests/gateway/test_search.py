"""FHIR search on both profiles (SQLite embedded, real PostgreSQL for production): every
parameter and modifier against stored data, _include/_revinclude, _sort, _summary=count,
keyset paging (also while writers add and update matches), signed caller-bound cursors,
unknown parameters, POST _search, $everything, find() and the rebuild from the ledger."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from gateway.access import PERMIT, AccessDecision, AccessDeniedError, AccessRequest, SearchFilter
from gateway.app import create_app
from gateway.cli import app as cli_app
from gateway.errors import InvalidInputError
from gateway.search import SearchService, search_params_of
from tests.gateway.conftest import FHIR, auth_headers, settings_for

MASTER = "urn:oid:2.16.156.10011.1.19"
LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"


def _patient(pid: str, *idents: tuple[str | None, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [({"system": s} if s else {}) | {"value": v} for s, v in idents],
        "name": [{"family": "Testpatient"}],
    }


def _obs(
    oid: str,
    patient: str,
    code: tuple[str, str],
    *,
    category: str | None = "laboratory",
    date: str | None = None,
    status: str = "final",
    encounter: str | None = None,
    based_on: str | None = None,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": code[0], "code": code[1]}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if category:
        r["category"] = [{"coding": [{"system": OBS_CAT, "code": category}]}]
    if date:
        r["effectiveDateTime"] = date
    if encounter:
        r["encounter"] = {"reference": f"Encounter/{encounter}"}
    if based_on:
        r["basedOn"] = [{"reference": f"ServiceRequest/{based_on}"}]
    return r


DATA: list[dict[str, Any]] = [
    _patient("p1", (MASTER, "HC-1"), ("urn:mrn", "M1")),
    _patient("p2", (MASTER, "HC-2")),
    _patient("p3", (None, "LOOSE-9")),
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2024-03-01T07:00:00Z", "end": "2024-03-01T09:00:00Z"},
    },
    {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": "718-7"}]},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2024-02-28",
    },
    _obs("o1", "p1", (LOINC, "718-7"), date="2024-03-01T08:00:00Z", encounter="e1", based_on="sr1"),
    _obs("o2", "p1", (LOINC, "6690-2"), date="2024-03-05"),
    _obs(
        "o3",
        "p1",
        (LOINC, "8867-4"),
        category="vital-signs",
        date="2023-12-30T10:00:00Z",
        status="preliminary",
    ),
    _obs("o4", "p2", (LOINC, "718-7"), date="2024-03", status="amended"),
    _obs("o5", "p2", ("urn:local", "X1"), category=None),
    {
        "resourceType": "DiagnosticReport",
        "id": "d1",
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": "58410-2"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-03-01",
        "result": [{"reference": "Observation/o1"}, {"reference": "Observation/o2"}],
    },
]

CASES: list[tuple[str, set[str]]] = [
    ("Observation?_id=o1,o3", {"o1", "o3"}),
    ("Observation?patient=p1", {"o1", "o2", "o3"}),
    ("Observation?patient=Patient/p2", {"o4", "o5"}),
    ("Observation?subject=Patient/p1", {"o1", "o2", "o3"}),
    ("Observation?patient=nobody", set()),
    (f"Observation?code={LOINC}|718-7", {"o1", "o4"}),
    ("Observation?code=718-7", {"o1", "o4"}),
    ("Observation?code=|718-7", set()),
    ("Observation?code=urn:local|X1", {"o5"}),
    (f"Observation?code={LOINC}|", {"o1", "o2", "o3", "o4"}),
    ("Observation?code=718-7,8867-4", {"o1", "o3", "o4"}),
    ("Observation?code:not=718-7", {"o2", "o3", "o5"}),
    ("Observation?category=laboratory", {"o1", "o2", "o4"}),
    (f"Observation?category={OBS_CAT}|vital-signs", {"o3"}),
    ("Observation?category:missing=true", {"o5"}),
    ("Observation?category:missing=false", {"o1", "o2", "o3", "o4"}),
    ("Observation?date=2024-03", {"o1", "o2", "o4"}),
    ("Observation?date=ge2024-03-02", {"o2", "o4"}),
    ("Observation?date=lt2024", {"o3"}),
    ("Observation?date=le2024-03-01", {"o1", "o3", "o4"}),
    ("Observation?date=gt2024-03-04", {"o2", "o4"}),
    ("Observation?date=eq2024-03-01", {"o1"}),
    ("Observation?date=ge2024-03-01&date=lt2024-03-02", {"o1", "o4"}),  # o4: all March
    ("Observation?date:missing=true", {"o5"}),
    ("Observation?effective=2024-03-01", {"o1"}),
    ("Observation?status=final", {"o1", "o2", "o5"}),
    ("Observation?status=final,amended", {"o1", "o2", "o4", "o5"}),
    ("Observation?status:not=final", {"o3", "o4"}),
    ("Observation?encounter=Encounter/e1", {"o1"}),
    ("Observation?encounter=e1", {"o1"}),
    ("Observation?encounter:missing=true", {"o2", "o3", "o4", "o5"}),
    ("Observation?based-on=ServiceRequest/sr1", {"o1"}),
    (f"Observation?patient.identifier={MASTER}|HC-2", {"o4", "o5"}),
    ("Observation?patient:identifier=urn:mrn|M1", {"o1", "o2", "o3"}),
    ("Observation?subject:identifier=HC-1", {"o1", "o2", "o3"}),
    ("Observation?patient=p1&code=718-7&date=ge2024-01-01", {"o1"}),
    ("Observation?_lastUpdated=gt2000-01-01", {"o1", "o2", "o3", "o4", "o5"}),
    ("Observation?_lastUpdated=lt2000", set()),
    (f"Patient?identifier={MASTER}|HC-1", {"p1"}),
    ("Patient?identifier=HC-1", {"p1"}),
    ("Patient?identifier=|LOOSE-9", {"p3"}),
    ("Patient?identifier=LOOSE-9", {"p3"}),
    ("Patient?identifier=urn:mrn|HC-1", set()),
    ("Patient?identifier:missing=true", set()),
    ("Patient?_id=p2", {"p2"}),
    ("ServiceRequest?authored=2024-02-28", {"sr1"}),
    ("ServiceRequest?code=718-7&status=active", {"sr1"}),
    ("DiagnosticReport?result=Observation/o2", {"d1"}),
    ("DiagnosticReport?category=LAB&code=58410-2", {"d1"}),
    ("Encounter?date=2024-03-01", {"e1"}),
    ("Encounter?patient=p1", {"e1"}),
]


async def _store(client: httpx.AsyncClient, resources: list[dict[str, Any]]) -> None:
    for r in resources:
        resp = await client.put(
            f"/fhir/{r['resourceType']}/{r['id']}", content=json.dumps(r), headers=FHIR
        )
        assert resp.status_code in (200, 201), resp.text


def _ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


async def _get(client: httpx.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
    resp = await client.get(f"/fhir/{url}", **kw)
    assert resp.status_code == 200, (url, resp.text)
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def _cursor_of(bundle: dict[str, Any]) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            return str(parse_qs(urlsplit(link["url"]).query)["_cursor"][0])
    return None


async def _all_pages(client: httpx.AsyncClient, url: str, limit: int = 200) -> list[str]:
    """Follow next links (bounded) and return every matched id in order."""
    bundle = await _get(client, url)
    ids = _ids(bundle)
    for _ in range(limit):
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            return ids
        path = urlsplit(nxt[0])
        bundle = await _get(client, f"{path.path.removeprefix('/fhir/')}?{path.query}")
        ids += _ids(bundle)
    raise AssertionError("paging did not end")


async def test_every_parameter_and_modifier(client: httpx.AsyncClient) -> None:
    await _store(client, DATA)
    for url, expected in CASES:
        bundle = await _get(client, url)
        assert set(_ids(bundle)) == expected, url
        assert bundle["total"] == len(expected), url
    # The same through POST _search with a form body.
    resp = await client.post(
        "/fhir/Observation/_search",
        content="patient=p1&code=718-7",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 200, resp.text
    assert _ids(resp.json()) == ["o1"]


async def test_include_revinclude_sort_count(client: httpx.AsyncClient) -> None:
    await _store(client, DATA)
    b = await _get(client, "Observation?_id=o1&_include=Observation:patient")
    assert (_ids(b), _ids(b, "include")) == (["o1"], ["p1"])
    b = await _get(client, "DiagnosticReport?_id=d1&_include=DiagnosticReport:result")
    assert sorted(_ids(b, "include")) == ["o1", "o2"]
    b = await _get(client, "Patient?_id=p2&_revinclude=Observation:patient")
    assert (_ids(b), sorted(_ids(b, "include"))) == (["p2"], ["o4", "o5"])
    b = await _get(client, "Observation?_id=o1&_revinclude=DiagnosticReport:result")
    assert _ids(b, "include") == ["d1"]
    assert _ids(await _get(client, "Observation?patient=p1&_sort=date")) == ["o3", "o1", "o2"]
    assert _ids(await _get(client, "Observation?patient=p1&_sort=-date")) == ["o2", "o1", "o3"]
    b = await _get(client, "Observation?_summary=count")
    assert b["total"] == 5 and "entry" not in b
    b = await _get(client, "Observation?_count=0")
    assert b["total"] == 5 and "entry" not in b
    b = await _get(client, "Observation?_count=2")
    assert b["total"] == 5 and len(_ids(b)) == 2 and _cursor_of(b) is not None
    paged = await _all_pages(client, "Observation?_count=2&_sort=-date")
    assert sorted(paged) == ["o1", "o2", "o3", "o4", "o5"]
    assert paged[:3] == ["o2", "o1", "o4"]  # by the start of each date (o4: all March)
    # a _count above the cap is capped, not refused
    b = await _get(client, "Observation?_count=100000")
    assert len(_ids(b)) == 5


async def test_unknown_and_malformed_parameters(client: httpx.AsyncClient) -> None:
    await _store(client, DATA[:3])
    for url in (
        "Patient?name=Testpatient",  # names are not searchable (privacy decision)
        "Patient?birthdate=1950",
        "Observation?foo=bar",
        "Observation?date=2024-13-45",
        "Observation?date=yesterday",
        "Observation?code:text=x",
        "Observation?_count=many",
        "Observation?_sort=code",
        "Observation?_include=Patient:link",
        "Observation?patient.name=x",
        "Observation?status:missing=maybe",
        "Observation?_cursor=not-a-cursor",
        "NoSuchType?x=1",
    ):
        resp = await client.get(f"/fhir/{url}")
        assert resp.status_code in (400, 404), (url, resp.status_code)
        body = resp.json()
        assert body["resourceType"] == "OperationOutcome", url
    resp = await client.get("/fhir/Patient?name=x&_id=p1", headers={"Prefer": "handling=lenient"})
    assert resp.status_code == 200 and _ids(resp.json()) == ["p1"]


async def test_cursor_is_signed_and_bound_to_its_caller(client: httpx.AsyncClient) -> None:
    await _store(client, DATA)
    b = await _get(client, "Observation?_count=2")
    cursor = _cursor_of(b)
    assert cursor is not None
    body, tag = cursor.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    for bad in (f"{flipped}.{tag}", f"{body}.{tag[::-1]}", body):
        resp = await client.get("/fhir/Observation", params={"_cursor": bad})
        assert resp.status_code == 400, bad
        assert resp.json()["resourceType"] == "OperationOutcome"
    # a cursor of another search type is refused too
    resp = await client.get("/fhir/Patient", params={"_cursor": cursor})
    assert resp.status_code == 400

    service: SearchService = client.app.state.search  # type: ignore[attr-defined]

    class Caller:
        def __init__(self, key: str) -> None:
            self.key = key

    alice, mallory = Caller("client-alice"), Caller("client-mallory")
    page = await service.search("Observation", [("_count", "2")], caller=alice, base_url="")
    mine = _cursor_of(page)
    assert mine is not None
    with pytest.raises(InvalidInputError, match="another caller"):
        await service.search("Observation", [("_cursor", mine)], caller=mallory, base_url="")
    with pytest.raises(InvalidInputError, match="another caller"):
        await service.search("Observation", [("_cursor", mine)], caller=None, base_url="")
    second = await service.search("Observation", [("_cursor", mine)], caller=alice, base_url="")
    assert len(_ids(second)) == 2 and not set(_ids(second)) & set(_ids(page))


async def test_paging_while_writes_continue(client: httpx.AsyncClient) -> None:
    """A reader pages (sorted by date) while writers add new matches and update existing ones
    (moving their sort key): every match of the first page's snapshot comes exactly once."""
    await _store(client, DATA[:1])
    first = [
        _obs(f"w{i}", "p1", (LOINC, "718-7"), date=f"2024-01-{i % 28 + 1:02d}T10:00:00Z")
        for i in range(30)
    ]
    await _store(client, first)
    b = await _get(client, "Observation?patient=p1&code=718-7&_sort=date&_count=4")
    assert b["total"] == 30
    seen = _ids(b)

    async def writer(start: int) -> None:
        for i in range(start, start + 10):
            await _store(
                client,
                [_obs(f"n{i}", "p1", (LOINC, "718-7"), date=f"2024-01-{i % 28 + 1:02d}")],
            )
            # move an existing match from the end of the order to its start
            moved = _obs(f"w{i % 30}", "p1", (LOINC, "718-7"), date="2020-01-01")
            await _store(client, [moved])

    async def reader() -> list[str]:
        got: list[str] = []
        bundle = b
        for _ in range(100):
            cursor = _cursor_of(bundle)
            if cursor is None:
                return got
            await asyncio.sleep(0)
            bundle = await _get(client, "Observation", params={"_cursor": cursor})
            assert bundle["total"] == 30
            got += _ids(bundle)
        raise AssertionError("paging did not end")

    results = await asyncio.wait_for(asyncio.gather(reader(), writer(0), writer(100)), timeout=120)
    seen += results[0]
    assert sorted(seen) == sorted(r["id"] for r in first), "a match skipped or repeated"
    # after the writes, a fresh search sees the new and moved ones
    now = await _all_pages(client, "Observation?patient=p1&code=718-7&_count=50")
    assert len(now) == 50 and len(set(now)) == 50


async def test_everything_and_find(client: httpx.AsyncClient) -> None:
    await _store(client, DATA)
    b = await _get(client, "Patient/p1/$everything")
    # (and the Provenance of each write of the patient's records)
    clinical = {
        e["resource"]["id"] for e in b["entry"] if e["resource"]["resourceType"] != "Provenance"
    }
    assert clinical == {"p1", "e1", "sr1", "o1", "o2", "o3", "d1"}
    paged = await _all_pages(client, "Patient/p2/$everything?_count=1")
    # its three records and the three Provenances of their writes, each once
    assert len(paged) == len(set(paged)) == 6
    assert sorted(set(paged) & {"o4", "o5", "p2"}) == ["o4", "o5", "p2"]
    resp = await client.get("/fhir/Patient/nobody/$everything")
    assert resp.status_code == 404
    resp = await client.get("/fhir/Patient/p1/$everything?code=x")
    assert resp.status_code == 400
    service: SearchService = client.app.state.search  # type: ignore[attr-defined]
    assert await service.find("Patient", [("identifier", "urn:mrn|M1")]) == ["p1"]
    assert await service.find("Patient", [("identifier", "urn:mrn|nope")]) == []
    assert {p["name"] for p in search_params_of("Observation")} >= {
        "patient",
        "code",
        "date",
        "identifier",
        "_lastUpdated",
    }


async def test_newer_version_replaces_older_and_reindex(client: httpx.AsyncClient) -> None:
    await _store(client, DATA)
    updated = _obs("o2", "p1", (LOINC, "6690-2"), date="2024-03-05", status="cancelled")
    await _store(client, [updated])
    assert _ids(await _get(client, "Observation?status=cancelled")) == ["o2"]
    assert "o2" not in _ids(await _get(client, "Observation?status=final"))
    b = await _get(client, "Observation?_id=o2")
    assert b["entry"][0]["resource"]["meta"]["versionId"] == "2"
    service: SearchService = client.app.state.search  # type: ignore[attr-defined]
    before = {url: sorted(_ids(await _get(client, url))) for url, _ in CASES[:20]}
    count = await service.reindex()
    assert count == 2 * (len(DATA) + 1)  # each write and its Provenance
    after = {url: sorted(_ids(await _get(client, url))) for url, _ in CASES[:20]}
    assert after == before
    assert _ids(await _get(client, "Observation?status=cancelled")) == ["o2"]


def test_lost_index_caught_up_at_start_and_reindex_command(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A deleted index file is caught up from the ledger and the blobs when the gateway starts;
    ``gateway reindex`` (embedded profile, with a progress bar) rebuilds it; searches answer
    as before both times."""
    settings = settings_for("embedded", tmp_path / "gw", hl7_convert_workers=0)

    async def stored_then(urls: list[str]) -> list[list[str]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gw", headers=auth_headers(app)
            ) as c:
                if not urls:
                    await _store(c, DATA)
                return [sorted(_ids(await _get(c, u))) for u in urls]

    asyncio.run(stored_then([]))
    index_file = tmp_path / "gw" / "search" / "index.sqlite3"
    assert index_file.exists()
    for f in index_file.parent.iterdir():
        f.unlink()
    urls = [u for u, _ in CASES[:12]]
    assert asyncio.run(stored_then(urls)) == [sorted(e) for _, e in CASES[:12]]
    monkeypatch.setenv("GATEWAY_INSTITUTION", settings.institution)
    result = CliRunner().invoke(
        cli_app, ["reindex", "--data-dir", str(tmp_path / "gw"), "--profile", "embedded"]
    )
    assert result.exit_code == 0, result.output
    # each write and its Provenance
    assert f"reindexed {2 * len(DATA)} record versions" in result.output
    assert asyncio.run(stored_then(urls)) == [sorted(e) for _, e in CASES[:12]]


NASTY = [
    "date=ge",
    "date=2024-02-30",
    "_count=-1",
    "code=",
    "identifier=",
    "patient=Patient/",
    "_sort=",
    "_include=",
    "_revinclude=",
    "patient:Observation=x",
    "encounter=Observation/1",
    "_lastUpdated:missing=true",
    "_cursor=",
    "_cursor=a.b",
    "code=a,b,,",
    "date=ge2024-01-01T25:00",
    "code:missing=",
    "patient.birthdate=1",
    "_summary=true",
    "_elements=id",
    "date=eb9999",
    "date=0000",
    "_include=Observation:*",
    "%00=1",
]


async def test_malformed_searches_are_400_never_500(client: httpx.AsyncClient) -> None:
    await _store(client, DATA[:1])
    for q in NASTY:
        resp = await client.get(f"/fhir/Observation?{q}")
        assert resp.status_code == 400, (q, resp.status_code, resp.text)
        issue = resp.json()["issue"][0]
        assert issue["severity"] == "error" and issue["diagnostics"], q
    resp = await client.post(
        "/fhir/Observation/_search",
        content=b"\xff\xfe",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 400
    resp = await client.post(
        "/fhir/Observation/_search", content=b"{}", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 415
    assert (await client.get("/fhir/Patient/p1")).status_code == 200  # still serving


async def test_access_filter_applies_before_count_paging_and_include(
    client: httpx.AsyncClient,
) -> None:
    """A policy's SearchFilter is part of the index query: hidden records are not counted,
    paged or included; a record the filter lets through but a read check denies is left out."""
    await _store(client, DATA)
    service: SearchService = client.app.state.search  # type: ignore[attr-defined]
    found = service.records.patient_of("Patient", "p2")
    assert found is not None
    p2: str = found

    class OnlyP2:
        async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
            if request.resource_type == "Patient":
                raise AccessDeniedError("no patients", interaction=request.interaction)
            return PERMIT

        async def search_filter(
            self, caller: object | None, patients: frozenset[str] | None = None
        ) -> SearchFilter:
            return SearchFilter(patients=frozenset({p2}), types=frozenset({"Observation"}))

    service.policy = OnlyP2()
    b = await _get(client, "Observation?_count=1&_include=Observation:patient")
    assert b["total"] == 2 and _ids(b, "include") == []  # Patient is outside the filter
    assert sorted(await _all_pages(client, "Observation?_count=1")) == ["o4", "o5"]
    assert (await _get(client, "Observation?code=718-7"))["total"] == 1
    assert (await _get(client, "Patient?_id=p2"))["total"] == 0  # type filtered out
    assert await service.find("Observation", [("patient", "p1")]) == []


async def test_search_routes_leave_other_fhir_paths_alone(client: httpx.AsyncClient) -> None:
    resp = await client.get("/fhir/metadata")
    assert resp.status_code == 200 and resp.json()["resourceType"] == "CapabilityStatement"
    resp = await client.get("/fhir/observation")  # not a type: not a search
    assert resp.status_code != 200
