"""Benchmark: parse rate of hl7apy vs python-hl7 vs our parser, and our parse + convert,
on the ORU^R01 fixture (5 OBX), one core, median of several rounds (messages/s). Our cases run
twice in the same run: with the compiled build of ``mappings.v2`` (when there is one, see
mappings/compiled.py) and as Python (a subprocess with ``GATEWAY_PURE_PYTHON=1``).

Run:  .venv/bin/python bench/bench_parse.py [--rounds 5] [--seconds 1.0] [--write]
Prints a markdown table; ``--write`` also puts it into docs/benchmarks.md (section
``parse``). The target (issue 3) is our parse stage at least 20 times hl7apy's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hl7
import orjson
from hl7apy.parser import parse_message

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mappings.v2  # noqa: E402
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
    parser.add_argument("--json", action="store_true", help="print our cases' rates as JSON")
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
    if args.json:  # the Python build's rates, for the parent run
        ours = {n: rate(fn, seconds=args.seconds, rounds=args.rounds) for n, fn in cases[2:]}
        print(json.dumps({"compiled": mappings.v2.COMPILED, "rates": ours}))
        return
    rates = []
    for name, fn in cases:
        seconds = min(args.seconds, 0.5) if name.startswith("hl7apy") else args.seconds
        rates.append((name, rate(fn, seconds=seconds, rounds=args.rounds)))
    pure = python_build_rates(args.rounds, args.seconds)
    build = "compiled (mypyc)" if mappings.v2.COMPILED else "Python (no compiled build)"
    base = rates[0][1]
    lines = [
        f"| parser (ORU^R01, 5 OBX, one core) | messages/s (median), ours {build} | × hl7apy "
        "| ours as Python, same run | × hl7apy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rates:
        if name in pure:
            p = pure[name]
            lines.append(f"| {name} | {r:,.0f} | {r / base:,.1f} | {p:,.0f} | {p / base:,.1f} |")
        else:
            lines.append(f"| {name} | {r:,.0f} | {r / base:,.1f} | | |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "parse",
            "## HL7 v2 parse and convert\n\n" + table,
            command=".venv/bin/python bench/bench_parse.py --write",
        )


def python_build_rates(rounds: int, seconds: float) -> dict[str, float]:
    """Our cases' rates with ``mappings.v2`` as Python (this script in a subprocess)."""
    env = {**os.environ, "GATEWAY_PURE_PYTHON": "1"}
    command = [sys.executable, __file__, "--json", f"--rounds={rounds}", f"--seconds={seconds}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    assert answer["compiled"] is False
    rates: dict[str, float] = answer["rates"]
    return rates


if __name__ == "__main__":
    main()
