"""SMART Backend Services token flows, with client assertions no one here wrote (authlib's
``private_key_jwt_sign``, RFC 7523), on both profiles; the ``jti`` replay refused across two
gateway processes sharing real Redis. (authlib's httpx integration is deprecated in favour of
httpx2, so the form is posted with httpx directly.)
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from fastapi import FastAPI
from joserfc.jwk import ECKey, RSAKey

from gateway.app import create_app
from gateway.auth.registry import ClientRecord, ClientRegistry, registry_path
from gateway.config import Settings
from gateway.demo import free_port
from tests.gateway.conftest import FHIR, demo_bundle
from tests.gateway_process import gateway_env, serve, stop

TOKEN_PATH = "/auth/token"


def _keys() -> tuple[ECKey, RSAKey]:
    return (
        ECKey.generate_key("P-384", private=True, auto_kid=True),
        RSAKey.generate_key(2048, private=True, auto_kid=True),
    )


def _public(key: ECKey | RSAKey, alg: str) -> dict[str, Any]:
    jwk = dict(key.as_dict(private=False))
    jwk["alg"] = alg
    return jwk


def _register(registry: ClientRegistry, institution: str, ec: ECKey, rsa: RSAKey) -> None:
    registry.put(
        ClientRecord(
            client_id="his-1",
            institution=institution,
            jwks={"keys": [_public(ec, "ES384"), _public(rsa, "RS384")]},
            scopes=("system/*.cru", "system/Observation.rs?category=laboratory"),
            purposes=("TREAT", "HPAYMT", "BTG"),
            break_glass=True,
            roles=("physician", "nurse"),
        )
    )


class Client:
    """A backend-services client: authlib signs the assertion, httpx carries it."""

    def __init__(
        self, app: FastAPI, key: ECKey | RSAKey, alg: str, client_id: str = "his-1"
    ) -> None:
        self.key, self.alg, self.client_id = key, alg, client_id
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def fetch_token(self, url: str, **form: str) -> dict[str, Any]:
        """Ask for a token; raise AssertionError on a refusal."""
        assertion = _assertion(self.key, self.alg, url, client_id=self.client_id)
        r = await self.http.post(url, data={**_form(assertion), **form})
        assert r.status_code == 200, r.text
        token: dict[str, Any] = r.json()
        self.http.headers["Authorization"] = f"Bearer {token['access_token']}"
        return token

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.http

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()


def _oauth(app: FastAPI, key: ECKey | RSAKey, alg: str) -> Client:
    return Client(app, key, alg)


@pytest.fixture
async def started(gw_settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(gw_settings)
    async with app.router.lifespan_context(app):
        yield app


async def test_backend_services_flow_with_authlib(started: FastAPI) -> None:
    app = started
    ec, rsa = _keys()
    _register(app.state.auth.registry, app.state.gateway.settings.institution, ec, rsa)
    async with (c := _oauth(app, ec, "ES384")) as oauth:
        token = await c.fetch_token(
            "http://gw" + TOKEN_PATH,
            grant_type="client_credentials",
            scope="system/Patient.cu system/Observation.cu system/Observation.rs "
            "system/Practitioner.d",
            purpose_of_use="TREAT PUBHLTH",
            subject_id="dr-li",
            subject_role="physician",
        )
        # granted only where requested and registered: no delete, no PUBHLTH
        assert token["scope"] == "system/Patient.cu system/Observation.cu"
        assert token["purpose_of_use"] == "TREAT"
        assert 0 < token["expires_in"] <= 300
        r = await oauth.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
        assert r.status_code == 200, r.text
        obs = r.json()["entry"][1]["response"]["location"].split("/_history")[0]
        # no read scope in this token
        assert (await oauth.get(f"/fhir/{obs}")).status_code == 403
    async with (c := _oauth(app, rsa, "RS384")) as oauth:
        await c.fetch_token(
            "http://gw" + TOKEN_PATH,
            grant_type="client_credentials",
            scope="system/*.r",
            purpose_of_use="HPAYMT",
        )
        # authenticated and authorised for payment; the institution's default consent lets
        # its own clients read for treatment only, so the read answers as for a missing record
        assert (await oauth.get(f"/fhir/{obs}")).status_code == 404
        await c.fetch_token(
            "http://gw" + TOKEN_PATH,
            grant_type="client_credentials",
            scope="system/*.r",
            purpose_of_use="TREAT",
        )
        r = await oauth.get(f"/fhir/{obs}")
        assert r.status_code == 200 and r.json()["resourceType"] == "Observation"
    # a constrained scope is granted where registered, never widened
    async with (c := _oauth(app, ec, "ES384")) as oauth:
        token = await c.fetch_token(
            "http://gw" + TOKEN_PATH,
            grant_type="client_credentials",
            scope="system/Observation.rs?category=laboratory system/Observation.rs?code=x",
        )
        assert token["scope"] == "system/Observation.rs?category=laboratory"


async def _token_request(app: FastAPI, form: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        return await c.post(TOKEN_PATH, data=form)


def _assertion(
    key: Any,
    alg: str,
    url: str,
    client_id: str = "his-1",
    kid: str | None = None,
    **claims: Any,
) -> str:
    """An authlib-signed assertion, ``exp`` four minutes ahead unless given."""
    claims.setdefault("exp", int(time.time()) + 240)
    return str(
        private_key_jwt_sign(
            key, client_id, url, alg=alg, claims=claims, header={"kid": kid or key.kid}
        )
    )


def _form(assertion: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "scope": "system/*.r",
        **extra,
    }


async def test_token_endpoint_refusals(started: FastAPI) -> None:
    app = started
    ec, rsa = _keys()
    _register(app.state.auth.registry, app.state.gateway.settings.institution, ec, rsa)
    url = "http://gw" + TOKEN_PATH

    def sign(key: Any, alg: str, **claims: Any) -> str:
        return _assertion(key, alg, url, **claims)

    good = sign(ec, "ES384")
    r = await _token_request(app, _form(good))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    replay = await _token_request(app, _form(good))
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    assert "already used" in replay.json()["error_description"]
    now = int(time.time())
    cases: list[tuple[str, dict[str, str], int, str, str]] = [
        (
            "wrong audience",
            _form(_assertion(ec, "ES384", "http://elsewhere/auth/token")),
            401,
            "invalid_client",
            "aud",
        ),
        ("expired", _form(sign(ec, "ES384", exp=now - 600)), 401, "invalid_client", "expired"),
        (
            "too far ahead",
            _form(sign(ec, "ES384", exp=now + 3600)),
            401,
            "invalid_client",
            "five minutes",
        ),
        (
            "ES384 signature under the RS384 key's kid",
            _form(_assertion(ec, "ES384", url, kid=rsa.kid)),
            401,
            "invalid_client",
            "RS384 only",
        ),
        (
            "RS384 key signing as RS256",
            _form(_assertion(rsa, "RS256", url)),
            401,
            "invalid_client",
            "RS384 only",
        ),
        (
            "unknown kid",
            _form(_assertion(ec, "ES384", url, kid="nope")),
            401,
            "invalid_client",
            "no key",
        ),
        (
            "signed by another key",
            _form(_assertion(ECKey.generate_key("P-384", private=True), "ES384", url, kid=ec.kid)),
            401,
            "invalid_client",
            "signature",
        ),
        (
            "unknown client",
            _form(_assertion(ec, "ES384", url, client_id="nobody")),
            401,
            "invalid_client",
            "unknown",
        ),
        ("no jti", _form(sign(ec, "ES384", jti="")), 401, "invalid_client", "jti"),
        (
            "scope not registered",
            _form(sign(ec, "ES384"), scope="system/*.d"),
            400,
            "invalid_scope",
            "none of the requested scopes",
        ),
        (
            "malformed scope",
            _form(sign(ec, "ES384"), scope="system/observation.xyz"),
            400,
            "invalid_scope",
            "observation",
        ),
        (
            "unknown purpose",
            _form(sign(ec, "ES384"), purpose_of_use="FUN"),
            400,
            "invalid_request",
            "FUN",
        ),
        (
            "purpose not registered",
            _form(sign(ec, "ES384"), purpose_of_use="HRESCH"),
            400,
            "invalid_scope",
            "purposes",
        ),
        (
            "break-glass without reason",
            _form(sign(ec, "ES384"), purpose_of_use="BTG"),
            400,
            "invalid_request",
            "break_glass_reason",
        ),
        (
            "role not registered",
            _form(sign(ec, "ES384"), subject_id="u", subject_role="admin"),
            400,
            "invalid_request",
            "admin",
        ),
        (
            "wrong grant",
            {**_form(sign(ec, "ES384")), "grant_type": "password"},
            400,
            "unsupported_grant_type",
            "client_credentials",
        ),
        ("not a JWS", _form("xyz"), 400, "invalid_request", "compact"),
    ]
    for case, form, status, error, why in cases:
        r = await _token_request(app, form)
        assert (r.status_code, r.json()["error"]) == (status, error), (case, r.text)
        assert why in r.json()["error_description"], (case, r.text)
    # break-glass with a reason
    r = await _token_request(
        app, _form(sign(ec, "ES384"), purpose_of_use="BTG", break_glass_reason="cardiac arrest")
    )
    assert r.status_code == 200 and r.json()["purpose_of_use"] == "BTG"
    # a disabled client gets no token and its tokens stop working at once
    token = r.json()["access_token"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        headers = {"Authorization": f"Bearer {token}"}
        assert (await c.get("/ledger/checkpoint", headers=headers)).status_code == 200
        app.state.auth.registry.disable("his-1")
        assert (await c.get("/ledger/checkpoint", headers=headers)).status_code == 401
    r = await _token_request(app, _form(sign(ec, "ES384")))
    assert r.status_code == 401
    metrics = app.state.gateway.metrics.registry
    assert (
        metrics.get_sample_value("gateway_auth_refusals_total", {"reason": "token-invalid_client"})
        >= 7
    )


async def test_smart_configuration_is_public(started: FastAPI) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=started), base_url="http://gw"
    ) as c:
        conf = (await c.get("/.well-known/smart-configuration")).json()
    assert conf["token_endpoint"] == "http://gw/auth/token"
    assert conf["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) == {"ES384", "RS384"}
    assert "client-confidential-asymmetric" in conf["capabilities"]


async def test_patient_token_from_a_portal(started: FastAPI) -> None:
    """A registered portal gets a patient token that reaches that patient's records only."""
    app = started
    settings = app.state.gateway.settings
    ec, _rsa = _keys()
    app.state.auth.registry.put(
        ClientRecord(
            client_id="portal",
            institution=settings.institution,
            jwks={"keys": [_public(ec, "ES384")]},
            scopes=("system/Patient.r", "patient/*.rs"),
            purposes=("TREAT",),
            portal=True,
        )
    )
    _register(app.state.auth.registry, settings.institution, ec, _rsa)
    async with (c := _oauth(app, ec, "ES384")) as his:
        await c.fetch_token(
            "http://gw" + TOKEN_PATH, grant_type="client_credentials", scope="system/*.cru"
        )
        stored = await his.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
        obs = stored.json()["entry"][1]["response"]["location"].split("/_history")[0]
    pc = Client(app, ec, "ES384", client_id="portal")
    async with pc as portal:
        await pc.fetch_token(
            "http://gw" + TOKEN_PATH, grant_type="client_credentials", scope="system/Patient.r"
        )
        tokens = {}
        for who in ("HC-3301-0042-7788", "HC-0000-0000-0000"):
            r = await portal.post(
                "/auth/patient-token",
                json={"identifier": {"system": settings.master_id_system, "value": who}},
            )
            assert r.status_code == 200, r.text
            assert r.json()["scope"] == "patient/*.rs"
            tokens[who] = r.json()["access_token"]
        r = await portal.post(
            "/auth/patient-token", json={"identifier": {"system": "urn:other", "value": "1"}}
        )
        assert r.status_code == 400
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as http:
        mine = await http.get(
            f"/fhir/{obs}", headers={"Authorization": f"Bearer {tokens['HC-3301-0042-7788']}"}
        )
        assert mine.status_code == 200
        theirs = await http.get(
            f"/fhir/{obs}", headers={"Authorization": f"Bearer {tokens['HC-0000-0000-0000']}"}
        )
        assert theirs.status_code == 403
        write = await http.post(
            "/fhir",
            content=json.dumps(demo_bundle()),
            headers={**FHIR, "Authorization": f"Bearer {tokens['HC-3301-0042-7788']}"},
        )
        assert write.status_code == 403


def _serve(settings: Settings, port: int, log: Path, base: str) -> subprocess.Popen[bytes]:
    env = gateway_env(settings, GATEWAY_PUBLIC_BASE_URL=base, GATEWAY_HL7_CONVERT_WORKERS="0")
    return serve(env, port, log)


@pytest.mark.services
async def test_jti_replay_refused_across_two_processes_on_redis(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two processes of one gateway (same institution, same Redis prefix, one public URL):
    an assertion accepted by the first is refused by the second."""
    from tests.gateway.conftest import settings_for

    services = request.getfixturevalue("services")
    first = settings_for("production", tmp_path / "a", services)
    second = first.model_copy(
        update={"data_dir": tmp_path / "b", "nats_stream": first.nats_stream + "B"}
    )
    ec, rsa = _keys()
    for s in (first, second):
        _register(ClientRegistry(registry_path(s.data_dir)), s.institution, ec, rsa)
    base = "https://gateway.alliance.test"
    ports = [free_port(), free_port()]
    procs = [
        _serve(s, p, tmp_path / f"gw{i}.log", base)
        for i, (s, p) in enumerate(zip((first, second), ports, strict=True))
    ]
    try:
        assertion = _assertion(ec, "ES384", base + TOKEN_PATH)
        async with httpx.AsyncClient(timeout=10) as c:
            one = await c.post(f"http://127.0.0.1:{ports[0]}{TOKEN_PATH}", data=_form(assertion))
            assert one.status_code == 200, one.text
            two = await c.post(f"http://127.0.0.1:{ports[1]}{TOKEN_PATH}", data=_form(assertion))
            assert two.status_code == 401, two.text
            assert "already used" in two.json()["error_description"]
            fresh = _assertion(ec, "ES384", base + TOKEN_PATH)
            ok = await c.post(f"http://127.0.0.1:{ports[1]}{TOKEN_PATH}", data=_form(fresh))
            assert ok.status_code == 200, ok.text
    finally:
        stop(procs)
