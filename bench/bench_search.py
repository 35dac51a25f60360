"""Benchmark: FHIR search at 10^5 indexed records, and ingest with the search index maintained
beside ingest without it.

1. Search latency. The index (SQLite and PostgreSQL) is populated *directly through the
   indexer's entry point* (``SearchIndex.add`` with the entries the indexer would make), not
   through the full pipeline, to keep the run short: 10^5 Observations of 2,000 patients, 20
   LOINC codes, dates over two years. Then ``Observation?patient=&code=&date=ge...`` is timed
   as the search runs it in the index (count for ``total`` + the first page of 20 at a
   snapshot), for random patients and codes. Reading the returned resources (decryption) is a
   read, measured by the ingest/read benchmarks, and not included.
2. Ingest throughput on the production profile (real Kubo, 3-node JetStream, Redis,
   PostgreSQL): FHIR transaction Bundles of 20 Observations from 8 concurrent clients, in
   alternating rounds with the search indexer registered and without it, in the same gateway.

Run:  .venv/bin/python bench/bench_search.py [--records 100000] [--rounds 3] [--seconds 10]
(uses the services in GATEWAY_SERVICES_ENV, else starts its own). Writes docs/benchmarks.md.
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

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from bench.workloads import observation_bundle  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.search.extract import IndexEntry  # noqa: E402
from gateway.search.index import (  # noqa: E402
    Dates,
    Patients,
    PostgresIndex,
    Query,
    SearchIndex,
    SqliteIndex,
    Token,
)
from gateway.search.params import date_range  # noqa: E402
from tests.services.harness import Services, services_from_env_or_start  # noqa: E402

CODES = [f"{1000 + i}-{i % 10}" for i in range(20)]
LOINC = "http://loinc.org"
DAY = 86_400_000_000


def entries(custodian: str, n: int, patients: int) -> list[IndexEntry]:
    """``n`` Observation index entries spread over ``patients`` patients."""
    rng = random.Random(7)
    start = date_range("2024-01-01")[0]
    out = []
    for i in range(n):
        lo = start + rng.randrange(730) * DAY + rng.randrange(DAY)
        out.append(
            IndexEntry(
                custodian=custodian,
                record=f"r{i:08d}",
                resource_type="Observation",
                resource_id=f"o{i}",
                version=1,
                last_updated=lo,
                patient=f"pseudonym-{i % patients:05d}",
                date_lo=lo,
                date_hi=lo + 1_000_000,
                tokens=[
                    ("code", LOINC, rng.choice(CODES)),
                    (
                        "category",
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "laboratory",
                    ),
                    ("status", "", "final"),
                ],
                refs=[("subject", f"Patient/p{i % patients}")],
            )
        )
    return out


async def search_latency(index: SearchIndex, n: int, queries: int) -> dict[str, float]:
    """Populate ``index`` with ``n`` entries and time ``queries`` searches (ms)."""
    custodian = f"bench-{uuid.uuid4().hex[:8]}"
    patients = max(1, n // 50)
    await index.open()
    try:
        t0 = time.perf_counter()
        data = entries(custodian, n, patients)
        for i in range(0, len(data), 2000):
            await index.add(data[i : i + 2000])
        await index.optimize()  # planner statistics, as autovacuum / PRAGMA optimize keep them
        load_s = time.perf_counter() - t0
        rng = random.Random(11)
        snapshot = await index.snapshot()
        times = []
        for _ in range(queries):
            q = Query(
                custodian=custodian,
                resource_type="Observation",
                clauses=[
                    Patients([f"pseudonym-{rng.randrange(patients):05d}"]),
                    Token("code", [(LOINC, rng.choice(CODES))]),
                    Dates("date", [("ge", *date_range("2024-06-01"))]),
                ],
                snapshot=snapshot,
                limit=21,
            )
            t = time.perf_counter()
            await index.count(q)
            await index.search(q)
            times.append((time.perf_counter() - t) * 1000)
        await index.clear(custodian)
    finally:
        await index.close()
    times.sort()
    return {
        "p50": statistics.median(times),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "load_s": load_s,
    }


async def ingest_rounds(
    services: Services, data_dir: Path, rounds: int, seconds: float, clients: int
) -> dict[str, list[float]]:
    """Resources/s in alternating rounds with and without the search indexer."""
    settings = Settings(
        profile="production",
        data_dir=data_dir,
        mllp_enabled=False,
        institution=f"bench-{uuid.uuid4().hex[:8]}",
        kubo_url=services.kubo_url,
        nats_urls=",".join(services.nats_urls),
        redis_url=services.redis_url,
        postgres_url=services.postgres_url,
        nats_stream=f"B{uuid.uuid4().hex[:12].upper()}",
        redis_prefix=f"bench:{uuid.uuid4().hex[:12]}:",
        hl7_convert_workers=0,
    )
    app = create_app(settings)
    results: dict[str, list[float]] = {"with index": [], "without index": []}
    async with app.router.lifespan_context(app):
        records = app.state.gateway.records
        indexers = list(records._indexers)  # the search indexer, registered at start
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as c:

            async def client(n: int, until: float, counter: list[int]) -> None:
                seq = 0
                while time.perf_counter() < until:
                    body = json.dumps(observation_bundle(20, n, seq))
                    seq += 1
                    r = await c.post(
                        "/fhir", content=body, headers={"content-type": "application/fhir+json"}
                    )
                    if r.status_code == 200:
                        counter[0] += 20

            for k in range(rounds * 2 + 2):  # the first two rounds warm up, unrecorded
                mode = "with index" if k % 2 == 0 else "without index"
                records._indexers[:] = indexers if mode == "with index" else []
                counter = [0]
                start = time.perf_counter()
                until = start + seconds
                await asyncio.gather(*(client(i, until, counter) for i in range(clients)))
                if k >= 2:
                    results[mode].append(counter[0] / (time.perf_counter() - start))
        records._indexers[:] = indexers
    return results


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with services_from_env_or_start() as services, tempfile.TemporaryDirectory() as tmp:
        lat = {
            "SQLite (embedded)": await search_latency(
                SqliteIndex(Path(tmp) / "bench.sqlite3"), args.records, args.queries
            ),
            "PostgreSQL (production)": await search_latency(
                PostgresIndex(services.postgres_url), args.records, args.queries
            ),
        }
        ingest = await ingest_rounds(
            services, Path(tmp) / "gw", args.rounds, args.seconds, args.clients
        )
    lines = [
        "## Search",
        "",
        f"`Observation?patient=&code=&date=ge2024-06-01` at {args.records:,} indexed "
        f"Observations ({args.records // 50:,} patients, 20 codes, two years of dates), "
        f"{args.queries} searches with random patients and codes; the time of the index work "
        "of a search page (the `total` count plus the first 20 matches at a snapshot). The "
        "index was populated directly through the indexer's `SearchIndex.add` (not through the "
        "full pipeline, to keep the run short); reading the returned resources is a read and "
        "not included. Target: p50 under 20 ms.",
        "",
        "| index | p50 ms | p99 ms | load of the 10^5 entries, s |",
        "|---|---|---|---|",
    ]
    for name, r in lat.items():
        lines.append(f"| {name} | {r['p50']:.2f} | {r['p99']:.2f} | {r['load_s']:.1f} |")
    w, wo = ingest["with index"], ingest["without index"]
    ratio = statistics.median(w) / statistics.median(wo) if wo and statistics.median(wo) else 0
    lines += [
        "",
        f"Ingest on the production profile (FHIR Bundles of 20 Observations, {args.clients} "
        f"concurrent clients in-process, {args.seconds:.0f} s rounds, alternating, same "
        "gateway, after one unrecorded warm-up round of each), resources/s; target: with the "
        "index within 15% of without.",
        "",
        "| rounds | resources/s per round | median |",
        "|---|---|---|",
        f"| with index | {', '.join(f'{x:.0f}' for x in w)} | {statistics.median(w):.0f} |",
        f"| without index | {', '.join(f'{x:.0f}' for x in wo)} | {statistics.median(wo):.0f} |",
        "",
        f"With the index: {ratio:.0%} of the throughput without it. Load average of the "
        f"2-core machine (shared with other work) {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end: absolute rates are far below those of the "
        "ingest section, and the ratio carries the noise of the shared machine.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "search",
            body,
            command=".venv/bin/python bench/bench_search.py",
        )


if __name__ == "__main__":
    asyncio.run(main())
