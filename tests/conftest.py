"""Session fixtures shared by every test package.

``services``: the real Kubo, 3-node NATS JetStream cluster and Redis. In CI (scripts/test.sh) they
are started before pytest and described by the env file named in ``GATEWAY_SERVICES_ENV``;
otherwise, if ``scripts/services.sh start`` left them running, those; otherwise the fixture
starts them itself in a temporary directory (and stops them at the end).
If they cannot be had and ``GATEWAY_REQUIRE_SERVICES=1``, the test fails: a skipped test must
never count as passed in CI.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.harness import ROOT, ServiceError, Services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """The running real services (see module docstring)."""
    env = os.environ.get("GATEWAY_SERVICES_ENV")
    required = os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1"
    if env:
        yield Services.from_env_file(Path(env))
        return
    local = ROOT / ".services" / "env"
    if local.exists():
        candidate = Services.from_env_file(local)
        if candidate.all_running():
            # Started by hand with `scripts/services.sh start` (developer machines).
            yield candidate
            return
    tmp = tempfile.TemporaryDirectory(prefix="gateway-services-")
    started = Services(directory=Path(tmp.name))
    try:
        started.start()
    except ServiceError as exc:
        tmp.cleanup()
        if required:
            pytest.fail(f"real services required but unavailable: {exc}")
        pytest.skip(f"real services unavailable: {exc}")
    try:
        yield started
    finally:
        started.stop()
        tmp.cleanup()
