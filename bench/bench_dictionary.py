"""Benchmark: the unified dictionary's cost.

1. ``apply_dictionary`` on an Observation with 10 coded elements (local code, category,
   interpretation, value unit, three components each with a local code and a unit): CPU time
   per record, median over rounds, one core. Target (issue 14): under 30 us. Beside it, in the
   same rounds, a reference any machine can reproduce: one ``orjson.dumps`` of the same record;
   the ratio of the two is what to compare across machines.
2. HL7 v2 parse + convert of the ORU^R01 fixture with the dictionary against an empty one, in
   alternating rounds of the same run (the conversion is where HL7 input is mapped; concepts
   are memoised per sending facility, so this is the steady-state cost).
3. With ``--fhir``: FHIR transaction Bundles of 20 Observations into a fresh production gateway
   per round (real services, bench/bench_ingest.py's load generator), alternating: the shipped
   dictionary with Bundles in a clinic's local codes and units (every code and unit mapped), an
   empty dictionary directory with the same Bundles already carrying what the mapping adds
   (LOINC beside the local code, UCUM units: the same stored records, nothing to map), and an
   empty dictionary with the local Bundles (every code unmapped: tagged and queued for
   curation under the default ``accept`` policy).
4. With ``--mllp``: ORU^R01 over MLLP into a gateway on real services with the shipped
   dictionary against an empty dictionary directory (``GATEWAY_DICTIONARY_DIR``), alternating
   rounds, each against a fresh gateway (bench/bench_mllp.py's load generator).

Run:  .venv/bin/python bench/bench_dictionary.py [--rounds 5] [--fhir] [--mllp] [--no-write]
(starts its own services unless GATEWAY_SERVICES_ENV is set). Writes its section of
docs/benchmarks.md (``dictionary``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

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
    """Microseconds per call in each round, CPU time of this process (what the mapping costs;
    other work on a shared machine inflates wall time, not this): ``apply_dictionary`` and, in
    the same round, the reference ``orjson.dumps`` of the same record; and the wall time of
    ``apply_dictionary``."""
    res = record()
    applied = apply_dictionary(res, term, source="clinic-e")
    assert not applied.unmapped and applied.changed
    out: dict[str, list[float]] = {"cpu": [], "wall": [], "dumps": []}
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            apply_dictionary(res, term, source="clinic-e")
        out["cpu"].append((time.process_time() - cpu) / calls * 1e6)
        out["wall"].append((time.perf_counter() - wall) / calls * 1e6)
        cpu = time.process_time()
        for _ in range(calls):
            orjson.dumps(res)
        out["dumps"].append((time.process_time() - cpu) / calls * 1e6)
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


def lab_items(term: Terminology, n: int = 10) -> list[tuple[str, str, str, str, str]]:
    """(local code, local unit spelling, LOINC code, LOINC display, UCUM unit) of ``n`` items of
    the CLINIC-E LIS map that translate silently and whose unit the unit map knows."""
    out = []
    for (_, system, code), matches in sorted(term.forward.items()):
        if system != LIS or len(matches) != 1 or matches[0].equivalence != "equivalent":
            continue
        m = matches[0]
        ucum = next(
            (
                p["value"]
                for r in term.resources
                if r.get("url") == m.concept_map
                for g in r["group"]
                for e in g["element"]
                if e["code"] == code
                for t in e["target"]
                for p in t.get("product", [])
            ),
            None,
        )
        if ucum and m.target_code and term.unit(ucum.lower()) == ucum:
            out.append((code, ucum.lower(), m.target_code, m.target_display or "", ucum))
        if len(out) == n:
            break
    assert len(out) == n, out
    return out


def fhir_bundles(
    term: Terminology,
) -> dict[str, Callable[[int, int, int], dict[str, Any]]]:
    """Bundle makers ``(n, client, seq)``: ``local`` in CLINIC-E's codes and units, and
    ``premapped``: the same with what the shipped dictionary adds already in (LOINC coding
    beside the local one, UCUM system and code on the quantity)."""
    from bench.bench_ingest import observation_bundle

    items = lab_items(term)

    def local(n: int, client: int, seq: int) -> dict[str, Any]:
        bundle = observation_bundle(n, client, seq)
        for i, entry in enumerate(bundle["entry"]):
            code, unit, _, _, _ = items[i % len(items)]
            res = entry["resource"]
            res["code"] = {"coding": [{"system": LIS, "code": code}]}
            res["valueQuantity"] = {"value": res["valueQuantity"]["value"], "unit": unit}
        return bundle

    def premapped(n: int, client: int, seq: int) -> dict[str, Any]:
        bundle = local(n, client, seq)
        for i, entry in enumerate(bundle["entry"]):
            _, _, loinc, display, ucum = items[i % len(items)]
            res = entry["resource"]
            res["code"]["coding"].append(
                {"system": "http://loinc.org", "code": loinc, "display": display}
            )
            res["valueQuantity"].update(system="http://unitsofmeasure.org", code=ucum)
        return bundle

    # The premapped Bundle is what the dictionary makes of the local one.
    sample = local(1, 0, 0)["entry"][0]["resource"]
    mapped = apply_dictionary(copy.deepcopy(sample), term, source="clinic-e").resource
    assert mapped == premapped(1, 0, 0)["entry"][0]["resource"], mapped
    return {"local": local, "premapped": premapped}


#: FHIR variants: (dictionary, Bundles) -> label.
FHIR_VARIANTS = {
    ("shipped", "local"): "shipped dictionary, local codes (every code and unit mapped)",
    ("empty", "premapped"): "empty dictionary, the same records sent already mapped",
    ("empty", "local"): "empty dictionary, local codes (every code unmapped: tagged, queued)",
}


async def fhir_rates(
    term: Terminology, rounds: int, seconds: float, clients: int, per_bundle: int
) -> dict[tuple[str, str], list[float]]:
    """Resources/s of FHIR transaction Bundles into a fresh production gateway per round, for
    each of FHIR_VARIANTS in turn (alternating, the order rotated each round). Raises
    SystemExit on a failed Bundle."""
    from bench.bench_ingest import bench_token, gateway_env, load, start_gateway
    from gateway.demo import free_port
    from tests.services.harness import services_from_env_or_start

    makers = fhir_bundles(term)
    out: dict[tuple[str, str], list[float]] = {v: [] for v in FHIR_VARIANTS}
    variants = list(FHIR_VARIANTS)
    with services_from_env_or_start() as services:
        for n in range(rounds):
            # Each round starts with the next variant: no variant always runs first or last.
            for dictionary, bundles in variants[n % 3 :] + variants[: n % 3]:
                with tempfile.TemporaryDirectory() as tmp:
                    env = gateway_env(
                        services,
                        "production",
                        f"{tmp}/gw",
                        GATEWAY_INSTITUTION="clinic-e",
                        GATEWAY_MLLP_ENABLED="false",
                    )
                    if dictionary == "empty":
                        (Path(tmp) / "empty-dictionary").mkdir()
                        env["GATEWAY_DICTIONARY_DIR"] = f"{tmp}/empty-dictionary"
                    port = free_port()
                    token = bench_token(Path(f"{tmp}/gw"), "clinic-e")
                    proc = start_gateway(env, port, Path(tmp) / "gateway.log")
                    try:
                        result = await load(
                            f"http://127.0.0.1:{port}",
                            seconds,
                            clients,
                            per_bundle,
                            token,
                            make=makers[bundles],
                        )
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    if result["errors"]:
                        raise SystemExit(f"{dictionary}/{bundles}: {result}")
                    out[(dictionary, bundles)].append(result["resources_per_s"])
                    print(dictionary, bundles, result, flush=True)
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
        for n in range(rounds):
            for name in ("on", "off") if n % 2 == 0 else ("off", "on"):
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


def _rounds(values: list[float], fmt: str = ".0f") -> str:
    return ", ".join(f"{x:{fmt}}" for x in values)


def main() -> None:
    """Run and print (and write) the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=1.0, help="one convert round")
    ap.add_argument("--fhir", action="store_true")
    ap.add_argument("--fhir-seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-bundle", type=int, default=20)
    ap.add_argument("--mllp", action="store_true")
    ap.add_argument("--mllp-seconds", type=float, default=20.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    term = Terminology.load_default()
    load_before = os.getloadavg()[0]
    cost = apply_cost(term, args.rounds, args.calls)
    median = statistics.median(cost["cpu"])
    dumps = statistics.median(cost["dumps"])
    conv = convert_rates(term, args.rounds, args.seconds)
    on, off = statistics.median(conv["on"]), statistics.median(conv["off"])
    build = "compiled (mypyc)" if mappings.v2.COMPILED else "as Python"
    lines = [
        f"Dictionary version `{term.version}` ({len(term.files)} files). Median of "
        f"{args.rounds} rounds; machine load average {load_before:.1f} on "
        f"{os.cpu_count()} cores when the mapping cost was measured.",
        "",
        "| measurement | result | rounds |",
        "| --- | --- | --- |",
        f"| `apply_dictionary`, Observation with 10 coded elements (target < 30 us), CPU time "
        f"| **{median:.1f} us** per record | {_rounds(cost['cpu'], '.1f')} |",
        f"| reference in the same rounds: `orjson.dumps` of that record, CPU time | "
        f"{dumps:.2f} us per record; mapping = **{median / dumps:.1f}x** one dumps | "
        f"{_rounds(cost['dumps'], '.2f')} |",
        f"| `apply_dictionary`, wall time | {statistics.median(cost['wall']):.1f} us per "
        f"record | {_rounds(cost['wall'], '.1f')} |",
        f"| HL7 v2 parse + convert (ORU^R01 fixture, conversion {build}), dictionary on | "
        f"{on:,.0f} messages/s | {_rounds(conv['on'])} |",
        f"| same, empty dictionary (mapping off) | {off:,.0f} messages/s (on/off "
        f"{on / off:.2f}) | {_rounds(conv['off'])} |",
    ]
    if args.fhir:
        fhir = asyncio.run(
            fhir_rates(term, args.rounds, args.fhir_seconds, args.clients, args.per_bundle)
        )
        base = statistics.median(fhir[("empty", "premapped")])
        for variant, label in FHIR_VARIANTS.items():
            rate_ = statistics.median(fhir[variant])
            lines.append(
                f"| FHIR Bundles ({args.per_bundle} Observations, {args.clients} clients), "
                f"production profile, {label} | {rate_:,.0f} resources/s "
                f"({rate_ / base:.2f}x sent mapped) | {_rounds(fhir[variant])} |"
            )
    if args.mllp:
        rates = asyncio.run(mllp_rates(args.rounds, args.mllp_seconds, args.connections))
        mllp_off = statistics.median(rates["off"])
        for name in ("on", "off"):
            label = "shipped dictionary" if name == "on" else "empty dictionary directory"
            rate_ = statistics.median(rates[name])
            lines.append(
                f"| HL7 v2 over MLLP end to end, production profile, {args.connections} "
                f"connections, {label} | {rate_:,.0f} messages/s "
                f"({rate_ / mllp_off:.2f}x empty) | {_rounds(rates[name])} |"
            )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        command = ".venv/bin/python bench/bench_dictionary.py" + "".join(
            f" --{flag}" for flag in ("fhir", "mllp") if getattr(args, flag)
        )
        if args.rounds != 5:
            command += f" --rounds {args.rounds}"
        write_section(ROOT / "docs" / "benchmarks.md", "dictionary", body, command=command)


if __name__ == "__main__":
    main()
