#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install the gateway with its dev tools.
# Idempotent: a second run only re-installs when pyproject.toml changed, and only recompiles
# the HL7 v2 conversion (scripts/build_compiled.py) when its sources changed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[bootstrap] creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
    echo "[bootstrap] installing the gateway and its dependencies" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" >&2
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
# The HL7 v2 conversion compiled with mypyc (optional: without a C compiler it runs as Python).
"$VENV/bin/python" "$ROOT/scripts/build_compiled.py"
