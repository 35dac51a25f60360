"""Fixtures for gateway tests: a running gateway app on each profile, and an HTTP client to it.

Every API route needs an access token: :func:`auth_headers` gives one for a started app (a dev
token on the embedded profile, as ``gateway dev-token`` prints; on the production profile, which
refuses dev tokens, a token of a client registered for the test), and ``client`` sends it.

``gateway_app`` is parametrised over both profiles. The production parameter needs the real
services (Kubo, the 3-node JetStream cluster, Redis) from the session fixture ``services`` in
tests/conftest.py; each test gets its own stream and key prefix so tests do not see each other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.auth.dev import dev_token
from gateway.auth.guard import issuer_of, token_key
from gateway.auth.registry import ClientRecord, ClientRegistry, registry_path
from gateway.auth.scopes import parse_scopes
from gateway.auth.tokens import TokenService
from gateway.backends.state_memory import MemoryStateStore
from gateway.config import Settings

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def demo_bundle() -> dict[str, Any]:
    """The sample transaction Bundle."""
    data: dict[str, Any] = json.loads((FIXTURES / "fhir" / "demo-bundle.json").read_text("utf-8"))
    return data


def settings_for(
    profile: str, data_dir: Path, services: Any | None = None, **extra: Any
) -> Settings:
    """Settings of a fresh gateway of ``profile`` in ``data_dir``."""
    values: dict[str, Any] = {
        "profile": profile,
        "data_dir": data_dir,
        "mllp_enabled": False,
        "institution": f"test-{uuid.uuid4().hex[:8]}",
    }
    if profile == "production":
        assert services is not None
        values.update(
            kubo_url=services.kubo_url,
            nats_urls=",".join(services.nats_urls),
            redis_url=services.redis_url,
            postgres_url=services.postgres_url,
            nats_stream=f"T{uuid.uuid4().hex[:12].upper()}",
            redis_prefix=f"test:{uuid.uuid4().hex[:12]}:",
        )
    values.update(extra)
    return Settings(**values)


PROFILES = [
    pytest.param("embedded", id="embedded"),
    pytest.param("production", id="production", marks=pytest.mark.services),
]


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    """Each gateway test runs on both profiles."""
    return str(request.param)


@pytest.fixture
def gw_settings(profile: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a fresh gateway of the current profile."""
    services = request.getfixturevalue("services") if profile == "production" else None
    return settings_for(profile, tmp_path / "gw", services)


TEST_SCOPE = "system/*.cruds"


def settings_token(
    settings: Settings,
    *,
    client_id: str = "test-his",
    scope: str = TEST_SCOPE,
    purpose: str = "TREAT",
    patient: str | None = None,
    institution: str | None = None,
) -> str:
    """An access token for the gateway of ``settings`` (started or not, in this process or
    another): a dev token on the embedded profile (what ``gateway dev-token`` prints), else a
    token of a client registered in its registry for the test. ``institution``: the client's
    (default: the gateway's own)."""
    if settings.profile == "embedded":
        return dev_token(
            settings,
            client_id=client_id,
            scope=scope,
            purpose=purpose,
            patient=patient,
            institution=institution,
        )
    institution = institution or settings.institution
    assert patient is None, "patient tokens on production come from /auth/patient-token"
    registry = ClientRegistry(registry_path(settings.data_dir))
    registry.put(
        ClientRecord(
            client_id=client_id,
            institution=institution,
            scopes=tuple(scope.split()),
            purposes=tuple(purpose.split()),
        )
    )
    service = TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=settings.institution,
        registry=registry,
        state=MemoryStateStore(),
    )
    token, _exp = service.mint(
        client_id=client_id,
        institution=institution,
        kind="system",
        scopes=parse_scopes(scope),
        purposes=tuple(purpose.split()),
    )
    return str(token)


def token_service(app: FastAPI) -> TokenService:
    """A token service of a started app (its key, issuer and client registry), for tests that
    mint tokens :func:`settings_token` does not (officers, portals)."""
    s = app.state.gateway.settings
    return TokenService(
        key=token_key(s),
        issuer=issuer_of(s),
        institution=s.institution,
        registry=app.state.auth.registry,
        state=MemoryStateStore(),
    )


def access_token(app: FastAPI, **kwargs: Any) -> str:
    """:func:`settings_token` for a started app."""
    return settings_token(app.state.gateway.settings, **kwargs)


def bearer(settings: Settings, **kwargs: Any) -> dict[str, str]:
    """``Authorization`` header with :func:`settings_token`."""
    return {"Authorization": f"Bearer {settings_token(settings, **kwargs)}"}


def auth_headers(app: FastAPI, **kwargs: Any) -> dict[str, str]:
    """``Authorization`` header with :func:`access_token`."""
    return {"Authorization": f"Bearer {access_token(app, **kwargs)}"}


@pytest.fixture
async def client(gw_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client to a started gateway app (lifespan run in-process), sending a token."""
    app = create_app(gw_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", headers=auth_headers(app)
        ) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


FHIR = {"content-type": "application/fhir+json"}
