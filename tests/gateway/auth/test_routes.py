"""Every route of the app, from its own route table, against every kind of wrong caller.

The cases are generated from ``create_app(...).routes`` (every route, every method), not from a
hand list: a route added without an entry in gateway/auth/policy.py fails
:func:`test_every_route_has_a_rule`, and is refused by the guard anyway. For each protected
route: no token, a malformed token, an expired token, a token of another gateway (wrong
audience), a wrong scope or caller kind, another institution where that matters, a patient token
(reaching another patient on reads), a purpose the token lacks, several purposes with none
selected on reads. Each must be refused with the right status (401 or 403), answer an
OperationOutcome and nothing else, write nothing to the ledger, and be counted in /metrics; the
right caller must get through (a positive control, so the refusals are not an accident).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc.jwk import ECKey

from gateway.app import create_app
from gateway.auth.dev import dev_token
from gateway.auth.guard import issuer_of, token_key
from gateway.auth.peer import client_assertion, public_jwks
from gateway.auth.policy import FRAMEWORK_ROUTES, PRIVACY_OFFICER_ROLE, ROUTES, rule_for
from gateway.auth.registry import ClientRecord
from gateway.auth.scopes import parse_scopes
from gateway.auth.tokens import ASSERTION_TYPE, TokenService
from gateway.backends.state_memory import MemoryStateStore
from gateway.config import Settings
from tests.gateway.conftest import FHIR, FIXTURES, demo_bundle, settings_for

PATIENT_A = "HC-3301-0042-7788"  # the demo bundle's patient
PATIENT_B = "HC-9999-0000-0001"


def _flatten(routes: Any) -> list[tuple[str, str]]:
    """(method, path) of every route, whatever FastAPI's route objects are (FastAPI 0.165
    keeps included routers lazy: their effective routes carry the full path)."""
    out: list[tuple[str, str]] = []
    for route in routes:
        if hasattr(route, "effective_candidates"):
            out += _flatten(route.effective_candidates())
        elif hasattr(route, "methods") and hasattr(route, "path"):
            out += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
        elif hasattr(route, "routes"):
            out += _flatten(route.routes)
        else:
            raise AssertionError(f"a route of unknown shape: {route!r}")
    return out


def _route_cases() -> list[tuple[str, str]]:
    """(method, path) of every route of a freshly built app."""
    with tempfile.TemporaryDirectory(prefix="gw-routes-") as tmp:
        app = create_app(settings_for("embedded", Path(tmp) / "gw"))
        try:
            return _flatten(app.routes)
        finally:
            app.state.gateway.ledger.close()  # never started: close the stored tree it opened


ROUTE_CASES = _route_cases()


def test_every_route_has_a_rule() -> None:
    """A route without an entry in the policy table fails here (and is refused at runtime)."""
    assert ROUTE_CASES, "no routes found"
    missing = [
        (m, p) for m, p in ROUTE_CASES if rule_for(m, p) is None and p not in FRAMEWORK_ROUTES
    ]
    assert not missing, f"routes without an access rule in gateway/auth/policy.py: {missing}"
    stale = set(ROUTES) - set(ROUTE_CASES)
    assert not stale, f"rules for routes that do not exist: {stale}"


@dataclass
class World:
    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings
    observation: str  # id of an Observation of patient A
    good: dict[str, str]  # a token with every scope, purpose TREAT
    consent: str  # id of a Consent of patient A

    def token(self, **kw: Any) -> str:
        kw.setdefault("client_id", "test-his")
        kw.setdefault("scope", "system/*.cruds")
        return dev_token(self.settings, **kw)

    def officer(
        self,
        *,
        institution: str | None = None,
        role: str = PRIVACY_OFFICER_ROLE,
        scope: str = "system/*.rs",
    ) -> str:
        """A token naming a user with ``role`` (by default the privacy officer's)."""
        service = TokenService(
            key=token_key(self.settings),
            issuer=issuer_of(self.settings),
            institution=self.settings.institution,
            registry=self.app.state.auth.registry,
            state=MemoryStateStore(),
        )
        token, _ = service.mint(
            client_id="privacy-desk",
            institution=institution or self.settings.institution,
            kind="system",
            scopes=parse_scopes(scope),
            purposes=("TREAT",),
            user="po-1",
            role=role,
            dev=True,
        )
        return str(token)

    def minted(self, *, issuer: str | None = None, clock_offset: float = 0.0) -> str:
        service = TokenService(
            key=token_key(self.settings),
            issuer=issuer or issuer_of(self.settings),
            institution=self.settings.institution,
            registry=self.app.state.auth.registry,
            state=MemoryStateStore(),
            clock=lambda: time.time() + clock_offset,
        )
        token, _ = service.mint(
            client_id="test-his",
            institution=self.settings.institution,
            kind="system",
            scopes=parse_scopes("system/*.cruds"),
            purposes=("TREAT",),
            dev=True,
        )
        return str(token)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = settings_for("embedded", tmp_path / "gw")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        good = {
            "Authorization": "Bearer "
            + dev_token(settings, client_id="test-his", scope="system/*.cruds")
        }
        r = await http.post("/fhir", content=json.dumps(demo_bundle()), headers={**FHIR, **good})
        assert r.status_code == 200, r.text
        obs = next(
            e["response"]["location"].split("/")[1]
            for e in r.json()["entry"]
            if e["response"]["location"].startswith("Observation/")
        )
        r = await http.post(
            "/fhir/Consent", content=json.dumps(_consent()), headers={**FHIR, **good}
        )
        assert r.status_code == 201, r.text
        consent_id = r.json()["id"]
        app.state.auth.registry.put(
            ClientRecord(
                client_id="test-portal",
                institution=settings.institution,
                scopes=("patient/*.rs",),
                purposes=("TREAT",),
                portal=True,
            )
        )
        yield World(app, http, settings, obs, good, consent_id)
        await http.aclose()


MASTER = "urn:oid:2.16.156.10011.1.19"


def _consent() -> dict[str, Any]:
    """A Consent of patient A recorded on the patient's behalf (performer, signed form)."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": MASTER, "value": PATIENT_A}},
        "performer": [{"display": "registration desk"}],
        "sourceAttachment": {"contentType": "application/pdf", "title": "signed form"},
        "provision": {
            "type": "permit",
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
            ],
        },
    }


def _privacy_officer(w: World) -> str:
    """A token of this institution's privacy officer (the role ``$explain`` needs)."""
    service = TokenService(
        key=token_key(w.settings),
        issuer=issuer_of(w.settings),
        institution=w.settings.institution,
        registry=w.app.state.auth.registry,
        state=MemoryStateStore(),
    )
    token, _ = service.mint(
        client_id="privacy-desk",
        institution=w.settings.institution,
        kind="system",
        scopes=parse_scopes("system/Consent.r"),
        purposes=("TREAT",),
        user="officer-1",
        role=PRIVACY_OFFICER_ROLE,
        dev=True,
    )
    return str(token)


def _request(w: World, method: str, path: str) -> dict[str, Any]:
    """URL, query, body and content type that the right caller would get through with."""
    url = (
        path.replace("{rtype:fhirtype}", "Observation")
        .replace("{rtype}", "Observation")
        .replace("{rid}", w.observation)
        .replace("{vid}", "1")
        .replace("{pid}", "no-such-patient")
        .replace("{cid}", w.consent)
    )
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "test"},
        "subject": {"identifier": {"system": "urn:oid:2.16.156.10011.1.19", "value": PATIENT_A}},
    }
    bodies: dict[str, tuple[bytes, str]] = {
        "/fhir": (json.dumps(demo_bundle()).encode(), FHIR["content-type"]),
        "/fhir/{rtype}": (json.dumps(observation).encode(), FHIR["content-type"]),
        "/fhir/{rtype}/{rid}": (
            json.dumps({**observation, "id": w.observation}).encode(),
            FHIR["content-type"],
        ),
        "/hl7v2": (
            (FIXTURES / "hl7v2" / "oru_r01_lab.hl7").read_bytes(),
            "x-application/hl7-v2+er7",
        ),
        "/imaging/studies": (
            (FIXTURES / "dicom" / "ct-chest-instances.json").read_bytes(),
            "application/dicom+json",
        ),
        "/ledger/witness": (b"{}", "application/json"),
        "/fhir/Consent": (json.dumps(_consent()).encode(), FHIR["content-type"]),
        "/fhir/Consent/{cid}": (
            json.dumps({**_consent(), "id": w.consent}).encode(),
            FHIR["content-type"],
        ),
        "/auth/patient-token": (
            json.dumps(
                {"identifier": {"system": "urn:oid:2.16.156.10011.1.19", "value": PATIENT_B}}
            ).encode(),
            "application/json",
        ),
    }
    query = {
        "/ledger/receipt": {"index": "0"},
        "/ledger/proof/inclusion": {"index": "0", "tree_size": "1"},
        "/ledger/proof/consistency": {"first": "1", "second": "1"},
        "/ledger/leaves": {"start": "0", "end": "1"},
        "/fhir/Consent": {"patient:identifier": f"{MASTER}|{PATIENT_A}"},
        "/fhir/Consent/_search": {"patient:identifier": f"{MASTER}|{PATIENT_A}"},
        "/consent/$explain": {
            "patient:identifier": f"{MASTER}|{PATIENT_A}",
            "actor": "Organization/other-hospital",
            "purpose": "TREAT",
            "class": "Observation",
        },
        # patient A by the master identifier: refused to patient B's token
        "/fhir/AuditEvent": {"patient": f"{w.settings.master_id_system}|{PATIENT_A}"},
    }.get(path, {})
    body, ctype = bodies.get(path, (b"", "application/json")) if method != "GET" else (b"", "")
    return {"url": url, "params": query, "content": body or None, "ctype": ctype}


def _right_caller(w: World, method: str, path: str) -> dict[str, str]:
    """Headers of a caller the rule lets through."""
    kind = ROUTES[(method, path)].kind
    if kind == "witness":
        tok = w.token(client_id="peer-gw", institution="other-hospital", gateway=True)
    elif kind == "portal":
        tok = w.token(client_id="test-portal", scope="system/Patient.r")
    elif kind == "consent-explain":
        tok = _privacy_officer(w)
    elif kind == "erase":
        tok = w.token(client_id="privacy-office", scope="system/Patient.d", purpose="HLEGAL")
    elif kind in ("access-log", "privacy"):
        tok = w.officer()
    else:
        return dict(w.good)
    return {"Authorization": f"Bearer {tok}"}


def _wrong_callers(w: World, method: str, path: str) -> list[tuple[str, dict[str, str], int]]:
    """(case, headers, expected status) for a protected route."""
    kind = ROUTES[(method, path)].kind

    def bearer(t: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {t}"}

    other_key = TokenService(
        key=b"k" * 32,
        issuer=issuer_of(w.settings),
        institution=w.settings.institution,
        registry=w.app.state.auth.registry,
        state=MemoryStateStore(),
    ).mint(
        client_id="test-his",
        institution=w.settings.institution,
        kind="system",
        scopes=parse_scopes("system/*.cruds"),
        purposes=("TREAT",),
    )[0]
    right = _right_caller(w, method, path)
    cases: list[tuple[str, dict[str, str], int]] = [
        ("no token", {}, 401),
        ("not bearer", {"Authorization": "Basic dXNlcjpwdw=="}, 401),
        ("malformed token", bearer("abc.def.ghi"), 401),
        ("signed by another key", bearer(other_key), 401),
        ("expired token", bearer(w.minted(clock_offset=-3600)), 401),
        ("another gateway's token", bearer(w.minted(issuer="urn:alliance:gateway:other")), 401),
        ("purpose the token lacks", {**right, "X-Purpose-Of-Use": "HRESCH"}, 403),
    ]
    if kind not in ("terminology", "search"):
        # The dictionary holds no patient data: a patient's app may translate codes. A
        # patient's search is filtered to that patient's records, not refused
        # (tests/gateway/test_search.py).
        cases.append(
            (
                "patient token (another patient)",
                bearer(w.token(scope="patient/*.cruds", patient=PATIENT_B)),
                403,
            )
        )
    wrong_scope = w.token(scope="system/Practitioner.r")
    if kind in ("fhir", "transaction", "hl7", "imaging"):
        cases.append(("wrong scope", bearer(wrong_scope), 403))
        cases.append(("Bundle scope only", bearer(w.token(scope="system/Bundle.cruds")), 403))
    if kind == "fhir" and method == "GET":
        cases.append(
            (
                "constrained scope only",
                bearer(w.token(scope="system/Observation.rs?category=laboratory")),
                403,
            )
        )
        cases.append(("two purposes, none selected", bearer(w.token(purpose="TREAT HPAYMT")), 403))
    if kind in ("transaction", "hl7", "imaging", "portal") or (kind == "fhir" and method != "GET"):
        cases.append(("another institution", bearer(w.token(institution="other-hospital")), 403))
    if kind == "witness":
        cases.append(("not a gateway", bearer(w.token(institution="other-hospital")), 403))
        cases.append(
            (
                "own institution's gateway",
                bearer(w.token(client_id="self-gw", gateway=True)),
                403,
            )
        )
    if kind == "portal":
        cases.append(("not a portal", dict(w.good), 400))  # OAuth unauthorized_client
    if kind == "erase":
        cases.append(("not the administrator's purpose", dict(w.good), 403))
        cases.append(
            ("no delete scope", bearer(w.token(scope="system/Patient.rs", purpose="HLEGAL")), 403)
        )
        cases.append(
            (
                "another institution",
                bearer(
                    w.token(
                        scope="system/Patient.d", purpose="HLEGAL", institution="other-hospital"
                    )
                ),
                403,
            )
        )
    if kind in ("access-log", "privacy"):
        cases.append(("not the privacy officer", dict(w.good), 403))
        cases.append(("a user of another role", bearer(w.officer(role="physician")), 403))
        cases.append(
            ("officer without AuditEvent", bearer(w.officer(scope="system/Consent.r")), 403)
        )
        cases.append(
            ("another institution's officer", bearer(w.officer(institution="other-hospital")), 403)
        )
    return cases


async def _send(w: World, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    req = _request(w, method, path)
    h = dict(headers)
    if req["ctype"]:
        h["content-type"] = req["ctype"]
    return await w.http.request(
        method, req["url"], params=req["params"], content=req["content"], headers=h
    )


@pytest.mark.parametrize(("method", "path"), ROUTE_CASES, ids=[f"{m} {p}" for m, p in ROUTE_CASES])
async def test_route_refuses_every_wrong_caller(world: World, method: str, path: str) -> None:
    w = world
    rule = rule_for(method, path)
    if rule is None or rule.kind == "public":
        r = await _send(w, method, path, {})
        assert r.status_code not in (401, 403), (method, path, r.status_code, r.text)
        if (method, path) == ("POST", "/auth/token"):
            await _replayed_assertion_is_refused(w)
        return
    gw = w.app.state.gateway
    size = gw.ledger.size
    for case, headers, status in _wrong_callers(w, method, path):
        r = await _send(w, method, path, headers)
        assert r.status_code == status, (case, method, path, r.status_code, r.text)
        body = r.json()
        if status in (401, 403):
            assert body["resourceType"] == "OperationOutcome", (case, body)
            assert set(body) <= {"resourceType", "issue"}, (case, body)
            assert body["issue"][0]["code"] == ("login" if status == 401 else "forbidden")
        if status == 401:
            assert r.headers["www-authenticate"].startswith("Bearer"), case
        assert PATIENT_A not in r.text and "demo" not in r.text.lower(), case
        assert gw.ledger.size == size, f"{case}: a refused request wrote to the ledger"
    metrics = (await w.http.get("/metrics")).text
    assert 'gateway_auth_refusals_total{reason="no-token"}' in metrics
    r = await _send(w, method, path, _right_caller(w, method, path))
    assert r.status_code not in (401, 403), ("right caller refused", method, path, r.text)


async def _replayed_assertion_is_refused(w: World) -> None:
    """The token route's own wrong caller: a client assertion sent a second time."""
    key = ECKey.generate_key("P-384", private=True, auto_kid=True)
    w.app.state.auth.registry.put(
        ClientRecord(
            client_id="replayer",
            institution=w.settings.institution,
            jwks=public_jwks(key),
            scopes=("system/*.rs",),
            purposes=("TREAT",),
        )
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(key, "replayer", "http://gw/auth/token"),
        "scope": "system/*.rs",
    }
    first = await w.http.post("/auth/token", data=form)
    assert first.status_code == 200, first.text
    again = await w.http.post("/auth/token", data=form)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client", again.text
    assert "access_token" not in again.text


async def test_patient_token_reads_own_records_only(world: World) -> None:
    w = world
    own = {"Authorization": "Bearer " + w.token(scope="patient/*.rs", patient=PATIENT_A)}
    other = {"Authorization": "Bearer " + w.token(scope="patient/*.rs", patient=PATIENT_B)}
    r = await w.http.get(f"/fhir/Observation/{w.observation}", headers=own)
    assert r.status_code == 200 and r.json()["resourceType"] == "Observation"
    r = await w.http.get(f"/fhir/Observation/{w.observation}", headers=other)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    metrics = (await w.http.get("/metrics")).text
    assert 'gateway_auth_refusals_total{reason="patient"} 1.0' in metrics


async def test_transaction_is_authorised_entry_by_entry(world: World) -> None:
    """Observation create only: the demo Bundle's Patient entry refuses the whole transaction."""
    w = world
    obs_only = {"Authorization": "Bearer " + w.token(scope="system/Observation.c")}
    size = w.app.state.gateway.ledger.size
    r = await w.http.post("/fhir", content=json.dumps(demo_bundle()), headers={**FHIR, **obs_only})
    assert r.status_code == 403, r.text
    assert "Patient" in r.json()["issue"][0]["diagnostics"]
    assert w.app.state.gateway.ledger.size == size
    both = {"Authorization": "Bearer " + w.token(scope="system/Observation.c system/Patient.cu")}
    r = await w.http.post("/fhir", content=json.dumps(demo_bundle()), headers={**FHIR, **both})
    assert r.status_code == 200, r.text


async def test_purpose_header_selects_one_of_the_tokens(world: World) -> None:
    w = world
    two = {"Authorization": "Bearer " + w.token(purpose="HPAYMT TREAT")}
    url = f"/fhir/Observation/{w.observation}"
    assert (await w.http.get(url, headers=two)).status_code == 403
    # the second of the token's purposes (the institution's default consent permits its own
    # records for treatment only: HPAYMT is refused by consent, not by authentication)
    ok = await w.http.get(url, headers={**two, "X-Purpose-Of-Use": "TREAT"})
    assert ok.status_code == 200
    payment = await w.http.get(url, headers={**two, "X-Purpose-Of-Use": "HPAYMT"})
    assert payment.status_code == 404
    bad = await w.http.get(url, headers={**two, "X-Purpose-Of-Use": "PUBHLTH"})
    assert bad.status_code == 403 and "PUBHLTH" in bad.text


async def test_dev_tokens_are_refused_on_production(tmp_path: Path) -> None:
    """The production profile's verifier refuses a dev token (and dev-token refuses to mint)."""
    from gateway.errors import ConfigurationError

    embedded = settings_for("embedded", tmp_path / "gw")
    token = dev_token(embedded, client_id="x", scope="system/*.rs")
    production = embedded.model_copy(update={"profile": "production"})
    service = TokenService(
        key=token_key(production),
        issuer=issuer_of(production),
        institution=production.institution,
        registry=__import__("gateway.auth.registry", fromlist=["x"]).ClientRegistry(
            tmp_path / "clients.json"
        ),
        state=MemoryStateStore(),
        allow_dev=False,
    )
    from gateway.auth.errors import AuthenticationError

    with pytest.raises(AuthenticationError) as info:
        service.verify(f"Bearer {token}")
    assert info.value.reason == "dev-token"
    with pytest.raises(ConfigurationError):
        dev_token(production, client_id="x", scope="system/*.rs")
