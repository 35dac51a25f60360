"""README command 1: `gateway demo` runs end to end on the embedded profile and says so."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_passes_every_check() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    res = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "posted a transaction Bundle of 5 resources: HTTP 200" in out
    assert out.count("proof ok  read back identical") == 5
    assert "over MLLP: CA (stored and anchored)" in out
    # consent at work: another institution denied like a missing record, then permitted once
    # the patient granted it, and the patient's access history proves both
    assert "HTTP 404 (answered exactly as a missing record)" in out
    assert "for treatment: HTTP 201" in out and "again: HTTP 200" in out
    assert "demo-clinic deny then permit, 2 of 2 AuditEvents match their ledger leaf" in out
    assert out.count("identical") == 15 and "DIFFERENT" not in out
    assert "ciphertexts re-hashed: OK" in out and out.rstrip().endswith("demo: all checks passed")
