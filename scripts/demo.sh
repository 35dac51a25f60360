#!/usr/bin/env bash
# The newcomer's first command: set up the virtual environment and run `gateway demo` on the
# embedded profile (no service needs to be installed). Extra arguments go to `gateway demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/gateway" demo "$@"
