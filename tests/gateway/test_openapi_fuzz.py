"""Property-based fuzzing of the API from its OpenAPI document (``schemathesis``, stateless):
for every operation ``/openapi.json`` describes, a bounded number of generated requests (valid
and invalid bodies, headers, path and query values) are sent with a token to an in-process
embedded gateway; none may be answered with a 5xx (``not_a_server_error``). Each 5xx it found
was fixed with a regression test beside the code it concerned."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from gateway.app import create_app
from gateway.demo import free_port
from tests.gateway.conftest import auth_headers, settings_for

#: Generated requests per operation and mode: enough to reach every handler's error paths,
#: bounded so the whole run stays within two minutes on the embedded profile
#: (``GATEWAY_FUZZ_EXAMPLES`` raises it for a longer hunt).
MAX_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "12"))

Target = tuple[str, dict[str, str]]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """An embedded gateway served by uvicorn in a thread of this process (its own event
    loop, so the synchronous fuzzer can call it): its base URL and a token allowed
    everything. Stopped (bounded) at the end."""
    data = Path(tmp_path_factory.mktemp("fuzz")) / "gw"
    app = create_app(settings_for("embedded", data, hl7_convert_workers=0))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, name="fuzz-gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the gateway did not start"
        yield f"http://127.0.0.1:{port}", auth_headers(app)
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the gateway did not stop"


def _fuzz(
    operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str]
) -> Counter[int]:
    """Send generated requests of one operation; the status codes they got. Raises
    AssertionError (with the request that failed, as hypothesis reports it) on a 5xx."""
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, (case.method, case.path, response.text[:500])

    with contextlib.suppress(Unsatisfiable):  # nothing invalid to make of some operations
        run()
    return statuses


def test_no_operation_answers_5xx(fuzz_target: Target) -> None:
    """Every operation, with valid (positive) and invalid (negative) generated requests."""
    base_url, headers = fuzz_target
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document describes every route validly
        operations.append(result.ok())
    assert len(operations) >= 30  # every route is described (a regression would drop some)
    total: Counter[int] = Counter()
    reached = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            statuses = _fuzz(operation, mode, base_url, headers)
            total += statuses
            reached += bool(statuses)
    assert reached >= len(operations)  # each operation was called
    assert sum(total.values()) >= 5 * len(operations)
    assert all(code < 500 for code in total)
    # Valid requests got through authentication and validation (not all refused).
    assert any(200 <= code < 300 for code in total), total
