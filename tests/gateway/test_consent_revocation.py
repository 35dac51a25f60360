"""Revocation takes effect before the next read on every gateway, across two processes.

The clinic's gateway runs as its own ``gateway serve`` process; the hospital's runs in this
process; both on one JetStream stream and one Kubo node. A consent granted, then revoked, at the
hospital's gateway decides the very next read at the clinic's, with no wait in between: once
with the clinic's ledger follower on (the notification that usually brings the change sooner)
and once with it off (the notification dropped), where only the check of the log's last
sequence before each read (``ConsentService.fresh``) can bring it.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import free_port
from tests.gateway.conftest import FHIR, bearer
from tests.gateway.test_consents import consent, grant
from tests.gateway.test_records import _clients, _shared
from tests.gateway_process import gateway_env, serve

MASTER = "urn:oid:2.16.156.10011.1.19"
HCN = "H-REVOKE-0001"


def _lab() -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "id": "pr-1",
        "identifier": [{"system": MASTER, "value": HCN}],
    }
    result = {
        "resourceType": "Observation",
        "id": "or-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": "Patient/pr-1"},
        "effectiveDateTime": "2026-11-30T08:00:00Z",
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in (patient, result)
        ],
    }


@pytest.mark.services
@pytest.mark.parametrize("follow_ms", ["1000", "0"], ids=["notified", "notification-dropped"])
async def test_revocation_decides_the_next_read_at_another_gateway_process(
    services: Any, tmp_path: Path, follow_ms: str
) -> None:
    clinic_settings, hosp_settings = _shared(tmp_path, services, ["clinic-a", "hosp-b"])
    # Tokens of the clinic's gateway, minted before it starts (its registry is on disk).
    clinic_his = bearer(clinic_settings, client_id="clinic-his", scope="system/*.crus")
    hospital = bearer(
        clinic_settings,
        client_id="hosp-b-his",
        institution="hosp-b",
        scope="system/*.rs",
        purpose="TREAT",
    )
    port = free_port()
    assert clinic_settings.pseudonym_key is not None
    env = gateway_env(
        clinic_settings,
        GATEWAY_PSEUDONYM_KEY=clinic_settings.pseudonym_key.get_secret_value(),
        GATEWAY_TRUST_FILE=str(clinic_settings.trust_file),
        GATEWAY_LEDGER_FOLLOW_INTERVAL_MS=follow_ms,
        GATEWAY_HL7_CONVERT_WORKERS="0",
    )
    proc = serve(env, port, tmp_path / "clinic.log")
    try:
        async with AsyncExitStack() as stack:
            (hosp,) = await _clients(stack, [hosp_settings])
            clinic = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
            )
            stored = await clinic.post(
                "/fhir", content=json.dumps(_lab()), headers={**FHIR, **clinic_his}
            )
            assert stored.status_code == 200, stored.text
            url = "/fhir/Observation/or-1"
            assert (await clinic.get(url, headers=hospital)).status_code == 404

            body = consent(patient=HCN, provision=grant("hosp-b"))
            r = await hosp.post("/fhir/Consent", content=json.dumps(body), headers=FHIR)
            assert r.status_code == 201, r.text
            # the very next read at the other process, no wait: permitted
            assert (await clinic.get(url, headers=hospital)).status_code == 200

            body["status"] = "inactive"
            r = await hosp.put(
                f"/fhir/Consent/{r.json()['id']}", content=json.dumps(body), headers=FHIR
            )
            assert r.status_code == 200, r.text
            # and after the revocation was acknowledged, the very next read: denied
            assert (await clinic.get(url, headers=hospital)).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)
