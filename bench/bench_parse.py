"""Benchmark: parse rate of hl7apy vs python-hl7 vs our parser, and our parse + convert,
on the ORU^R01 fixture (5 OBX), one core, median of several rounds (messages/s).

Run:  .venv/bin/python bench/bench_parse.py [--rounds 5] [--seconds 1.0] [--write]
Prints a markdown table; ``--write`` also puts it into docs/benchmarks.md (section
``parse``). The target (issue 3) is our parse stage at least 20 times hl7apy's rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hl7
import orjson
from hl7apy.parser import parse_message

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from mappings.terminology import Terminology  # noqa: E402
from mappings.v2.convert import ConversionOptions, convert  # noqa: E402
from mappings.v2.parse import parse  # noqa: E402

FIXTURE = ROOT / "fixtures" / "hl7v2" / "oru_r01_lab.hl7"


def rate(fn: Callable[[], object], *, seconds: float, rounds: int) -> float:
    """Median messages/s of ``fn`` over ``rounds`` rounds of about ``seconds`` each."""
    results = []
    for _ in range(rounds):
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            fn()
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        results.append(count / (now - start))
    return statistics.median(results)


def main() -> None:
    """Run the benchmark and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    raw = FIXTURE.read_bytes()
    text = raw.decode("utf-8")
    options = ConversionOptions(
        institution="hosp-a",
        master_id_system="urn:alliance:resident-health-card",
        terminology=Terminology.load_default(),
    )
    produced = len(convert(parse(raw), options=options).resources)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("hl7apy `parse_message`", lambda: parse_message(text)),
        ("python-hl7 `hl7.parse`", lambda: hl7.parse(text)),
        ("ours: `parse` (bytes, MSH-18 decode)", lambda: parse(raw)),
        (
            f"ours: `parse` + `convert` ({produced} resources)",
            lambda: convert(parse(raw), options=options),
        ),
        (
            "ours: `parse` + `convert` + orjson of every resource",
            lambda: [orjson.dumps(r) for r in convert(parse(raw), options=options).resources],
        ),
    ]
    rates = []
    for name, fn in cases:
        seconds = min(args.seconds, 0.5) if name.startswith("hl7apy") else args.seconds
        rates.append((name, rate(fn, seconds=seconds, rounds=args.rounds)))
    base = rates[0][1]
    lines = [
        "| parser (ORU^R01, 5 OBX, one core) | messages/s (median) | × hl7apy |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {r:,.0f} | {r / base:,.1f} |" for name, r in rates]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "parse",
            "## HL7 v2 parse and convert\n\n" + table,
            command=".venv/bin/python bench/bench_parse.py --write",
        )


if __name__ == "__main__":
    main()
