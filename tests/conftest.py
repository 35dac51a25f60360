"""Session fixtures shared by every test package.

``services``: the real Kubo, 3-node NATS JetStream cluster and Redis. In CI (scripts/test.sh) they
are started before pytest and described by the env file named in ``GATEWAY_SERVICES_ENV``;
otherwise, if ``scripts/services.sh start`` left them running, those; otherwise the fixture
starts them itself in a temporary directory (and stops them at the end).
If they cannot be had and ``GATEWAY_REQUIRE_SERVICES=1``, the test fails: a skipped test must
never count as passed in CI.

``reference_validator``: HAPI FHIR's R4 instance validator (tests/fhir_validator.py), one JVM for
the whole session; unavailable with ``GATEWAY_REQUIRE_SERVICES=1`` (or
``GATEWAY_REQUIRE_VALIDATOR=1``) is a failure, as for the services. The session ends with a
summary of what it found, and fails if it tried to reach the network.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fhir_validator import ReferenceValidator, ValidatorUnavailable, validator_home
from tests.services.harness import ROOT, ServiceError, Services

_VALIDATOR = pytest.StashKey[ReferenceValidator]()


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


@pytest.fixture(scope="session")
def reference_validator(request: pytest.FixtureRequest) -> Iterator[ReferenceValidator]:
    """The running reference validator (see module docstring)."""
    required = "1" in (
        os.environ.get("GATEWAY_REQUIRE_SERVICES"),
        os.environ.get("GATEWAY_REQUIRE_VALIDATOR"),
    )
    try:
        validator = ReferenceValidator(validator_home())
    except ValidatorUnavailable as exc:
        if required:
            pytest.fail(f"the FHIR reference validator is required but unavailable: {exc}")
        pytest.skip(f"the FHIR reference validator is unavailable: {exc}")
    request.config.stash[_VALIDATOR] = validator
    yield validator
    validator.close()
    assert validator.network_attempts == 0, (
        f"the reference validator tried the network {validator.network_attempts} times"
    )


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """What the reference validator found over the session, warnings grouped by kind."""
    validator = config.stash.get(_VALIDATOR, None)
    if validator is None:
        return
    totals = validator.totals
    terminalreporter.section("FHIR R4 reference validator (HAPI FHIR)")
    terminalreporter.write_line(
        "what the gateway produced from the fixtures: "
        f"{totals['resources']} resources, {totals['errors']} errors, "
        f"{totals['warnings']} warnings; network attempts: {validator.network_attempts}"
    )
    for kind, count in validator.warning_kinds.most_common(15):
        terminalreporter.write_line(f"  {count:4d}  {kind}")
