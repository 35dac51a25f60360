"""The access log (gateway/access_log.py) on both profiles: every read of an authenticated
caller becomes a sealed IHE BALP AuditEvent and an ``access`` leaf of exactly
``{v, kind, patient, decision, sha256, source, time}``; ``GET /fhir/AuditEvent?patient=``
answers each AuditEvent with its salt and receipt, which an independent verifier checks here
with the ``rfc8785`` package (the hash) and pymerkle (the inclusion proof); a patient token
sees only its own; concurrent calls share one blob-store write and one ledger append;
break-glass is flagged, queued and counted; the history survives the patient's key being
destroyed and a restart; every AuditEvent is valid R4 by the HAPI validator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import rfc8785
from fastapi import FastAPI

from gateway.access import AccessDecision, AccessEvent
from gateway.access_log import SALT_URL, audit_event
from gateway.app import create_app
from gateway.auth.caller import Caller
from gateway.auth.errors import AuthenticationError
from gateway.auth.guard import issuer_of, token_key
from gateway.auth.policy import PRIVACY_OFFICER_ROLE
from gateway.auth.registry import ClientRecord
from gateway.auth.scopes import parse_scopes
from gateway.auth.tokens import MAX_LIFETIME, TokenService
from gateway.backends.state_memory import MemoryStateStore
from gateway.config import Settings
from gateway.fhir import RECEIPT_URL
from gateway.runtime import Gateway
from ledger.canonical import canonical_json
from ledger.checkpoint import SignedCheckpoint
from ledger.leaves import decode_leaf
from ledger.merkle import leaf_hash
from ledger.verify import verify_checkpoint, verify_inclusion
from tests.fhir_validator import ReferenceValidator, describe
from tests.gateway.conftest import FHIR, TEST_SCOPE, auth_headers, demo_bundle

ACCESS_FIELDS = {"v", "kind", "patient", "decision", "sha256", "source", "time"}


@pytest.fixture
async def app(gw_settings: Settings) -> AsyncIterator[FastAPI]:
    """A started gateway app."""
    app = create_app(gw_settings)
    async with app.router.lifespan_context(app):
        yield app


def _http(app: FastAPI, headers: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=headers
    )


def token(
    app: FastAPI,
    *,
    client_id: str,
    kind: str = "system",
    patient: str | None = None,
    user: str | None = None,
    role: str | None = None,
    purposes: tuple[str, ...] = ("TREAT",),
    break_glass: str | None = None,
    scope: str = TEST_SCOPE,
) -> dict[str, str]:
    """An Authorization header of a client registered on ``app`` (any profile)."""
    settings: Settings = app.state.gateway.settings
    if kind == "system":
        app.state.auth.registry.put(
            ClientRecord(
                client_id=client_id,
                institution=settings.institution,
                scopes=tuple(scope.split()),
                purposes=purposes,
                roles=(role,) if role else (),
                break_glass=break_glass is not None,
            )
        )
    service = TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=settings.institution,
        registry=app.state.auth.registry,
        state=MemoryStateStore(),
    )
    raw, _exp = service.mint(
        client_id=client_id,
        institution=settings.institution,
        kind=kind,
        scopes=parse_scopes(scope if kind == "system" else "patient/*.rs"),
        purposes=purposes if kind == "system" else ("PATRQT",),
        patient=patient,
        user=user,
        role=role,
        break_glass=break_glass,
    )
    return {"Authorization": f"Bearer {raw}"}


def officer(app: FastAPI) -> dict[str, str]:
    """The privacy officer's header."""
    return token(app, client_id="privacy-desk", user="po-1", role=PRIVACY_OFFICER_ROLE)


async def _store(app: FastAPI) -> tuple[str, str, str]:
    """Store the demo Bundle; (Patient id, Observation id, patient pseudonym)."""
    async with _http(app, auth_headers(app)) as c:
        r = await c.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
        assert r.status_code == 200, r.text
    locations = [e["response"]["location"].split("/") for e in r.json()["entry"]]
    pid = next(loc[1] for loc in locations if loc[0] == "Patient")
    oid = next(loc[1] for loc in locations if loc[0] == "Observation")
    pseudonym = app.state.gateway.records.patient_of("Patient", pid)
    assert pseudonym is not None
    return pid, oid, pseudonym


#: The interactions of writes: storing the test data is logged too (every decision of an
#: authenticated request is), and these tests look at the reads.
WRITES = ("create", "update", "delete")


def _reads(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of an AuditEvent searchset that are not about writes."""
    return [e for e in bundle.get("entry", []) if e["resource"]["subtype"][0]["code"] not in WRITES]


def _salt(entry: dict[str, Any]) -> bytes:
    (value,) = [x["valueBase64Binary"] for x in entry["extension"] if x["url"] == SALT_URL]
    return base64.b64decode(value)


def _receipt(entry: dict[str, Any]) -> dict[str, Any]:
    (ext,) = [x for x in entry["extension"] if x["url"] == RECEIPT_URL]
    out: dict[str, Any] = {}
    for part in ext["extension"]:
        value = next(v for k, v in part.items() if k.startswith("value"))
        out[part["url"]] = value
    return out


async def _verify_entry(app: FastAPI, entry: dict[str, Any]) -> dict[str, Any]:
    """Check one AuditEvent entry as an independent verifier would: the salted RFC 8785
    hash against the leaf, the leaf's inclusion (pymerkle, and the project's verifier) in the
    signed checkpoint. Returns the decoded leaf."""
    pymerkle = pytest.importorskip("pymerkle")
    gw: Gateway = app.state.gateway
    resource, salt = entry["resource"], _salt(entry)
    assert len(salt) == 32
    digest = hashlib.sha256(salt + rfc8785.dumps(resource)).hexdigest()
    receipt = _receipt(entry)
    index, size = receipt["leafIndex"], receipt["treeSize"]
    root = base64.b64decode(receipt["rootHash"])
    raw_proof = base64.b64decode(receipt["inclusionProof"])
    proof = [raw_proof[i : i + 32] for i in range(0, len(raw_proof), 32)]
    async with _http(app, auth_headers(app)) as c:
        page = (await c.get("/ledger/leaves", params={"start": 0, "end": size})).json()
    leaves = [base64.b64decode(x) for x in page["leaves"]]
    raw = leaves[index]
    leaf = decode_leaf(raw)
    assert set(leaf) == ACCESS_FIELDS and leaf["kind"] == "access", leaf
    assert leaf["sha256"] == digest
    assert leaf["source"] == gw.settings.institution
    verify_inclusion(leaf_hash(raw), index, size, proof, root)
    signed = SignedCheckpoint.from_bytes(base64.b64decode(receipt["checkpoint"]))
    checkpoint = verify_checkpoint(signed, gw.trusted)
    assert (checkpoint.size, checkpoint.root) == (size, root)
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    for data in leaves:
        tree.append_entry(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert tree.get_root(size) == root
        path = tree.prove_inclusion(index + 1, size).serialize()["path"]
    assert [bytes.fromhex(h) for h in path] == [leaf_hash(raw), *proof]
    # The leaf's container (the record leaf right after the access leaves of its batch)
    # names the block the receipt points to.
    return leaf


async def test_a_read_is_logged_and_provable_to_the_officer(app: FastAPI) -> None:
    pid, oid, pseudonym = await _store(app)
    async with _http(app, auth_headers(app)) as c:
        assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 200
    async with _http(app, officer(app)) as c:
        r = await c.get("/fhir/AuditEvent", params={"patient": f"Patient/{pid}"})
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "searchset"
    (entry,) = _reads(bundle)
    leaf = await _verify_entry(app, entry)
    assert (leaf["patient"], leaf["decision"]) == (pseudonym, "permit")
    event = entry["resource"]
    assert event["resourceType"] == "AuditEvent" and event["action"] == "R"
    assert event["subtype"][0]["code"] == "read" and event["outcome"] == "0"
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    refs = [e["what"].get("reference") for e in event["entity"] if "what" in e]
    assert f"Observation/{oid}/_history/1" in refs
    assert event["agent"][0]["who"]["identifier"]["value"] == "test-his"
    # the patient only by pseudonym: no identifier of the demo patient in the AuditEvent
    text = json.dumps(event)
    patient = next(
        e["resource"] for e in demo_bundle()["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    for ident in patient.get("identifier", []):
        assert ident["value"] not in text
    assert pseudonym in text
    # the same AuditEvent by id is no clinical record of the FHIR API
    async with _http(app, auth_headers(app)) as c:
        assert (await c.get(f"/fhir/AuditEvent/{event['id']}")).status_code == 404


async def test_patient_sees_only_its_own_history_and_others_are_refused(app: FastAPI) -> None:
    pid, oid, pseudonym = await _store(app)
    other = {
        "resourceType": "Patient",
        "id": "other-1",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.19", "value": "OTHER-77"}],
    }
    async with _http(app, auth_headers(app)) as c:
        r = await c.put("/fhir/Patient/other-1", content=json.dumps(other), headers=FHIR)
        assert r.status_code in (200, 201), r.text
        assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 200
        assert (await c.get("/fhir/Patient/other-1")).status_code == 200
        assert (await c.get(f"/fhir/Patient/{pid}")).status_code == 200
    own = token(app, client_id="portal", kind="patient", patient=pseudonym)
    async with _http(app, own) as c:
        mine = await c.get("/fhir/AuditEvent")
        assert mine.status_code == 200, mine.text
        assert len(_reads(mine.json())) == 2
        for entry in mine.json()["entry"]:
            assert (await _verify_entry(app, entry))["patient"] == pseudonym
        named = await c.get("/fhir/AuditEvent", params={"patient": f"Patient/{pid}"})
        assert named.status_code == 200 and len(_reads(named.json())) == 2
        theirs = await c.get("/fhir/AuditEvent", params={"patient": "Patient/other-1"})
        assert theirs.status_code == 403
        assert theirs.json()["resourceType"] == "OperationOutcome"
        # paging: newest first, one per page, the next link continues
        first = (await c.get("/fhir/AuditEvent", params={"_count": "1"})).json()
        (nxt,) = [link["url"] for link in first["link"] if link["relation"] == "next"]
        second = (await c.get(nxt)).json()
        ids = [first["entry"][0]["resource"]["id"], second["entry"][0]["resource"]["id"]]
        assert len(set(ids)) == 2
    # a system client without the privacy officer's role is refused
    async with _http(app, auth_headers(app)) as c:
        assert (await c.get("/fhir/AuditEvent", params={"patient": pid})).status_code == 403
    async with _http(app, officer(app)) as c:
        r = await c.get("/fhir/AuditEvent", params={"patient": "Patient/other-1"})
        assert r.status_code == 200 and len(_reads(r.json())) == 1
        unknown = await c.get("/fhir/AuditEvent", params={"patient": "Patient/nobody"})
        assert unknown.status_code == 200 and unknown.json()["total"] == 0
        for params, where in (
            ({}, "patient"),
            ({"patient": pid, "_count": "0"}, "_count"),
            ({"patient": pid, "_cursor": "x"}, "_cursor"),
            ({"patient": pid, "date": "2026"}, "query"),
            ({"patient": "Patient/a/b"}, "patient"),
        ):
            bad = await c.get("/fhir/AuditEvent", params=params)
            assert bad.status_code == 400, (params, bad.text)
            assert bad.json()["issue"][0]["expression"] == [where]


def _caller(app: FastAPI, **extra: Any) -> Caller:
    gw: Gateway = app.state.gateway
    values: dict[str, Any] = {
        "client_id": "his-9",
        "institution": gw.settings.institution,
        "kind": "system",
        "purpose": "TREAT",
        "user": "dr-wang",
        "role": "physician",
    }
    values.update(extra)
    return Caller(**values)


async def test_concurrent_calls_share_one_blob_write_and_one_ledger_append(
    app: FastAPI,
) -> None:
    gw: Gateway = app.state.gateway
    _pid, _oid, pseudonym = await _store(app)
    blobs = gw.backends.blobs
    calls: list[int] = []
    put_many = blobs.put_many

    async def counting(blocks: Sequence[bytes]) -> list[str]:
        calls.append(len(blocks))
        return await put_many(blocks)

    blobs.put_many = counting  # type: ignore[method-assign]
    before = gw.ledger.stats.batches_written
    size = gw.ledger.size
    caller = _caller(app)
    events = [
        AccessEvent(
            caller,
            "read",
            pseudonym,
            AccessDecision(True, "consent permits", consent_id=f"c-{n}", path="provision"),
            records=(f"Observation/o-{n}/_history/1",),
        )
        for n in range(20)
    ]
    await asyncio.gather(*(gw.access_log.record([e]) for e in events))
    assert calls == [1], calls  # one blob-store call, one container
    assert gw.ledger.stats.batches_written == before + 1
    assert gw.ledger.size == size + 21  # 20 access leaves and their container
    found = [
        f
        for f in await gw.access_log.history([pseudonym], count=100)
        if f.resource["subtype"][0]["code"] not in WRITES
    ]
    assert len(found) == 20
    assert {f.logged.leaf_index for f in found} == set(range(size, size + 20))
    assert len({f.logged.container.cid for f in found}) == 1
    consents = {
        e["what"]["identifier"]["value"]
        for f in found
        for e in f.resource["entity"]
        if e.get("what", {}).get("type") == "Consent"
    }
    assert consents == {f"c-{n}" for n in range(20)}


async def test_break_glass_is_flagged_queued_and_counted(app: FastAPI) -> None:
    gw: Gateway = app.state.gateway
    pid, _oid, pseudonym = await _store(app)
    reason = 'cardiac arrest, "unconscious" — 心脏骤停'
    caller = _caller(app, purpose="ETREAT", break_glass=reason)
    decision = AccessDecision(True, "emergency access", break_glass=True)
    await gw.access_log.record(
        [AccessEvent(caller, "read", pseudonym, decision, records=("Observation/x/_history/1",))]
    )
    async with _http(app, officer(app)) as c:
        queue = await c.get("/consent/break-glass")
        assert queue.status_code == 200, queue.text
        (entry,) = queue.json()["entry"]
        await _verify_entry(app, entry)
        event = entry["resource"]
        assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG"} in [
            {k: v for k, v in s.items() if k != "display"} for s in event["meta"]["security"]
        ]
        codes = [p["coding"][0]["code"] for p in event["purposeOfEvent"]]
        assert codes == ["ETREAT", "BTG"]
        assert reason in event["outcomeDesc"]
        # the AuditEvent of the history is the same one
        history = await c.get("/fhir/AuditEvent", params={"patient": pid})
        assert [e["resource"]["id"] for e in _reads(history.json())] == [event["id"]]
        done = await c.post(f"/consent/break-glass/{event['id']}/reviewed")
        assert done.status_code == 200, done.text
        assert (await c.get("/consent/break-glass")).json()["total"] == 0
        again = await c.post(f"/consent/break-glass/{event['id']}/reviewed")
        assert again.status_code == 404
    async with _http(app, auth_headers(app)) as c:
        assert (await c.get("/consent/break-glass")).status_code == 403
        metrics = (await c.get("/metrics")).text
    line = f'gateway_break_glass_total{{institution="{gw.settings.institution}"}} 1.0'
    assert line in metrics
    # the queue names ids, pseudonyms and times only: never the stated reason
    queued = gw.paths.break_glass_queue.read_text("utf-8")
    assert event["id"] in queued and "cardiac" not in queued


async def test_history_survives_erasure_of_the_patient_key_and_a_restart(
    gw_settings: Settings,
) -> None:
    app = create_app(gw_settings)
    async with app.router.lifespan_context(app):
        pid, oid, pseudonym = await _store(app)
        async with _http(app, auth_headers(app)) as c:
            assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 200
        gw: Gateway = app.state.gateway
        audit_kek, _ = await gw.access_log.audit_key()
        destroyed = await gw.backends.keys.destroy_kek(pseudonym)
        assert destroyed != audit_kek  # the audit key is not the patient's
        async with _http(app, auth_headers(app)) as c:
            assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 410
        async with _http(app, officer(app)) as c:
            r = await c.get("/fhir/AuditEvent", params={"patient": pid})
        assert r.status_code == 200 and len(_reads(r.json())) == 2
    again = create_app(gw_settings)
    async with again.router.lifespan_context(again):
        async with _http(again, officer(again)) as c:
            r = await c.get("/fhir/AuditEvent", params={"patient": pid})
        assert r.status_code == 200 and len(_reads(r.json())) == 2, r.text
        for entry in r.json()["entry"]:
            await _verify_entry(again, entry)


async def test_search_and_deny_events_are_valid_r4_by_the_reference_validator(
    reference_validator: ReferenceValidator,
) -> None:
    at = datetime(2026, 11, 28, 19, 41, 38, 123000, tzinfo=UTC)
    system = Caller(
        client_id="his-1",
        institution="hosp-b",
        kind="system",
        purpose="TREAT",
        user="dr-li",
        role="physician",
    )
    patient = Caller(
        client_id="portal",
        institution="hosp-a",
        kind="patient",
        purpose="PATRQT",
        patient="ab" * 32,
    )
    glass = Caller(
        client_id="er-1",
        institution="hosp-b",
        kind="system",
        purpose="ETREAT",
        break_glass="unconscious",
    )
    events = [
        AccessEvent(
            system,
            "read",
            "ab" * 32,
            AccessDecision(True, "permit", consent_id="c-1", path="provision", consent_version=7),
            records=("Observation/o-1/_history/2",),
            at=at,
        ),
        AccessEvent(
            system,
            "search",
            "ab" * 32,
            AccessDecision(False, "consent denies"),
            query="Observation?code=http://loinc.org|718-7&patient=Patient/p-1",
            at=at,
        ),
        AccessEvent(patient, "everything", "ab" * 32, AccessDecision(True), at=at),
        AccessEvent(
            glass,
            "vread",
            "ab" * 32,
            AccessDecision(True, "emergency", break_glass=True),
            records=("Observation/o-1/_history/1",),
            at=at,
        ),
    ]
    resources = [
        audit_event(e, institution="hosp-a", event_id=f"e{n}") for n, e in enumerate(events)
    ]
    results = reference_validator.validate(resources)
    assert all(not r.errors for r in results), describe(results)


def test_canonical_bytes_are_rfc8785() -> None:
    caller = Caller(
        client_id="his-1",
        institution="hosp-b",
        kind="system",
        purpose="ETREAT",
        user='Dr. "Li" \\ 李',
        break_glass="tab\there, é, 😀",
    )
    for decision in (AccessDecision(True), AccessDecision(True, "x", break_glass=True)):
        event = audit_event(
            AccessEvent(caller, "read", "ab" * 32, decision, records=("Observation/1/_history/1",)),
            institution="hosp-a",
            event_id="e1",
        )
        assert canonical_json(event) == rfc8785.dumps(event)
    ascii_only = audit_event(
        AccessEvent(
            Caller(client_id="c", institution="i", kind="system"),
            "read",
            "ab" * 32,
            AccessDecision(False),
        ),
        institution="hosp-a",
        event_id="e2",
    )
    assert canonical_json(ascii_only) == rfc8785.dumps(ascii_only)


async def test_break_glass_tokens_are_short_lived(app: FastAPI) -> None:
    """A break-glass token lasts at most five minutes (SMART's cap on every access token) and
    is refused once expired."""
    settings: Settings = app.state.gateway.settings
    now = [time.time()]
    service = TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=settings.institution,
        registry=app.state.auth.registry,
        state=MemoryStateStore(),
        lifetime=3600,  # asked for an hour: capped
        clock=lambda: now[0],
    )
    app.state.auth.registry.put(
        ClientRecord(
            client_id="er-1",
            institution=settings.institution,
            scopes=("system/*.r",),
            purposes=("ETREAT",),
            break_glass=True,
        )
    )
    raw, exp = service.mint(
        client_id="er-1",
        institution=settings.institution,
        kind="system",
        scopes=parse_scopes("system/*.r"),
        purposes=("ETREAT",),
        break_glass="unconscious",
    )
    assert exp - now[0] <= MAX_LIFETIME == 300
    caller = service.verify(f"Bearer {raw}")
    assert caller.break_glass == "unconscious"
    now[0] = exp + 1
    with pytest.raises(AuthenticationError, match="expired"):
        service.verify(f"Bearer {raw}")


async def test_a_read_with_a_break_glass_token_is_flagged_and_queued(app: FastAPI) -> None:
    """A read over HTTP with a break-glass token (an emergency purpose and a stated reason)
    is flagged in its AuditEvent, queued for the officer and counted, whatever the policy's
    decision says."""
    gw: Gateway = app.state.gateway
    pid, oid, _pseudonym = await _store(app)
    er = token(app, client_id="er-1", purposes=("ETREAT",), break_glass="unconscious on arrival")
    async with _http(app, er) as c:
        assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 200
    async with _http(app, auth_headers(app)) as c:
        assert (await c.get(f"/fhir/Observation/{oid}")).status_code == 200  # not break-glass
    async with _http(app, officer(app)) as c:
        queue = (await c.get("/consent/break-glass")).json()
        history = (await c.get("/fhir/AuditEvent", params={"patient": pid})).json()
    (entry,) = queue["entry"]
    event = entry["resource"]
    assert event["agent"][0]["who"]["identifier"]["value"] == "er-1"
    assert "unconscious on arrival" in event["outcomeDesc"]
    assert [s["code"] for s in event["meta"]["security"]] == ["BTG"]
    reads = _reads(history)
    assert len(reads) == 2
    flagged = ["meta" in e["resource"] for e in reads]
    assert sorted(flagged) == [False, True]
    metrics = gw.metrics.registry.get_sample_value(
        "gateway_break_glass_total", {"institution": gw.settings.institution}
    )
    assert metrics == 1.0
