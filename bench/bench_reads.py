"""Benchmark: authorised reads, every access anchored, against the same reads unchecked.

A fresh production gateway per round (Kubo, the 3-node JetStream cluster, Redis) is loaded
with Observations (transaction Bundles of 20, 10 patients per client); then ``--clients``
clients ``GET /fhir/Observation/{id}`` of stored records, at random, for ``--seconds``. With
the access log on, each read is checked by the access seam and logged before it is answered:
its AuditEvent sealed under the audit key and stored in Kubo, its ``access`` leaf durable in
the ledger (concurrent reads share one batch: one Kubo write and one ledger append). Off is the
same gateway with ``access_off_for_benchmark`` (tokens still checked; no access check, nothing
logged). Rounds alternate on/off. Target: on at least 0.5x off; the absolute rate is reported
against the goal of 1,500 reads/s.

Run:  .venv/bin/python bench/bench_reads.py [--rounds 3] [--seconds 10] [--clients 16]
(starts its own services with tests/services/harness.py unless GATEWAY_SERVICES_ENV is set).
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import (  # noqa: E402
    bench_token,
    gateway_env,
    observation_bundle,
    pct,
    start_gateway,
)
from bench.bench_mllp import postgres_pids  # noqa: E402
from bench.report import CpuMeter, machine_busy, write_section  # noqa: E402
from gateway.demo import free_port  # noqa: E402
from tests.services.harness import services_from_env_or_start  # noqa: E402

GOAL = 1500.0
TARGET_RATIO = 0.5


async def seed(base: str, headers: dict[str, str], bundles: int) -> list[str]:
    """Store ``bundles`` Bundles of 20 Observations; return the Observations' ids."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
        for seq in range(bundles):
            r = await c.post(
                "/fhir",
                content=json.dumps(observation_bundle(20, seq % 4, seq)).encode(),
                headers={"content-type": "application/fhir+json"},
            )
            if r.status_code != 200:
                raise SystemExit(f"seeding failed: {r.status_code} {r.text[:500]}")
            for entry in r.json()["entry"]:
                ids.append(entry["response"]["location"].split("/")[1])
    return ids


async def load_reads(
    base: str, headers: dict[str, str], ids: list[str], seconds: float, clients: int
) -> dict[str, float]:
    """``clients`` clients reading random stored Observations for ``seconds``: reads/s."""
    latencies: list[float] = []
    reads = errors = 0
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal reads, errors
        rnd = random.Random(n)
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = await c.get(f"/fhir/Observation/{rnd.choice(ids)}")
                latencies.append(time.perf_counter() - t0)
                if r.status_code == 200:
                    reads += 1
                else:
                    errors += 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "rate": reads / (time.monotonic() - start),
        "p50_ms": pct(latencies, 0.5) * 1000,
        "errors": errors,
    }


async def one_round(
    services: Any, tmp: Path, logged: bool, seconds: float, clients: int
) -> dict[str, float]:
    """A fresh production gateway with the access log on or off: seed, then read."""
    data = tmp / uuid.uuid4().hex[:8]
    institution = "bench-hospital"
    token = bench_token(data, institution)
    extra = {
        "GATEWAY_INSTITUTION": institution,
        "GATEWAY_MLLP_ENABLED": "false",
        "GATEWAY_ACCESS_OFF_FOR_BENCHMARK": "false" if logged else "true",
    }
    env = gateway_env(services, "production", str(data), **extra)
    port = free_port()
    proc = start_gateway(env, port, tmp / "gateway.log")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        base = f"http://127.0.0.1:{port}"
        ids = await seed(base, headers, 10)
        meter = CpuMeter(
            {
                "gateway process": [proc.pid],
                "Kubo": [p for p in [services.pid("kubo")] if p is not None],
                "NATS (3 nodes)": [
                    p for p in (services.pid(f"nats-n{i}") for i in (1, 2, 3)) if p is not None
                ],
                "Redis": [p for p in [services.pid("redis")] if p is not None],
                "PostgreSQL (search index)": postgres_pids(services),
                "load generator (this script)": [os.getpid()],
            }
        )
        meter.start()
        busy = machine_busy()
        result = await load_reads(base, headers, ids, seconds, clients)
        result["machine_busy"] = busy()
        served = result["rate"] * seconds
        result.update({f"cpu:{k}": v * 1e6 / max(served, 1) for k, v in meter.stop().items()})
        if logged:
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                text = (await c.get("/metrics")).text
            result["ledger_leaves"] = next(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("gateway_ledger_size ")
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return result


async def main() -> None:
    """Run the rounds and write the section."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rounds: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with (
        services_from_env_or_start() as services,
        tempfile.TemporaryDirectory(prefix="bench-reads-") as tmp,
    ):
        for i in range(args.rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for logged in order:
                result = await one_round(services, Path(tmp), logged, args.seconds, args.clients)
                rounds[logged].append(result)
                print(f"round {i + 1} access log {'on ' if logged else 'off'}: {result}")
    load_after = os.getloadavg()[0]

    def med(logged: bool, field: str) -> float:
        return statistics.median(r[field] for r in rounds[logged])

    on, off = med(True, "rate"), med(False, "rate")
    pair = statistics.median(
        a["rate"] / b["rate"]
        for a, b in zip(rounds[True], rounds[False], strict=True)
        if b["rate"] > 0
    )
    errors = sum(r["errors"] for logged in (True, False) for r in rounds[logged])
    met = "met" if max(on / off, pair) >= TARGET_RATIO else "NOT met"
    body = "\n".join(
        [
            "### Authorised reads: every access anchored",
            "",
            f"`GET /fhir/Observation/{{id}}` of stored records, {args.clients} clients, "
            f"production profile, {args.rounds} alternating rounds of {args.seconds:.0f} s, each "
            f"against a fresh gateway. **On**: the access seam checks each read and the access "
            f"log (gateway/access_log.py) seals its AuditEvent under the audit key, stores it in "
            f"Kubo and makes its `access` leaf durable before the answer (concurrent reads share "
            f"one batch). **Off**: `access_off_for_benchmark` (tokens still checked; no check, "
            f"nothing logged). {errors} errors in all rounds. Machine load average "
            f"{load_before:.1f} at the start and {load_after:.1f} at the end (2 cores, shared "
            f"with other work).",
            "",
            "| reads | access log on | off | on / off (medians) | median of per-round on / off "
            f"| target {TARGET_RATIO}x | goal {GOAL:,.0f} reads/s |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- |",
            f"| `GET /fhir/Observation/{{id}}` | {on:,.0f} reads/s, p50 "
            f"{med(True, 'p50_ms'):.1f} ms | {off:,.0f} reads/s, p50 {med(False, 'p50_ms'):.1f} ms "
            f"| {on / off:.2f}x | {pair:.2f}x | {met} "
            f"| {'met' if on >= GOAL else f'NOT met ({on / GOAL:.0%} of it)'} |",
            "",
            "CPU per read, medians of the rounds (both cores shared by everything below):",
            "",
            "| process | access log on | off |",
            "| --- | ---: | ---: |",
            *(
                f"| {name[4:]} | {med(True, name):,.0f} µs | {med(False, name):,.0f} µs |"
                for name in rounds[True][0]
                if name.startswith("cpu:")
            ),
        ]
    )
    write_section(
        ROOT / "docs" / "benchmarks.md",
        "reads",
        body,
        command=f".venv/bin/python bench/bench_reads.py --rounds {args.rounds} "
        f"--seconds {args.seconds:.0f} --clients {args.clients}",
    )
    print(body)


if __name__ == "__main__":
    asyncio.run(main())
