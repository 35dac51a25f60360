#!/usr/bin/env bash
# Start, stop or show the real services on loopback for development and `gateway serve
# --profile production`: Kubo (API 127.0.0.1:15001), NATS JetStream n1..n3 (127.0.0.1:14222-14224),
# Redis (127.0.0.1:16379), PostgreSQL (127.0.0.1:15432). State and logs under .services/ (addresses in .services/env).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
PATH="$("$ROOT/scripts/install-services.sh" | tail -n 1):$PATH"
export PATH
exec "$ROOT/.venv/bin/python" -m tests.services.harness "${1:-status}" --dir "${2:-$ROOT/.services}"
