"""Issue 15's proof end to end, on the real services, two institutions on one ledger.

A community clinic (``clinic-a``) and the tertiary hospital (``hosp-b``) run one gateway each on
one JetStream stream and one Kubo node. The clinic stores a patient's lab results; the
hospital's client, reading at the clinic's gateway, is denied (a 404 byte-identical to a
missing record); the patient, at the hospital's portal, grants the hospital access for
treatment; the clinic's gateway enforces it and the hospital reads the result; the patient sees
both the denied and the permitted access at the clinic, each AuditEvent with a salt and a
receipt that an independent verifier checks; the patient revokes and the hospital is denied
again; the patient grants once more and then asks for erasure: the hospital is denied at once
despite the grant, the result past retention answers 410 to the custodian while the one
retained still reads, and ``gateway verify --blobs`` passes for both gateways.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.auth.registry import ClientRecord
from gateway.auth.scopes import parse_scopes
from gateway.verify_cmd import run_verify
from tests.gateway.conftest import FHIR, auth_headers, token_service
from tests.gateway.test_access_log import _verify_entry
from tests.gateway.test_consents import consent, grant
from tests.gateway.test_records import _clients, _shared

MASTER = "urn:oid:2.16.156.10011.1.19"
HCN = "H-E2E-0001"
LOINC = "http://loinc.org"


def _lab_bundle() -> dict[str, Any]:
    """The clinic's Bundle: the patient, a glucose result of now and one of 1995 (an
    outpatient record past its 15 years of retention)."""

    def obs(oid: str, when: str, value: float) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
            "subject": {"reference": "Patient/pat-1"},
            "effectiveDateTime": when,
            "valueQuantity": {
                "value": value,
                "unit": "mmol/L",
                "system": "http://unitsofmeasure.org",
                "code": "mmol/L",
            },
        }

    resources = [
        {
            "resourceType": "Patient",
            "id": "pat-1",
            "identifier": [{"system": MASTER, "value": HCN}],
        },
        obs("glu-now", "2026-11-30T08:00:00Z", 5.4),
        obs("glu-1995", "1995-03-01T08:00:00Z", 6.1),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


async def _patient_token(http: httpx.AsyncClient) -> dict[str, str]:
    """The patient's token from this gateway's portal (``/auth/patient-token``, as a portal
    asks for it after the patient signed in there)."""
    app: FastAPI = http.app  # type: ignore[attr-defined]
    s = app.state.gateway.settings
    app.state.auth.registry.put(
        ClientRecord(
            client_id="portal",
            institution=s.institution,
            scopes=("system/Patient.r", "patient/*.rs", "patient/Consent.cru"),
            purposes=("TREAT",),
            portal=True,
        )
    )
    service = token_service(app)
    portal, _exp = service.mint(
        client_id="portal",
        institution=s.institution,
        kind="system",
        scopes=parse_scopes("system/Patient.r"),
        purposes=("TREAT",),
    )
    r = await http.post(
        "/auth/patient-token",
        json={
            "identifier": {"system": MASTER, "value": HCN},
            "scope": "patient/*.rs patient/Consent.cru",
        },
        headers={"Authorization": f"Bearer {portal}"},
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.mark.services
async def test_consent_access_log_and_erasure_across_two_institutions(
    services: Any, tmp_path: Path
) -> None:
    clinic_settings, hosp_settings = _shared(tmp_path, services, ["clinic-a", "hosp-b"])
    async with AsyncExitStack() as stack:
        clinic, hosp = await _clients(stack, [clinic_settings, hosp_settings])
        stored = await clinic.post("/fhir", content=json.dumps(_lab_bundle()), headers=FHIR)
        assert stored.status_code == 200, stored.text

        # The hospital's client, registered at the clinic's gateway, reads for treatment.
        hospital = auth_headers(
            clinic.app,  # type: ignore[attr-defined]
            client_id="hosp-b-his",
            institution="hosp-b",
            scope="system/*.rs",
            purpose="TREAT",
        )
        custodian = auth_headers(
            clinic.app,  # type: ignore[attr-defined]
            client_id="clinic-his",
            scope="system/*.rs",
            purpose="TREAT",
        )

        async def hospital_reads() -> httpx.Response:
            return await clinic.get("/fhir/Observation/glu-now", headers=hospital)

        denied = await hospital_reads()
        missing = await clinic.get("/fhir/Observation/glu-never", headers=hospital)
        assert denied.status_code == missing.status_code == 404
        assert denied.content == missing.content.replace(b"glu-never", b"glu-now")

        # The patient, at the hospital's portal, grants the hospital access for treatment.
        at_hospital = await _patient_token(hosp)
        body = consent(patient=HCN, provision=grant("hosp-b"), performer=False, source=False)
        r = await hosp.post(
            "/fhir/Consent", content=json.dumps(body), headers={**FHIR, **at_hospital}
        )
        assert r.status_code == 201, r.text
        consent_id = r.json()["id"]

        # The clinic's gateway enforces it at once (fresh before every read).
        permitted = await hospital_reads()
        assert permitted.status_code == 200, permitted.text
        assert permitted.json()["valueQuantity"]["value"] == 5.4

        # The patient sees both accesses at the clinic, each provable.
        at_clinic = await _patient_token(clinic)
        history = await clinic.get(
            "/fhir/AuditEvent", params={"patient": f"{MASTER}|{HCN}"}, headers=at_clinic
        )
        assert history.status_code == 200, history.text
        decisions = []
        for entry in history.json()["entry"]:
            leaf = await _verify_entry(clinic.app, entry)  # type: ignore[attr-defined]
            event = entry["resource"]
            who = event["agent"][0]["who"]["identifier"]["value"]
            if who == "hosp-b-his":
                decisions.append(leaf["decision"])
        assert decisions.count("deny") >= 1 and decisions.count("permit") >= 1

        # The patient revokes: the hospital is denied again.
        body["status"] = "inactive"
        r = await hosp.put(
            f"/fhir/Consent/{consent_id}", content=json.dumps(body), headers={**FHIR, **at_hospital}
        )
        assert r.status_code == 200, r.text
        again = await hospital_reads()
        assert again.status_code == 404 and again.content == denied.content

        # A new grant, then the erasure request: denied at once, whatever the grant says.
        body = consent(patient=HCN, provision=grant("hosp-b"), performer=False, source=False)
        r = await hosp.post(
            "/fhir/Consent", content=json.dumps(body), headers={**FHIR, **at_hospital}
        )
        assert r.status_code == 201, r.text
        assert (await hospital_reads()).status_code == 200
        erased = await clinic.post("/fhir/Patient/pat-1/$erase", headers=at_clinic)
        assert erased.status_code == 200, erased.text
        params = {p["name"]: p for p in erased.json()["parameter"]}
        assert params["restricted"]["valueBoolean"] is True
        shredded = [p["valueString"] for p in erased.json()["parameter"] if p["name"] == "shredded"]
        assert shredded == ["Observation/glu-1995"], shredded
        after = await hospital_reads()
        assert after.status_code == 404 and after.content == denied.content
        # The custodian: the record past retention is gone (410), the retained one reads.
        old = await clinic.get("/fhir/Observation/glu-1995", headers=custodian)
        assert old.status_code == 410, old.text
        assert (await clinic.get("/fhir/Observation/glu-now", headers=custodian)).status_code == 200
        # Another institution learns nothing, not even that it was shredded.
        gone_for_hospital = await clinic.get("/fhir/Observation/glu-1995", headers=hospital)
        assert gone_for_hospital.status_code == 404

    for s in (clinic_settings, hosp_settings):
        out = StringIO()
        with redirect_stdout(out):
            assert await run_verify(s, blobs=True, from_checkpoint=None) == 0, out.getvalue()
