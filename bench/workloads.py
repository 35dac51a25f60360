"""Workloads the benchmarks share. Dependency-free (standard library only), so that a benchmark
run against another checkout (``bench/bench_fhir_cpu.py``) sends exactly the same requests."""

from __future__ import annotations

import uuid
from typing import Any


def observation_bundle(n: int, client: int, seq: int) -> dict[str, Any]:
    """A transaction Bundle of ``n`` Observations of one patient (linked by identifier)."""
    subject = {
        "identifier": {"system": "urn:oid:2.16.156.10011.1.19", "value": f"B-{client}-{seq % 50}"}
    }
    entries = []
    for i in range(n):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": subject,
                    "effectiveDateTime": "2026-11-20T08:30:00+08:00",
                    "valueQuantity": {
                        "value": 10 + i / 10,
                        "unit": "g/dL",
                        "system": "http://unitsofmeasure.org",
                        "code": "g/dL",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
