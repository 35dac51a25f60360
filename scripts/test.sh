#!/usr/bin/env bash
# The whole test suite against real services: installs (or reuses cached) Kubo, nats-server and
# Redis, starts Kubo, a 3-node NATS JetStream cluster and Redis on loopback ports, runs ruff,
# mypy (strict) and pytest (embedded and production profiles), stops every service, and exits
# non-zero if anything failed. Extra arguments go to pytest.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
scripts/bootstrap.sh || exit 2
PATH="$("$ROOT/scripts/install-services.sh" | tail -n 1):$PATH" || exit 2
GATEWAY_VALIDATOR_HOME="$("$ROOT/scripts/install-validator.sh" | tail -n 1)" && export GATEWAY_VALIDATOR_HOME || exit 2
export PATH
PY="$ROOT/.venv/bin/python"
SERVICES_DIR="$(mktemp -d /tmp/gateway-services.XXXXXX)"

cleanup() { "$PY" -m tests.services.harness stop --dir "$SERVICES_DIR" >/dev/null 2>&1 || true; rm -rf "$SERVICES_DIR"; }
trap cleanup EXIT INT TERM

status=0
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check . || status=1
echo "== mypy --strict" && .venv/bin/mypy || status=1

echo "== starting services in $SERVICES_DIR"
if ! "$PY" -m tests.services.harness start --dir "$SERVICES_DIR"; then
    echo "services failed to start" >&2
    exit 1
fi
export GATEWAY_SERVICES_ENV="$SERVICES_DIR/env"
export GATEWAY_REQUIRE_SERVICES=1

echo "== pytest"
"$PY" -m pytest -p no:cacheprovider "$@"
rc=$?
if [[ $rc -ne 0 ]]; then status=$rc; fi
exit $status
