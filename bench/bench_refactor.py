"""Benchmark: this tree against another checkout of the gateway, in alternating rounds.

A refactor must show no regression. This runs the project's own benchmarks, each tree with its
own virtual environment (so each runs its own code, compiled build included), round after round,
the order of the two trees swapped every round so that the shared machine's drift falls on both
alike, on one set of real services (Kubo, 3-node JetStream, Redis):

- HL7 ORU^R01 over MLLP, production profile (``bench/bench_mllp.py``, one round per run);
- FHIR Bundles of 20 Observations, production profile (``bench/bench_ingest.py``);
- ledger appends through the whole ledger (``bench/bench_ledger.py --only throughput``);
- ``fhir-cpu``: the FHIR write path's CPU cost, in one process (``bench/bench_fhir_cpu.py``,
  this tree's script run in each checkout): a rate of the whole machine moves with whatever
  else runs on it, CPU time per resource far less.

Reports each round, the medians and the ratio this tree / the other (target: at least 0.95).

Run:  .venv/bin/python bench/bench_refactor.py --base /path/to/checkout [--rounds 5]
      [--seconds 10] [--only hl7,fhir,ledger] [--from-log saved-stdout]
The other checkout needs its own ``.venv`` (``scripts/bootstrap.sh`` there), e.g.
``git worktree add /tmp/base <commit> && /tmp/base/scripts/bootstrap.sh``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from tests.services.harness import services_from_env_or_start  # noqa: E402

#: benchmark -> (script arguments given the seconds and NATS URLs, regex of its figure, unit)
CASES: dict[str, tuple[str, str, str]] = {
    "hl7": (
        "bench/bench_mllp.py --rounds 1 --seconds {s} --profile production "
        "--no-python-baseline --no-write",
        r"'msgs_per_s': ([0-9.]+)",
        "HL7 messages/s (MLLP, production)",
    ),
    "fhir": (
        "bench/bench_ingest.py --seconds {s} --no-write",
        r"^production \{.*'resources_per_s': ([0-9.]+)",
        "FHIR resources/s (Bundles, production)",
    ),
    "fhir-cpu": (
        str(ROOT / "bench" / "bench_fhir_cpu.py") + " --seconds {s}",
        r"resources_per_cpu_s: ([0-9.]+)",
        "FHIR resources per CPU-second (in-process, embedded)",
    ),
    "ledger": (
        "bench/bench_ledger.py --only throughput --seconds {s} --nats-urls {nats} --no-write",
        r"\*\*ledger append \(whole path\)\*\* \| \*\*([0-9,]+) leaves/s",
        "ledger leaves/s (JetStream R3)",
    ),
}


def run_case(tree: Path, case: str, seconds: float, env: dict[str, str], nats: str) -> float:
    """Run one benchmark of ``tree`` once; its figure. Raises RuntimeError when it failed."""
    args, pattern, _ = CASES[case]
    cmd = [str(tree / ".venv" / "bin" / "python"), *args.format(s=seconds, nats=nats).split()]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    match = re.search(pattern, out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"{tree} {case} failed ({out.returncode}): {out.stderr[-2000:]}")
    return float(match.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (its .venv)")
    ap.add_argument("--label", default="", help="what the other checkout is (e.g. a commit)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--only", default="hl7,fhir,fhir-cpu,ledger")
    ap.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for both trees' gateways (e.g. GATEWAY_SEARCH_INDEX=false)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--from-log",
        type=Path,
        default=None,
        help="report the whole rounds a run printed (its stdout saved to this file)",
    )
    args = ap.parse_args()
    cases = [c for c in args.only.split(",") if c]
    trees = {"this tree": ROOT, "base": args.base.resolve()}
    results: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in cases}
    if args.from_log is not None:
        # Every figure a run printed ("<round> <case> <tree> <value>"): report whole rounds.
        for line in args.from_log.read_text().splitlines():
            m = re.fullmatch(r"(\d+) (\w+) (this tree|base) ([0-9.,]+)", line.strip())
            if m and m.group(2) in results:
                results[m.group(2)][m.group(3)].append(float(m.group(4).replace(",", "")))
        rounds = min(len(v) for r in results.values() for v in r.values())
        for r in results.values():
            for name in r:
                r[name] = r[name][:rounds]
        args.rounds = rounds
    else:
        run_rounds(args, cases, trees, results)
    report(args, cases, results)


def run_rounds(
    args: argparse.Namespace,
    cases: list[str],
    trees: dict[str, Path],
    results: dict[str, dict[str, list[float]]],
) -> None:
    """Run every case of both trees, ``args.rounds`` times, alternating the order."""
    with services_from_env_or_start() as services:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_SERVICES_ENV"] = str(services.write_env())
        env.update(item.split("=", 1) for item in args.gateway_env)
        nats = ",".join(services.nats_urls)
        for n in range(args.rounds):
            order = list(trees.items()) if n % 2 == 0 else list(reversed(trees.items()))
            for case in cases:
                for name, tree in order:
                    value = run_case(tree, case, args.seconds, env, nats)
                    results[case][name].append(value)
                    print(n, case, name, f"{value:,.1f}", flush=True)


def report(
    args: argparse.Namespace, cases: list[str], results: dict[str, dict[str, list[float]]]
) -> None:
    """Print the medians and ratios (and write them into docs/benchmarks.md)."""
    label = args.label or str(args.base)
    lines = [
        f"This tree against `{label}`, {args.rounds} rounds, the two trees alternating (the "
        "order swapped every round), each running its own code and compiled build on the "
        f"same real services; {args.seconds:.0f} s per run"
        + (f" (gateways run with {', '.join(args.gateway_env)})" if args.gateway_env else "")
        + ". Medians, with every round:",
        "",
        "| benchmark | this tree | base | ratio | rounds (this tree / base) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for case in cases:
        mine, base = results[case]["this tree"], results[case]["base"]
        m, b = statistics.median(mine), statistics.median(base)
        rounds = ", ".join(f"{x:,.0f}/{y:,.0f}" for x, y in zip(mine, base, strict=True))
        lines.append(f"| {CASES[case][2]} | {m:,.0f} | {b:,.0f} | {m / b:.2f} | {rounds} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "refactor",
            text,
            command=f".venv/bin/python bench/bench_refactor.py --base <checkout of {label}>",
        )


if __name__ == "__main__":
    main()
