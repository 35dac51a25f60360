"""Logs are JSON lines with request ids and never carry patient data."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from gateway.observability import JsonFormatter
from tests.gateway.conftest import FHIR, demo_bundle
from tests.gateway.test_privacy import _needles


async def test_logs_carry_request_ids_and_no_patient_data(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = await client.post(
        "/fhir", content=json.dumps(demo_bundle()), headers={**FHIR, "x-request-id": "req-42"}
    )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-42"
    bad = demo_bundle()
    bad["entry"][0]["resource"]["birthDate"] = "not-a-date-王秀英"
    assert (await client.post("/fhir", content=json.dumps(bad), headers=FHIR)).status_code == 400
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    parsed = [json.loads(line) for line in lines]
    assert any(p.get("request_id") == "req-42" and p.get("status") == 200 for p in parsed)
    text = "\n".join(lines)
    for needle in [*_needles(), "not-a-date"]:
        assert needle not in text, f"{needle!r} was logged"
