"""Benchmark: CPU cost of the FHIR write path, in one process, on the embedded profile.

Posts transaction Bundles of 20 Observations (``bench/workloads.py``, those of
``bench_ingest.py``) through the ASGI app in this process (no sockets, no external services:
the embedded profile's file log, blob and key stores), 16 concurrent clients, and reports
the resources stored per CPU-second of the process after a warm-up. CPU time, unlike a
rate, hardly moves when other work shares the machine, so two checkouts compared in
alternating rounds (``bench/bench_refactor.py`` case ``fhir-cpu``) show what their code
costs even on a busy host.

Run it from the checkout to measure (it imports ``gateway`` from the working directory):
``cd <checkout> && <checkout>/.venv/bin/python /path/to/bench/bench_fhir_cpu.py [--seconds 8]``.
Authentication and the search index are switched off where the checkout has them (they are
not part of the write path this compares). Prints ``resources_per_cpu_s: <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

import httpx

from gateway.app import create_app
from gateway.config import Settings


def _workloads() -> Any:
    """This benchmark's own ``bench/workloads.py`` (not the measured checkout's)."""
    spec = importlib.util.spec_from_file_location(
        "bench_workloads", Path(__file__).resolve().parent / "workloads.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


observation_bundle = _workloads().observation_bundle


async def measure(seconds: float, clients: int, per_bundle: int) -> tuple[float, int]:
    """Resources per CPU-second and resources stored. Raises AssertionError on a failed
    request."""
    options: dict[str, Any] = {
        "profile": "embedded",
        "data_dir": Path(tempfile.mkdtemp(prefix="bench-fhir-cpu-")),
        "institution": "bench-a",
    }
    fields = Settings.model_fields
    if "auth_off_for_benchmark" in fields:
        options["auth_off_for_benchmark"] = True
    if "search_index" in fields:
        options["search_index"] = False
    app = create_app(Settings(**options))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            for i in range(5):  # warm-up: first patients, caches, lazy imports
                r = await c.post("/fhir", json=observation_bundle(per_bundle, clients, i))
                assert r.status_code == 200, r.text[:300]
            stored = 0
            cpu0, wall0 = time.process_time(), time.perf_counter()

            async def client(k: int) -> None:
                nonlocal stored
                seq = 0
                while time.perf_counter() - wall0 < seconds:
                    r = await c.post("/fhir", json=observation_bundle(per_bundle, k, seq))
                    assert r.status_code == 200, r.text[:300]
                    stored += per_bundle
                    seq += 1

            await asyncio.gather(*(client(k) for k in range(clients)))
            cpu = time.process_time() - cpu0
    return stored / cpu, stored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-bundle", type=int, default=20)
    args = ap.parse_args()
    rate, stored = asyncio.run(measure(args.seconds, args.clients, args.per_bundle))
    print(f"resources_per_cpu_s: {rate:.1f} (stored {stored})")


if __name__ == "__main__":
    main()
