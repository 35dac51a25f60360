"""Benchmark: the unified dictionary's cost.

1. ``apply_dictionary`` on an Observation with 10 coded elements (local code, category,
   interpretation, value unit, three components each with a local code and a unit): median
   microseconds per record over several rounds, one core. Target (issue 14): under 30 us.
2. HL7 v2 parse + convert of the ORU^R01 fixture with the dictionary against an empty one, in
   alternating rounds of the same run (the conversion is where HL7 input is mapped; concepts
   are memoised per sending facility, so this is the steady-state cost).
3. With ``--mllp``: ORU^R01 over MLLP into a gateway on real services with the shipped
   dictionary against an empty dictionary directory (``GATEWAY_DICTIONARY_DIR``), alternating
   rounds, each against a fresh gateway (bench/bench_mllp.py's load generator).

Run:  .venv/bin/python bench/bench_dictionary.py [--rounds 5] [--mllp] [--no-write]
Writes its section of docs/benchmarks.md (``dictionary``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mappings.v2  # noqa: E402
from bench.bench_parse import rate  # noqa: E402
from bench.report import write_section  # noqa: E402
from mappings.dictionary_apply import apply_dictionary  # noqa: E402
from mappings.terminology import Terminology  # noqa: E402
from mappings.v2.convert import ConversionOptions, convert  # noqa: E402
from mappings.v2.parse import parse  # noqa: E402

FIXTURE = ROOT / "fixtures" / "hl7v2" / "oru_r01_lab.hl7"
LIS = "urn:alliance:facility:CLINIC-E:cs:LIS"
V2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"


def record() -> dict[str, Any]:
    """An Observation with 10 coded elements, as a community clinic's LIS would send it."""

    def cc(system: str, code: str) -> dict[str, Any]:
        return {"coding": [{"system": system, "code": code}]}

    return {
        "resourceType": "Observation",
        "id": "bench",
        "status": "final",
        "category": [
            cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")
        ],
        "code": cc(LIS, "1023"),
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2026-12-01T08:00:00+08:00",
        "valueQuantity": {"value": 6.1, "unit": "%"},
        "interpretation": [cc(V2_0078, "H")],
        "component": [
            {"code": cc(LIS, code), "valueQuantity": {"value": v, "unit": unit}}
            for code, v, unit in (
                ("1001", 6.4, "mmol/l"),
                ("1008", 71, "umol/l"),
                ("1002", 4.1, "mmol/l"),
            )
        ],
    }


def apply_cost(term: Terminology, rounds: int, calls: int) -> dict[str, list[float]]:
    """Microseconds per apply_dictionary call in each round: CPU time of this process (what
    the mapping costs; other workers on a shared machine do not inflate it) and wall time."""
    res = record()
    applied = apply_dictionary(res, term, source="clinic-e")
    assert not applied.unmapped and applied.changed
    out: dict[str, list[float]] = {"cpu": [], "wall": []}
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            apply_dictionary(res, term, source="clinic-e")
        out["cpu"].append((time.process_time() - cpu) / calls * 1e6)
        out["wall"].append((time.perf_counter() - wall) / calls * 1e6)
    return out


def convert_rates(term: Terminology, rounds: int, seconds: float) -> dict[str, list[float]]:
    """parse + convert messages/s with the dictionary and with an empty one, alternating."""
    raw = FIXTURE.read_bytes()
    out: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for name, t in (("on", term), ("off", Terminology.empty())):
            options = ConversionOptions(
                institution="hosp-a",
                master_id_system="urn:alliance:resident-health-card",
                terminology=t,
            )
            out[name].append(
                rate(lambda o=options: convert(parse(raw), options=o), seconds=seconds, rounds=1)
            )
    return out


async def mllp_rates(rounds: int, seconds: float, connections: int) -> dict[str, list[float]]:
    """Messages/s over MLLP into a fresh production gateway per round, with the shipped
    dictionary and with an empty dictionary directory, alternating."""
    from bench.bench_ingest import gateway_env, start_gateway
    from bench.bench_mllp import load
    from gateway.demo import free_port
    from tests.services.harness import services_from_env_or_start

    raw = FIXTURE.read_bytes()
    out: dict[str, list[float]] = {"on": [], "off": []}
    with services_from_env_or_start() as services:
        for _ in range(rounds):
            for name in ("on", "off"):
                with tempfile.TemporaryDirectory() as tmp:
                    env = gateway_env(
                        services, "production", f"{tmp}/gw", GATEWAY_INSTITUTION="hosp-a"
                    )
                    if name == "off":
                        (Path(tmp) / "empty-dictionary").mkdir()
                        env["GATEWAY_DICTIONARY_DIR"] = f"{tmp}/empty-dictionary"
                    http_port, mllp_port = free_port(), free_port()
                    env["GATEWAY_MLLP_PORT"] = str(mllp_port)
                    proc = start_gateway(env, http_port, Path(tmp) / "gateway.log")
                    try:
                        result = await load(mllp_port, seconds, connections, raw)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    out[name].append(result["msgs_per_s"])
    return out


def main() -> None:
    """Run and print (and write) the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=1.0, help="one convert round")
    ap.add_argument("--mllp", action="store_true")
    ap.add_argument("--mllp-seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    term = Terminology.load_default()
    load_before = os.getloadavg()[0]
    cost = apply_cost(term, args.rounds, args.calls)
    median = statistics.median(cost["cpu"])
    conv = convert_rates(term, args.rounds, args.seconds)
    on, off = statistics.median(conv["on"]), statistics.median(conv["off"])
    build = "compiled (mypyc)" if mappings.v2.COMPILED else "as Python"
    lines = [
        f"Dictionary version `{term.version}` ({len(term.files)} files). One core, median of "
        f"{args.rounds} rounds; machine load average {load_before:.1f} on "
        f"{os.cpu_count()} cores when the mapping cost was measured.",
        "",
        "| measurement | result | rounds |",
        "| --- | --- | --- |",
        f"| `apply_dictionary`, Observation with 10 coded elements (target < 30 us), CPU time "
        f"| **{median:.1f} us** per record | {', '.join(f'{x:.1f}' for x in cost['cpu'])} |",
        f"| same, wall time | {statistics.median(cost['wall']):.1f} us per record | "
        f"{', '.join(f'{x:.1f}' for x in cost['wall'])} |",
        f"| HL7 v2 parse + convert (ORU^R01 fixture, conversion {build}), dictionary on | "
        f"{on:,.0f} messages/s | {', '.join(f'{x:.0f}' for x in conv['on'])} |",
        f"| same, empty dictionary (mapping off) | {off:,.0f} messages/s | "
        f"{', '.join(f'{x:.0f}' for x in conv['off'])} |",
    ]
    if args.mllp:
        rates = asyncio.run(mllp_rates(args.rounds, args.mllp_seconds, args.connections))
        for name in ("on", "off"):
            label = "shipped dictionary" if name == "on" else "empty dictionary directory"
            lines.append(
                f"| HL7 v2 over MLLP end to end, production profile, {args.connections} "
                f"connections, {label} | {statistics.median(rates[name]):,.0f} messages/s | "
                f"{', '.join(f'{x:.0f}' for x in rates[name])} |"
            )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        command = "python bench/bench_dictionary.py" + (" --mllp" if args.mllp else "")
        write_section(ROOT / "docs" / "benchmarks.md", "dictionary", body, command=command)


if __name__ == "__main__":
    main()
