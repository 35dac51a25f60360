"""HL7 ``W`` (wrong result, table 0085) over MLLP end to end, on both profiles: an ORU^R01
re-sent with OBX-11 = ``W`` for a result stored earlier anchors a new version of that
Observation with status ``entered-in-error``; reads show it, the history keeps both versions,
and search finds it by status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.mllp.client import MLLPClient
from mappings.v2.convert import convert
from mappings.v2.parse import parse
from tests.gateway.conftest import auth_headers
from tests.gateway.hl7.test_ingest import _settings, msa

HL7 = Path(__file__).resolve().parents[3] / "fixtures" / "hl7v2"


@pytest.fixture
async def app(profile: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    services = request.getfixturevalue("services") if profile == "production" else None
    app = create_app(_settings(profile, tmp_path, services))
    async with app.router.lifespan_context(app):
        yield app


def _wrong(raw: bytes, control_id: str, obx_set_id: str) -> bytes:
    """The message again under a new control id, with OBX ``obx_set_id`` marked W."""
    segments = raw.split(b"\r")
    out = []
    for seg in segments:
        fields = seg.split(b"|")
        if fields[0] == b"MSH":
            fields[9] = control_id.encode()
        elif fields[0] == b"OBX" and fields[1] == obx_set_id.encode():
            fields += [b""] * (12 - len(fields))
            fields[11] = b"W"
        out.append(b"|".join(fields))
    return b"\r".join(out)


async def _send(app: FastAPI, raw: bytes) -> bytes:
    async with MLLPClient("127.0.0.1", app.state.mllp.port, timeout=30) as c:
        return await c.send(raw)


async def test_a_result_resent_as_wrong_is_entered_in_error(app: FastAPI) -> None:
    raw = (HL7 / "oru_r01_lab.hl7").read_bytes()
    options = app.state.hl7.options
    first = await _send(app, raw)
    assert msa(first)[1] in ("AA", "CA"), first  # CA: enhanced mode (MSH-15 AL)
    wrong = _wrong(raw, "LIS20260315-0001-W", "2")
    observations = [
        r
        for r in convert(parse(wrong), options=options).resources
        if r["resourceType"] == "Observation"
    ]
    target = next(r for r in observations if r["status"] == "entered-in-error")
    others = [r for r in observations if r is not target]
    assert others and all(r["status"] != "entered-in-error" for r in others)
    second = await _send(app, wrong)
    assert msa(second)[1] in ("AA", "CA") and msa(second)[2] == "LIS20260315-0001-W", second
    await app.state.gateway.records.drain()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
    ) as http:
        r = await http.get(f"/fhir/Observation/{target['id']}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "entered-in-error"
        assert r.json()["meta"]["versionId"] == "2"
        v1 = await http.get(f"/fhir/Observation/{target['id']}/_history/1")
        assert v1.status_code == 200 and v1.json()["status"] == "final"
        history = await http.get(f"/fhir/Observation/{target['id']}/_history")
        assert [e["resource"]["status"] for e in history.json()["entry"]] == [
            "entered-in-error",
            "final",
        ]
        # the other results of the message keep their status in their new version
        for other in others:
            got = await http.get(f"/fhir/Observation/{other['id']}")
            assert got.json()["status"] == other["status"] != "entered-in-error"
        found = await http.get("/fhir/Observation", params={"status": "entered-in-error"})
        assert found.status_code == 200, found.text
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [target["id"]]
