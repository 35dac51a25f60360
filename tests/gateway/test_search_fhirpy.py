"""A FHIR client no one here wrote (``fhirpy``, async) stores, searches, counts, pages and
runs a conditional create and update against a running gateway (uvicorn on a free loopback
port), on both profiles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvicorn
from fhirpy import AsyncFHIRClient

from gateway.app import create_app
from gateway.demo import free_port
from tests.gateway.conftest import settings_for, settings_token

LOINC = "http://loinc.org"


@pytest.mark.parametrize(
    "profile", ["embedded", pytest.param("production", marks=pytest.mark.services)]
)
async def test_fhirpy_searches_and_pages(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    services = request.getfixturevalue("services") if profile == "production" else None
    settings = settings_for(profile, tmp_path / "gw", services, hl7_convert_workers=0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(300):
            if server.started or task.done():
                break
            await asyncio.sleep(0.1)
        assert server.started, "the gateway did not start"
        # fhirpy sends the token as given (SMART Backend Services: a bearer token).
        client = AsyncFHIRClient(
            f"http://127.0.0.1:{port}/fhir", authorization=f"Bearer {settings_token(settings)}"
        )
        patient = client.resource(
            "Patient",
            id="fp-1",
            identifier=[{"system": "urn:oid:2.16.156.10011.1.19", "value": "HC-FP-1"}],
        )
        await patient.save()
        for i in range(7):
            obs = client.resource(
                "Observation",
                id=f"fo-{i}",
                status="final",
                code={"coding": [{"system": LOINC, "code": "718-7" if i % 2 else "6690-2"}]},
                subject={"reference": "Patient/fp-1"},
                effectiveDateTime=f"2024-05-{i + 1:02d}",
            )
            await obs.save()
        search = client.resources("Observation").search(
            patient="fp-1", code=f"{LOINC}|718-7", date__ge="2024-05-02"
        )
        assert await search.count() == 3
        found = await search.sort("date").fetch()
        assert [r["id"] for r in found] == ["fo-1", "fo-3", "fo-5"]
        paged = await client.resources("Observation").search(patient="fp-1").limit(2).fetch_all()
        assert sorted(r["id"] for r in paged) == [f"fo-{i}" for i in range(7)]
        by_identifier = await client.resources("Patient").search(identifier="HC-FP-1").fetch()
        assert [r["id"] for r in by_identifier] == ["fp-1"]
        # Conditional create as fhirpy sends it (the search parameters in the POST's query):
        # the first creates, the re-sends answer the stored resource.
        results = []
        for _ in range(3):
            results.append(
                await client.resources("Observation")
                .search(identifier="urn:lab:fp|R-FP-1")
                .get_or_create(
                    client.resource(
                        "Observation",
                        identifier=[{"system": "urn:lab:fp", "value": "R-FP-1"}],
                        status="final",
                        code={"coding": [{"system": LOINC, "code": "718-7"}]},
                        subject={"reference": "Patient/fp-1"},
                    )
                )
            )
        assert [created for _r, created in results] == [True, False, False]
        assert len({r["id"] for r, _c in results}) == 1
        same = client.resources("Observation").search(identifier="urn:lab:fp|R-FP-1")
        assert await same.count() == 1
        # and a conditional update through it: the matched resource gets version 2
        updated, created = await same.update(
            client.resource(
                "Observation",
                identifier=[{"system": "urn:lab:fp", "value": "R-FP-1"}],
                status="amended",
                code={"coding": [{"system": LOINC, "code": "718-7"}]},
                subject={"reference": "Patient/fp-1"},
            )
        )
        assert not created and updated["id"] == results[0][0]["id"]
        assert updated["meta"]["versionId"] == "2" and updated["status"] == "amended"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
