"""Consent enforced through the API on both profiles (ConsentPolicy with the in-memory consent
source, a recording access log): a denied read is byte-identical to a missing one; searches by
another institution reveal nothing of denied records (total, every page, _include,
_revinclude, _summary=count, chained parameters, $everything); sensitive labels given at
ingest (FHIR REST and HL7 v2) need an explicit permit; receipts are checked; every decision is
logged before anything is sent, and nothing is sent when the log fails."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from gateway.access import AccessEvent
from gateway.app import create_app
from gateway.consent import ACT_CODE
from tests.gateway.conftest import auth_headers, settings_for
from tests.gateway.consent_stub import InMemoryConsents, RecordingLog, grant, install
from tests.gateway.test_search import DATA, LOINC, MASTER, _cursor_of, _store

HOSPITAL = "hospital"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
HIV_CONDITION: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "c-hiv",
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "code": {"coding": [{"system": ICD10, "code": "B20"}]},
    "subject": {"reference": "Patient/p1"},
    "recordedDate": "2024-03-02",
}


def hospital(client: httpx.AsyncClient) -> dict[str, str]:
    """Headers of the hospital's client (another institution) on this gateway."""
    return auth_headers(
        client.app,  # type: ignore[attr-defined]
        client_id="hospital-his",
        institution=HOSPITAL,
        scope="system/*.rs",
        purpose="TREAT",
    )


async def setup(client: httpx.AsyncClient) -> tuple[InMemoryConsents, RecordingLog, str]:
    await _store(client, DATA)
    consents, log = install(client.app)  # type: ignore[attr-defined]
    p1 = client.app.state.gateway.records.patient_of("Patient", "p1")  # type: ignore[attr-defined]
    assert p1 is not None
    return consents, log, p1


async def test_denied_read_is_byte_identical_to_missing(client: httpx.AsyncClient) -> None:
    consents, log, p1 = await setup(client)
    h = hospital(client)
    for denied_url, missing_url in [
        ("/fhir/Observation/o1", "/fhir/Observation/o9"),
        ("/fhir/Observation/o1/_history/1", "/fhir/Observation/o9/_history/1"),
        ("/fhir/Observation/o1/_history", "/fhir/Observation/o9/_history"),
    ]:
        denied = await client.get(denied_url, headers=h)
        missing = await client.get(missing_url, headers=h)
        assert denied.status_code == missing.status_code == 404, denied_url
        assert denied.content == missing.content.replace(b"o9", b"o1")
        assert denied.headers["content-type"] == missing.headers["content-type"]
    refused = [e for e in log.events if not e.decision.permitted]
    assert {e.interaction for e in refused} == {"read", "vread", "history"}
    assert all(e.patient == p1 for e in refused)
    assert ("Observation/o1/_history/1",) in [e.records for e in refused]
    # the patient grants the hospital access for treatment: read, and logged as permitted
    version = consents.put(p1, grant("c-1", HOSPITAL))
    ok = await client.get("/fhir/Observation/o1", headers=h)
    assert ok.status_code == 200 and ok.json()["id"] == "o1"
    last = log.events[-1]
    assert last.decision.permitted and last.decision.consent_id == "c-1"
    assert last.decision.consent_version == version and last.interaction == "read"
    consents.revoke(p1, "c-1")
    assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 404


async def test_search_by_another_institution_reveals_nothing_denied(
    client: httpx.AsyncClient,
) -> None:
    """The patient shares only Observations of code 718-7 with the hospital."""
    consents, log, p1 = await setup(client)
    consents.put(p1, grant("c-1", HOSPITAL, classes=["Observation"], codes=[(LOINC, "718-7")]))
    h = hospital(client)

    async def bundle(url: str) -> dict[str, Any]:
        resp = await client.get(f"/fhir/{url}", headers=h)
        assert resp.status_code == 200, (url, resp.text)
        body: dict[str, Any] = resp.json()
        return body

    b = await bundle("Observation?patient=p1")
    assert b["total"] == 1 and [e["resource"]["id"] for e in b["entry"]] == ["o1"]
    assert (await bundle("Observation?patient=p1&_summary=count"))["total"] == 1
    assert (await bundle("Observation?patient=p1&_count=0"))["total"] == 1
    first = await bundle("Observation?patient=p1&_count=1")
    assert first["total"] == 1 and _cursor_of(first) is None  # no empty last page
    inc = await bundle("Observation?patient=p1&_include=Observation:encounter")
    assert [e["search"]["mode"] for e in inc["entry"]] == ["match"]  # Encounter e1 not permitted
    rev = await bundle("Observation?patient=p1&_revinclude=DiagnosticReport:result")
    assert [e["resource"]["id"] for e in rev["entry"]] == ["o1"]
    assert (await bundle("Observation?patient=p1&code=6690-2"))["total"] == 0
    assert (await bundle("DiagnosticReport?patient=p1"))["total"] == 0
    assert (await bundle("Encounter?patient=p1&_summary=count"))["total"] == 0
    chained = await bundle(f"Observation?patient.identifier={MASTER}|HC-1")
    assert chained["total"] == 0 and "entry" not in chained  # Patient p1 itself not permitted
    assert (await bundle("Observation?patient=p2"))["total"] == 0  # no consent from p2
    every = await bundle("Patient/p1/$everything")
    assert every["total"] == 1 and [e["resource"]["id"] for e in every["entry"]] == ["o1"]
    # without naming one patient: refused, saying why
    for url in ("Observation", "Observation?code=718-7", "Observation?patient=p1,p2"):
        resp = await client.get(f"/fhir/{url}", headers=h)
        assert resp.status_code == 403, url
        assert "exactly one patient" in resp.json()["issue"][0]["diagnostics"]
    # the custodian's own client still sees every record (administrative default)
    own = await client.get("/fhir/Observation?patient=p1")
    assert own.status_code == 200 and own.json()["total"] == 3
    # one event per patient named or returned, listing the records returned
    searches = [e for e in log.events if e.interaction in ("search", "everything")]
    named = [e for e in searches if e.caller.institution == HOSPITAL]  # type: ignore[attr-defined]
    assert all(e.patient == p1 or e.records == () for e in named)
    assert ("Observation/o1/_history/1",) in [e.records for e in named]
    assert any(e.query and e.query.startswith("Observation?") for e in named)


async def test_whole_pages_for_the_custodian_when_some_patients_deny(
    client: httpx.AsyncClient,
) -> None:
    """A patient's deny of the custodian's research use: every page of a research search is
    full and the total is exact (filtered in the query, not after)."""
    consents, _log, p1 = await setup(client)
    research = {"X-Purpose-Of-Use": "HRESCH"}
    headers = auth_headers(client.app, purpose="TREAT HRESCH") | research  # type: ignore[attr-defined]
    clinic = client.app.state.gateway.settings.institution  # type: ignore[attr-defined]
    b = (await client.get("/fhir/Observation", headers=headers)).json()
    assert b["total"] == 0  # the default permits the custodian treatment only
    p2 = client.app.state.gateway.records.patient_of("Patient", "p2")  # type: ignore[attr-defined]
    assert p2 is not None
    consents.put(p2, grant("r-2", clinic, purpose="HRESCH"))
    b = (await client.get("/fhir/Observation?_count=1", headers=headers)).json()
    assert b["total"] == 2 and len(b["entry"]) == 1  # o4, o5 of p2 only
    seen = [b["entry"][0]["resource"]["id"]]
    cursor = _cursor_of(b)
    assert cursor is not None
    b = (await client.get(f"/fhir/Observation?_cursor={cursor}", headers=headers)).json()
    seen += [e["resource"]["id"] for e in b.get("entry", [])]
    assert sorted(seen) == ["o4", "o5"] and _cursor_of(b) is None
    assert p1 not in consents.consented_patients()
    # revoked between two pages: the next page is decided, and its total counted, anew
    b = (await client.get("/fhir/Observation?_count=1", headers=headers)).json()
    cursor = _cursor_of(b)
    assert b["total"] == 2 and cursor is not None
    consents.revoke(p2, "r-2")
    b = (await client.get(f"/fhir/Observation?_cursor={cursor}", headers=headers)).json()
    assert b["total"] == 0 and "entry" not in b


async def test_sensitive_labels_at_ingest_need_an_explicit_permit(
    client: httpx.AsyncClient,
) -> None:
    consents, _log, p1 = await setup(client)
    await _store(client, [HIV_CONDITION])
    own = await client.get("/fhir/Condition/c-hiv")
    assert own.status_code == 200
    labels = own.json()["meta"].get("security", [])
    assert {"system": ACT_CODE, "code": "HIV"} in [
        {"system": x["system"], "code": x["code"]} for x in labels
    ]
    h = hospital(client)
    consents.put(p1, grant("c-1", HOSPITAL))
    assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 200
    assert (await client.get("/fhir/Condition/c-hiv", headers=h)).status_code == 404
    found = (await client.get("/fhir/Condition?patient=p1", headers=h)).json()
    assert found["total"] == 0
    consents.put(p1, grant("c-2", HOSPITAL, labels=[(ACT_CODE, "HIV")]))
    assert (await client.get("/fhir/Condition/c-hiv", headers=h)).status_code == 200
    assert (await client.get("/fhir/Condition?patient=p1", headers=h)).json()["total"] == 1


async def test_nothing_is_sent_when_the_access_log_fails(client: httpx.AsyncClient) -> None:
    _consents, log, _p1 = await setup(client)
    log.fail = True
    for url in (
        "/fhir/Observation/o1",
        "/fhir/Observation?patient=p1",
        "/fhir/Patient/p1/_history",
    ):
        resp = await client.get(url)
        assert resp.status_code == 503, url
        assert resp.json()["resourceType"] == "OperationOutcome"
        assert b"718-7" not in resp.content and b"Testpatient" not in resp.content
    log.fail = False
    assert (await client.get("/fhir/Observation/o1")).status_code == 200
    events: list[AccessEvent] = log.events
    assert events[-1].records == ("Observation/o1/_history/1",)


async def test_receipt_lookups_are_checked(client: httpx.AsyncClient) -> None:
    consents, log, p1 = await setup(client)
    own = await client.get("/fhir/Observation/o1")
    leaf = int(own.headers["X-Ledger-Leaf-Index"])
    h = hospital(client)
    denied = await client.get(f"/ledger/receipt?index={leaf}", headers=h)
    assert denied.status_code == 404
    size = client.app.state.gateway.ledger.size  # type: ignore[attr-defined]
    beyond = await client.get(f"/ledger/receipt?index={size + 5}", headers=h)
    assert denied.content == beyond.content.replace(str(size + 5).encode(), str(leaf).encode())
    assert log.events[-1].interaction == "receipt" and not log.events[-1].decision.permitted
    consents.put(p1, grant("c-1", HOSPITAL))
    ok = await client.get(f"/ledger/receipt?index={leaf}", headers=h)
    assert ok.status_code == 200 and ok.json()["index"] == leaf
    assert log.events[-1].decision.permitted and log.events[-1].patient == p1


async def test_hl7_records_are_labelled_and_indexed(client: httpx.AsyncClient) -> None:
    """An HL7 v2 result with an HIV test code is sealed with the label and indexed with it;
    the hospital with a plain treatment consent neither finds nor reads it."""
    raw = (Path(__file__).resolve().parents[2] / "fixtures/hl7v2/oru_r01_lab.hl7").read_bytes()
    raw = raw.replace("HBSAG^乙肝表面抗原^L".encode(), b"56888-1^HIV 1+2 Ab^LN")
    resp = await client.post(
        "/hl7v2", content=raw, headers={"content-type": "x-application/hl7-v2+er7"}
    )
    msa = [seg.split(b"|") for seg in resp.content.split(b"\r") if seg.startswith(b"MSA")]
    assert resp.status_code == 200 and msa and msa[0][1] in (b"AA", b"CA"), resp.content
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    await asyncio.wait_for(gw.records.drain(), 10)
    consents, _log = install(client.app)  # type: ignore[attr-defined]
    found = (await client.get(f"/fhir/Observation?code={LOINC}|56888-1")).json()
    assert found["total"] == 1
    obs = found["entry"][0]["resource"]
    assert {"system": ACT_CODE, "code": "HIV"} in [
        {"system": x["system"], "code": x["code"]} for x in obs["meta"]["security"]
    ]
    patient = obs["subject"]["reference"].split("/")[1]
    pseudonym = gw.records.patient_of("Patient", patient)
    assert pseudonym is not None
    consents.put(pseudonym, grant("c-1", HOSPITAL))
    h = hospital(client)
    q = f"/fhir/Observation?patient={patient}"
    visible = (await client.get(q, headers=h)).json()
    codes = [c["code"] for e in visible.get("entry", []) for c in e["resource"]["code"]["coding"]]
    assert visible["total"] >= 1 and "56888-1" not in codes
    assert (await client.get(f"/fhir/Observation/{obs['id']}", headers=h)).status_code == 404
    assert "HIV" not in json.dumps(visible)


async def test_without_the_search_index_metadata_comes_from_the_decrypted_record(
    tmp_path: Path,
) -> None:
    """GATEWAY_SEARCH_INDEX=false: reads are still decided on codes and labels, taken from
    the decrypted resource before anything is returned."""
    app = create_app(settings_for("embedded", tmp_path / "gw", search_index=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", headers=auth_headers(app)
        ) as client:
            client.app = app  # type: ignore[attr-defined]
            consents, log, p1 = await setup(client)
            await _store(client, [HIV_CONDITION])
            (write,) = log.events  # the custodian's own write is logged too
            assert write.interaction == "create" and write.patient == p1
            assert write.records == ("Condition/c-hiv/_history/1",) and write.decision.permitted
            assert app.state.gateway.records.meta_source is None
            h = hospital(client)
            assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 404
            consents.put(p1, grant("c-1", HOSPITAL, codes=[(LOINC, "718-7")]))
            assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 200
            assert (await client.get("/fhir/Observation/o2", headers=h)).status_code == 404
            consents.put(p1, grant("c-2", HOSPITAL, classes=["Condition"]))
            assert (await client.get("/fhir/Condition/c-hiv", headers=h)).status_code == 404
            consents.put(p1, grant("c-3", HOSPITAL, labels=[(ACT_CODE, "HIV")]))
            assert (await client.get("/fhir/Condition/c-hiv", headers=h)).status_code == 200
            assert [e.decision.permitted for e in log.events[-4:]] == [True, False, False, True]


async def test_a_read_decrypts_only_once_permitted_and_asks_the_index_once_per_version(
    client: httpx.AsyncClient,
) -> None:
    """A read fetches the ciphertext beside its decision, but decrypts it only once the read
    is permitted; a version's consent metadata comes from the index once, then from memory,
    until an erasure's restriction drops it."""
    consents, log, p1 = await setup(client)
    records = client.app.state.gateway.records  # type: ignore[attr-defined]
    source = records.meta_source
    assert source is not None
    opened: list[str] = []
    asked: list[tuple[str, str, int]] = []
    open_fetched = records.pipeline.open_fetched

    def spy_open(anchor: Any, fetched: Any) -> dict[str, Any]:
        opened.append(anchor.record)
        result: dict[str, Any] = open_fetched(anchor, fetched)
        return result

    async def spy_meta(custodian: str, record: str, version: int) -> Any:
        asked.append((custodian, record, version))
        return await source(custodian, record, version)

    records.pipeline.open_fetched = spy_open
    records.meta_source = spy_meta
    h = hospital(client)
    assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 404
    assert opened == [] and len(asked) == 1
    consents.put(p1, grant("c-1", HOSPITAL))
    for _ in range(2):
        ok = await client.get("/fhir/Observation/o1", headers=h)
        assert ok.status_code == 200 and ok.json()["id"] == "o1"
    assert len(opened) == 2 and len(asked) == 1
    assert [e.decision.permitted for e in log.events[-3:]] == [False, True, True]
    records.forget([p1])
    assert (await client.get("/fhir/Observation/o1", headers=h)).status_code == 200
    assert len(asked) == 2


async def test_a_bundle_written_for_one_patient_is_one_logged_event_naming_each_record(
    client: httpx.AsyncClient,
) -> None:
    """A write is logged like a search, one event per patient (and interaction and decision)
    naming every record written, not one per resource."""
    _consents, log, p1 = await setup(client)
    p2 = client.app.state.gateway.records.patient_of("Patient", "p2")  # type: ignore[attr-defined]
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"w{n}",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "718-7"}]},
                "subject": {"reference": f"Patient/{patient}"},
            },
            "request": {"method": "PUT", "url": f"Observation/w{n}"},
        }
        for n, patient in enumerate(["p1", "p1", "p1", "p2"])
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    r = await client.post(
        "/fhir", content=json.dumps(bundle), headers={"content-type": "application/fhir+json"}
    )
    assert r.status_code == 200, r.text
    written = [e for e in log.events if e.interaction == "create"]
    assert sorted((e.patient, e.records) for e in written) == sorted(
        [
            (p1, tuple(f"Observation/w{n}/_history/1" for n in range(3))),
            (p2, ("Observation/w3/_history/1",)),
        ]
    )
    assert all(e.decision.permitted for e in written)
