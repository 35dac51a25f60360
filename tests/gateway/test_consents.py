"""Consents as data (gateway/consents.py, gateway/api/consent.py): record, revoke and read back
through the API; the administrative default anchored at start; located 422s and bounds; the
on-behalf rules; a patient token kept to its own consents; ``$explain``; the exact shape of the
``consent`` leaf and ``gateway verify`` opening every sealed Consent; and, on the real services,
a consent recorded at one institution's gateway seen (and its revocation seen before the next
``policy_for``) by another institution's gateway whose ledger follower is off."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
from fastapi import FastAPI
from pydantic import SecretStr

from gateway import consent as consent_core
from gateway.app import create_app
from gateway.auth.dev import dev_token
from gateway.auth.policy import PRIVACY_OFFICER_ROLE
from gateway.auth.scopes import parse_scopes
from gateway.backends.protocols import Backends
from gateway.consent import (
    ACT_REASON,
    CONSENT_SCOPE,
    PARTICIPATION_TYPE,
    RESOURCE_TYPES,
    AccessQuery,
    RecordMeta,
)
from gateway.consents import ConsentView, consent_token, open_consent
from gateway.runtime import Gateway, build_backends, load_secrets
from gateway.verify_cmd import run_verify
from gateway.views import PatientLinks
from ledger.leaves import ConsentLeaf, decode_leaf, encode_leaf
from tests.fakes import FailingBlobs
from tests.gateway.conftest import FHIR, settings_for, token_service
from tests.gateway.test_records import _clients, _shared

MASTER = "urn:oid:2.16.156.10011.1.19"
HCN_A = "H-CONSENT-0001"
HCN_B = "H-CONSENT-0002"
NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def org(name: str) -> dict[str, Any]:
    """A requester actor: the institution ``name``."""
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
        "reference": {"reference": f"Organization/{name}"},
    }


def grant(to: str, *, rtype: str = "Observation") -> dict[str, Any]:
    """A provision: ``to`` may read ``rtype`` records for treatment."""
    return {
        "type": "permit",
        "actor": [org(to)],
        "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
        "class": [{"system": RESOURCE_TYPES, "code": rtype}],
    }


def consent(
    *,
    patient: str = HCN_A,
    status: str = "active",
    provision: dict[str, Any] | None = None,
    performer: bool = True,
    source: bool = True,
) -> dict[str, Any]:
    """A privacy Consent naming the patient by the master identifier."""
    body: dict[str, Any] = {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": MASTER, "value": patient}},
        "dateTime": "2026-01-01T00:00:00Z",
        "provision": provision or grant("hosp-b"),
    }
    if performer:
        body["performer"] = [{"display": "registration desk"}]
    if source:
        body["sourceAttachment"] = {"contentType": "application/pdf", "title": "signed form"}
    return body


def patient_headers(app: FastAPI, hcn: str, scope: str = "patient/Consent.crus") -> dict[str, str]:
    token = dev_token(app.state.gateway.settings, client_id="portal", scope=scope, patient=hcn)
    return {"Authorization": f"Bearer {token}"}


def officer_headers(app: FastAPI, *, role: str = PRIVACY_OFFICER_ROLE) -> dict[str, str]:
    s = app.state.gateway.settings
    service = token_service(app)
    token, _exp = service.mint(
        client_id="privacy-desk",
        institution=s.institution,
        kind="system",
        scopes=parse_scopes("system/Consent.r"),
        purposes=("TREAT",),
        user="officer-1",
        role=role,
        dev=True,
    )
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Env:
    app: FastAPI
    http: httpx.AsyncClient
    gw: Gateway

    def system(self, scope: str = "system/Consent.crus") -> dict[str, str]:
        token = dev_token(self.gw.settings, client_id="his", scope=scope, purpose="TREAT")
        return {"Authorization": f"Bearer {token}"}

    async def consent_leaves(self) -> list[tuple[int, bytes]]:
        raw = await self.gw.ledger.leaves(0, self.gw.ledger.size)
        return [(i, b) for i, b in enumerate(raw) if decode_leaf(b)["kind"] == "consent"]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = settings_for("embedded", tmp_path / "gw", institution="clinic-a")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        yield Env(app, http, app.state.gateway)
        await http.aclose()


async def test_default_is_anchored_once_at_start_as_a_leaf_without_patient(
    tmp_path: Path,
) -> None:
    settings = settings_for("embedded", tmp_path / "gw", institution="clinic-a")
    for _ in range(2):  # a restart finds it on the ledger and anchors nothing
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            gw: Gateway = app.state.gateway
            leaves = [decode_leaf(b) for b in await gw.ledger.leaves(0, gw.ledger.size)]
            consents = [leaf for leaf in leaves if leaf["kind"] == "consent"]
            assert len(consents) == 1, consents
            (leaf,) = consents
            assert set(leaf) == {"v", "kind", "consent", "version", "action", "sha256", "cid"} | {
                "source",
                "time",
            }
            assert leaf["source"] == "clinic-a" and leaf["action"] == "grant"
            policy = (await gw.consents.policy_for("ab" * 32)).policy
            assert policy.consent_ids == ("default-clinic-a",)


async def test_record_read_revoke_and_the_leaf(env: Env) -> None:
    http, gw = env.http, env.gw
    r = await http.post(
        "/fhir/Consent", content=json.dumps(consent()), headers={**FHIR, **env.system()}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    cid = body["id"]
    assert body["meta"]["versionId"] == "1"
    assert r.headers["location"].endswith(f"/fhir/Consent/{cid}/_history/1")
    (receipt,) = body["meta"]["extension"]
    assert receipt["url"].endswith("ledger-receipt")
    leaf_index = int(r.headers["x-ledger-leaf-index"])

    # the leaf: exactly its fields, no identifier, the salted hash of what was sealed
    raw = (await gw.ledger.leaves(leaf_index, leaf_index + 1))[0]
    assert HCN_A.encode() not in raw and cid.encode() not in raw
    leaf = decode_leaf(raw)
    assert set(leaf) == {
        "v",
        "kind",
        "consent",
        "version",
        "action",
        "sha256",
        "cid",
        "patient",
        "source",
        "time",
    }
    pseudonym = gw.consents.patient_of_master_id(HCN_A)
    assert leaf["patient"] == pseudonym and leaf["action"] == "grant" and leaf["version"] == 1
    assert leaf["consent"] == consent_token(gw.pseudonym_key, cid)
    typed = ConsentLeaf.from_leaf(leaf)
    block = await gw.backends.blobs.get(typed.cid)
    assert HCN_A.encode() not in block
    salt, sealed = open_consent(block, typed, key=gw.consents._key)
    assert len(salt) == 32
    assert hashlib.sha256(salt + rfc8785.dumps(sealed)).hexdigest() == leaf["sha256"]
    assert hashlib.sha256(rfc8785.dumps(sealed)).hexdigest() != leaf["sha256"]
    assert sealed["patient"]["identifier"]["value"] == HCN_A

    # read back: by id, by version, by patient, history
    got = await http.get(f"/fhir/Consent/{cid}", headers=env.system())
    assert got.status_code == 200 and got.json()["provision"] == consent()["provision"]
    assert (await gw.consents.policy_for(pseudonym)).version == leaf_index
    q = {"patient:identifier": f"{MASTER}|{HCN_A}"}
    found = await http.get("/fhir/Consent", params=q, headers=env.system())
    assert found.status_code == 200 and [e["resource"]["id"] for e in found.json()["entry"]] == [
        cid
    ]

    # revoke: a new version with status inactive, anchored as action revoke
    revoked = consent(status="inactive")
    r2 = await http.put(
        f"/fhir/Consent/{cid}", content=json.dumps(revoked), headers={**FHIR, **env.system()}
    )
    assert r2.status_code == 200 and r2.json()["meta"]["versionId"] == "2", r2.text
    leaf2 = decode_leaf((await gw.ledger.leaves(gw.ledger.size - 1, gw.ledger.size))[0])
    assert leaf2["action"] == "revoke" and leaf2["version"] == 2
    assert leaf2["consent"] == leaf["consent"] and leaf2["sha256"] != leaf["sha256"]
    compiled = await gw.consents.policy_for(pseudonym)
    assert cid in compiled.policy.inactive_ids and cid not in compiled.policy.consent_ids
    assert compiled.version == gw.ledger.size - 1
    q_read = AccessQuery(
        "hosp-b", "TREAT", NOW, record=RecordMeta("Observation", custodian="clinic-a")
    )
    assert not compiled.policy.evaluate(q_read).permitted
    v1 = await http.get(f"/fhir/Consent/{cid}/_history/1", headers=env.system())
    assert v1.status_code == 200 and v1.json()["status"] == "active"
    hist = await http.get(f"/fhir/Consent/{cid}/_history", headers=env.system())
    assert [e["resource"]["meta"]["versionId"] for e in hist.json()["entry"]] == ["2", "1"]
    assert (
        await http.get(f"/fhir/Consent/{cid}/_history/3", headers=env.system())
    ).status_code == 404
    assert (await http.get("/fhir/Consent/nope", headers=env.system())).status_code == 404


async def test_consents_never_go_through_the_record_store(env: Env) -> None:
    http, gw = env.http, env.gw
    size = gw.ledger.size
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": consent(), "request": {"method": "POST", "url": "Consent"}}],
    }
    all_scopes = env.system("system/*.cruds")
    r = await http.post("/fhir", content=json.dumps(bundle), headers={**FHIR, **all_scopes})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == [
        "Bundle.entry[0].resource"
    ], r.text
    batch = {**bundle, "type": "batch"}
    r = await http.post("/fhir", content=json.dumps(batch), headers={**FHIR, **all_scopes})
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"].startswith("422")
    assert gw.ledger.size == size
    cid = (
        await http.post(
            "/fhir/Consent", content=json.dumps(consent()), headers={**FHIR, **all_scopes}
        )
    ).json()["id"]
    for method, url in (("DELETE", f"/fhir/Consent/{cid}"), ("GET", "/fhir/Consent/_history")):
        r = await http.request(method, url, headers=all_scopes)
        assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome", r.text
    assert not gw.index.has_patient(gw.consents.patient_of_master_id(HCN_A))
    assert (await http.get(f"/fhir/Consent/{cid}", headers=all_scopes)).status_code == 200


def _issue(r: httpx.Response) -> tuple[str, str]:
    issue = r.json()["issue"][0]
    return issue.get("expression", [""])[0], issue["diagnostics"]


async def test_bad_provisions_are_located_422s(env: Env) -> None:
    http, h = env.http, {**FHIR, **env.system()}
    deep: dict[str, Any] = {"type": "deny"}
    node = deep
    for _ in range(consent_core.MAX_DEPTH + 1):
        node["provision"] = [{"type": "deny"}]
        node = node["provision"][0]
    bad_class = {**grant("hosp-b"), "class": [{"system": "http://example.org/x", "code": "X"}]}
    bad_actor = {
        **grant("hosp-b"),
        "actor": [{**org("hosp-b"), "reference": {"reference": "Device/1"}}],
    }
    nested_bad = {
        "type": "deny",
        "provision": [
            grant("hosp-b"),
            {"type": "permit", "purpose": [{"system": "urn:example:purpose", "code": "TREAT"}]},
        ],
    }
    size = env.gw.ledger.size
    for provision, where in (
        (deep, "Consent.provision.provision[0].provision[0].provision[0].provision[0]"),
        (bad_class, "Consent.provision.class[0]"),
        (bad_actor, "Consent.provision.actor[0].reference"),
        (nested_bad, "Consent.provision.provision[1].purpose[0]"),
    ):
        r = await http.post(
            "/fhir/Consent", content=json.dumps(consent(provision=provision)), headers=h
        )
        assert r.status_code == 422, r.text
        location, text = _issue(r)
        assert location.startswith(where), (location, where, text)
        assert HCN_A not in r.text
    no_scope = consent()
    del no_scope["scope"]
    r = await http.post("/fhir/Consent", content=json.dumps(no_scope), headers=h)
    assert r.status_code in (400, 422) and r.json()["resourceType"] == "OperationOutcome"
    unknown = consent()
    unknown["patient"] = {"identifier": {"system": "urn:local:mrn", "value": "123"}}
    r = await http.post("/fhir/Consent", content=json.dumps(unknown), headers=h)
    assert r.status_code == 422 and _issue(r)[0] == "Consent.patient.identifier"
    ref = consent()
    ref["patient"] = {"reference": "Patient/not-here"}
    r = await http.post("/fhir/Consent", content=json.dumps(ref), headers=h)
    assert r.status_code == 422 and _issue(r)[0] == "Consent.patient.reference"
    assert env.gw.ledger.size == size, "a refused Consent wrote to the ledger"


async def test_consents_per_patient_are_bounded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consent_core, "MAX_CONSENTS", 4)  # the default counts: 1 + 3 fit
    h = {**FHIR, **env.system()}
    ids = []
    for _ in range(3):
        r = await env.http.post("/fhir/Consent", content=json.dumps(consent()), headers=h)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = await env.http.post("/fhir/Consent", content=json.dumps(consent()), headers=h)
    assert r.status_code == 422 and "more than 4 consents" in r.text
    # another patient is not affected, and a new version of an existing one still fits
    other = await env.http.post(
        "/fhir/Consent", content=json.dumps(consent(patient=HCN_B)), headers=h
    )
    assert other.status_code == 201
    r = await env.http.put(
        f"/fhir/Consent/{ids[0]}", content=json.dumps(consent(status="inactive")), headers=h
    )
    assert r.status_code == 200, r.text


async def test_on_behalf_rules_and_patient_tokens(env: Env) -> None:
    http, app = env.http, env.app
    h = {**FHIR, **env.system()}
    r = await http.post("/fhir/Consent", content=json.dumps(consent(performer=False)), headers=h)
    assert r.status_code == 422 and _issue(r)[0] == "Consent.performer"
    r = await http.post("/fhir/Consent", content=json.dumps(consent(source=False)), headers=h)
    assert r.status_code == 422 and _issue(r)[0] == "Consent.source[x]"
    ref_source = {**consent(source=False), "sourceReference": {"reference": "DocumentReference/f1"}}
    assert (
        await http.post("/fhir/Consent", content=json.dumps(ref_source), headers=h)
    ).status_code == 201
    # the patient records their own without performer or form
    own = patient_headers(app, HCN_A)
    mine = await http.post(
        "/fhir/Consent",
        content=json.dumps(consent(performer=False, source=False)),
        headers={**FHIR, **own},
    )
    assert mine.status_code == 201, mine.text
    mine_id = mine.json()["id"]
    listed = await http.get("/fhir/Consent", headers=own)
    assert listed.status_code == 200 and len(listed.json()["entry"]) == 2
    # another patient's token reaches none of it
    other = patient_headers(app, HCN_B)
    size = env.gw.ledger.size
    cases = [
        http.post(
            "/fhir/Consent", content=json.dumps(consent(performer=False)), headers={**FHIR, **other}
        ),
        http.put(
            f"/fhir/Consent/{mine_id}",
            content=json.dumps(consent(patient=HCN_B)),
            headers={**FHIR, **other},
        ),
        http.get(f"/fhir/Consent/{mine_id}", headers=other),
        http.get(f"/fhir/Consent/{mine_id}/_history", headers=other),
        http.get(
            "/fhir/Consent", params={"patient:identifier": f"{MASTER}|{HCN_A}"}, headers=other
        ),
        http.get(
            "/consent/$explain",
            params={
                "patient:identifier": f"{MASTER}|{HCN_A}",
                "actor": "Organization/hosp-b",
                "purpose": "TREAT",
                "class": "Observation",
            },
            headers=other,
        ),
    ]
    for answer in await asyncio.gather(*cases):
        assert answer.status_code == 403, (answer.request.url, answer.text)
        assert HCN_A not in answer.text and answer.json()["issue"][0]["code"] == "forbidden"
    assert env.gw.ledger.size == size
    # B's own list is empty, not A's
    assert (await http.get("/fhir/Consent", headers=other)).json()["entry"] == []
    # a patient token without a Consent write scope is refused by the route table
    read_only = patient_headers(app, HCN_A, scope="patient/*.rs")
    r = await http.post(
        "/fhir/Consent", content=json.dumps(consent()), headers={**FHIR, **read_only}
    )
    assert r.status_code == 403
    # a client of another institution may not record here
    foreign = dev_token(
        env.gw.settings, client_id="x", scope="system/Consent.cu", institution="hosp-b"
    )
    r = await http.post(
        "/fhir/Consent",
        content=json.dumps(consent()),
        headers={**FHIR, "Authorization": f"Bearer {foreign}"},
    )
    assert r.status_code == 403


async def test_explain_a_permit_and_a_deny(env: Env) -> None:
    http, app = env.http, env.app
    h = {**FHIR, **env.system()}
    provision = {
        "type": "permit",
        "actor": [org("hosp-b")],
        "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
        "provision": [
            {"type": "deny", "class": [{"system": RESOURCE_TYPES, "code": "DiagnosticReport"}]}
        ],
    }
    cid = (
        await http.post(
            "/fhir/Consent", content=json.dumps(consent(provision=provision)), headers=h
        )
    ).json()["id"]
    base = {
        "patient:identifier": f"{MASTER}|{HCN_A}",
        "actor": "Organization/hosp-b",
        "purpose": "TREAT",
    }
    officer = officer_headers(app)
    permit = await http.get(
        "/consent/$explain", params={**base, "class": "Observation"}, headers=officer
    )
    assert permit.status_code == 200, permit.text
    out = permit.json()
    assert out["decision"]["permitted"] is True and out["decision"]["consent"] == cid
    assert out["decision"]["path"] == "Consent.provision"
    assert {m["consent"] for m in out["matches"]} >= {cid, "default-clinic-a"}
    assert set(out["consents"]) == {cid, "default-clinic-a"}
    deny = await http.get(
        "/consent/$explain", params={**base, "class": "DiagnosticReport"}, headers=officer
    )
    d = deny.json()
    assert d["decision"]["permitted"] is False and d["decision"]["consent"] == cid
    assert d["decision"]["path"] == "Consent.provision.provision[0]"
    assert any(m["type"] == "deny" and m["consent"] == cid for m in d["matches"])
    # the patient asks about themself; a system client without the role may not ask
    own = patient_headers(app, HCN_A, scope="patient/Consent.r")
    mine = await http.get(
        "/consent/$explain",
        params={"actor": "Organization/hosp-b", "purpose": "TREAT", "class": "Observation"},
        headers=own,
    )
    assert mine.status_code == 200 and mine.json()["decision"]["permitted"] is True
    clerk = officer_headers(app, role="clerk")
    assert (
        await http.get("/consent/$explain", params={**base, "class": "Observation"}, headers=clerk)
    ).status_code == 403
    assert (
        await http.get(
            "/consent/$explain", params={**base, "class": "Observation"}, headers=env.system()
        )
    ).status_code == 403
    bad = await http.get(
        "/consent/$explain", params={**base, "class": "observation"}, headers=officer
    )
    assert bad.status_code == 400 and _issue(bad)[0] == "class"


async def test_verify_opens_every_sealed_consent(tmp_path: Path) -> None:
    settings = settings_for("embedded", tmp_path / "gw", institution="clinic-a")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        token = dev_token(settings, client_id="his", scope="system/Consent.cu")
        h = {**FHIR, "Authorization": f"Bearer {token}"}
        cid = (await http.post("/fhir/Consent", content=json.dumps(consent()), headers=h)).json()[
            "id"
        ]
        r = await http.put(
            f"/fhir/Consent/{cid}", content=json.dumps(consent(status="inactive")), headers=h
        )
        assert r.status_code == 200
        await http.aclose()
    out = StringIO()
    with redirect_stdout(out):
        assert await run_verify(settings, blobs=True, from_checkpoint=None) == 0
    assert "3 sealed Consents opened and checked" in out.getvalue(), out.getvalue()
    wrong = settings.model_copy(update={"consent_key": SecretStr("00" * 32)})
    out = StringIO()
    with redirect_stdout(out):
        assert await run_verify(wrong, blobs=True, from_checkpoint=None) == 1
    assert "failed authentication" in out.getvalue()


async def test_concurrent_fresh_calls_share_one_lookup(env: Env) -> None:
    consents = env.gw.consents
    before = consents.fresh_lookups
    await asyncio.gather(*(consents.fresh() for _ in range(50)))
    assert 1 <= consents.fresh_lookups - before <= 2
    await consents.fresh()  # a call after they returned makes its own lookup
    assert consents.fresh_lookups - before <= 3


# ---- two institutions, one JetStream stream, one Kubo node -------------------------------


@pytest.mark.services
async def test_a_consent_recorded_at_a_is_seen_and_revoked_at_b_without_its_follower(
    services: Any, tmp_path: Path
) -> None:
    a_settings, b_settings = _shared(tmp_path, services, ["clinic-a", "hosp-b"])
    # B's follower is off: B learns of A's leaves only when asked to be fresh
    b_settings = b_settings.model_copy(update={"ledger_follow_interval_ms": 0.0})
    async with AsyncExitStack() as stack:
        a, b = await _clients(stack, [a_settings, b_settings])
        gw_a: Gateway = a.app.state.gateway  # type: ignore[attr-defined]
        gw_b: Gateway = b.app.state.gateway  # type: ignore[attr-defined]
        patient = gw_a.consents.patient_of_master_id(HCN_A)
        assert gw_b.consents.patient_of_master_id(HCN_A) == patient
        r = await a.post("/fhir/Consent", content=json.dumps(consent()), headers=FHIR)
        assert r.status_code == 201, r.text
        cid, leaf_index = r.json()["id"], int(r.headers["x-ledger-leaf-index"])
        read_a_lab = AccessQuery(
            "hosp-b", "TREAT", NOW, record=RecordMeta("Observation", custodian="clinic-a")
        )
        stale = await gw_b.consents.policy_for(patient)
        assert stale.version == 0 and not stale.policy.evaluate(read_a_lab).permitted
        await gw_b.consents.fresh()
        seen = await gw_b.consents.policy_for(patient)
        assert seen.version == leaf_index
        assert set(seen.policy.consent_ids) == {cid, "default-clinic-a", "default-hosp-b"}
        assert seen.policy.evaluate(read_a_lab).permitted
        assert patient in gw_b.consents.consented_patients()
        # the revocation at A: B's view is held back until fresh(), which B calls before a read
        r = await a.put(
            f"/fhir/Consent/{cid}", content=json.dumps(consent(status="inactive")), headers=FHIR
        )
        assert r.status_code == 200, r.text
        held_back = await gw_b.consents.policy_for(patient)
        assert held_back.version == leaf_index and held_back.policy.evaluate(read_a_lab).permitted
        await asyncio.gather(*(gw_b.consents.fresh() for _ in range(10)))
        after = await gw_b.consents.policy_for(patient)
        assert after.version == int(r.headers["x-ledger-leaf-index"]) > leaf_index
        assert not after.policy.evaluate(read_a_lab).permitted
        assert cid in after.policy.inactive_ids
        # B reads A's consent back through its own API (from the shared Kubo node)
        got = await b.get(f"/fhir/Consent/{cid}")
        assert got.status_code == 200 and got.json()["status"] == "inactive"
    for s in (a_settings, b_settings):
        out = StringIO()
        with redirect_stdout(out):
            assert await run_verify(s, blobs=True, from_checkpoint=None) == 0, out.getvalue()
        assert "4 sealed Consents opened" in out.getvalue()


def test_view_orders_versions_ignores_lost_races_and_follows_links() -> None:
    links = PatientLinks()
    view = ConsentView(links)
    cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    p, q, r = "aa" * 32, "bb" * 32, "ee" * 32

    def leaf(version: int, patient: str | None = p, token: str = "t1") -> bytes:
        return ConsentLeaf(
            token, version, "grant", "cd" * 32, cid, "clinic-a", "2026-12-01T03:00:00Z", patient
        ).encode()

    # a second version 1 (another gateway at the same time) and a gap are ignored by every view
    view.on_batch(10, [leaf(1), leaf(1), leaf(3)], 1)
    assert [view.accepted(i) for i in (10, 11, 12, 13)] == [True, False, False, None]
    view.on_batch(13, [leaf(2, patient=q), leaf(2, patient=None), leaf(2)], 2)
    assert [view.accepted(i) for i in (13, 14, 15)] == [False, False, True]
    assert [e.leaf.version for e in view.history("t1")] == [1, 2]
    assert view.version(p) == 15 and view.version(q) == 0 and view.version(r) == 0
    assert view.consented_patients() == {p}
    view.on_batch(16, [leaf(1, patient=None, token="d1")], 3)
    assert [e.leaf.consent for e in view.defaults()] == ["d1"] and view.version(p) == 15
    # a link (applied to the links by RecordIndex before this view) makes r the same person
    links.add(r, p)
    link = encode_leaf(
        "link",
        {"from": r, "to": p, "reason": "merge", "source": "a", "time": "2026-12-01T03:00:00Z"},
    )
    view.on_batch(17, [link], 4)
    assert view.consented_patients() == {p, r}
    assert view.version(r) == 15 and [e.leaf_index for e in view.current_of(r)] == [15]


async def test_a_gateway_starts_with_the_blob_store_down_and_anchors_its_default_later(
    tmp_path: Path,
) -> None:
    settings = settings_for("embedded", tmp_path / "gw", institution="clinic-a")
    _pkey, master = load_secrets(settings)
    real = build_backends(settings, master_key=master)
    blobs = FailingBlobs(real.blobs)  # down from the start
    backends = Backends(blobs=blobs, log=real.log, state=real.state, keys=real.keys)
    app = create_app(settings, backends=backends)
    async with app.router.lifespan_context(app):
        gw: Gateway = app.state.gateway
        gw.consents.retry_interval = 0.05
        token = consent_token(gw.pseudonym_key, "default-clinic-a")
        assert gw.consent_view.latest(token) is None
        await asyncio.sleep(0.2)
        assert gw.consent_view.latest(token) is None  # still down: nothing anchored
        blobs.down = False
        for _ in range(100):  # bounded: 5 s
            if gw.consent_view.latest(token) is not None:
                break
            await asyncio.sleep(0.05)
        assert gw.consent_view.latest(token) is not None
        assert (await gw.consents.policy_for("ab" * 32)).policy.consent_ids == ("default-clinic-a",)
