"""Fixtures for gateway tests: a running gateway app on each profile, and an HTTP client to it.

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

from gateway.app import create_app
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


@pytest.fixture
async def client(gw_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client to a started gateway app (lifespan run in-process)."""
    app = create_app(gw_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


FHIR = {"content-type": "application/fhir+json"}
