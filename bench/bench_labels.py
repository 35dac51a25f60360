"""Benchmark: what security labels at ingest cost the HL7 v2 path (issue 15).

An HL7 message's resources get the dictionary's ``labels(resource)`` in the conversion worker
(gateway/hl7/workers.py ``prepare``), off the gateway's event loop. This times the worker's
whole job per message, ``convert_one`` (parse, convert, prepare), and the label step alone,
in alternating rounds in one process, on the ORU^R01 fixture the MLLP
benchmark sends (and once with an HIV test code, so a label is actually found and sealed).
The end-to-end rate is ``bench/bench_mllp.py``'s; this is the part labels take of the
worker's time.

Run:  .venv/bin/python bench/bench_labels.py [--messages 400] [--rounds 7] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from gateway.hl7 import workers  # noqa: E402
from mappings.terminology import Terminology  # noqa: E402
from mappings.v2.common import ConversionOptions  # noqa: E402

FIXTURE = ROOT / "fixtures" / "hl7v2" / "oru_r01_lab.hl7"


def measure(raw: bytes, options: ConversionOptions, n: int, rounds: int) -> tuple[float, float]:
    """(median µs of ``convert_one`` per message, median µs of the label step for the same
    message's resources), in alternating rounds of ``n``."""
    key = b"k" * 32
    out = workers.convert_one(raw, options, key)
    assert isinstance(out, workers.Converted), out
    pairs = [(orjson.loads(e.body), e.body) for e in out.entries]
    term = options.terminology
    whole: list[float] = []
    step: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            workers.convert_one(raw.replace(b"LIS20260315-0001", b"LIS-%08d" % i), options, key)
        whole.append((time.perf_counter() - t0) * 1e6 / n)
        t0 = time.perf_counter()
        for _ in range(n):
            for resource, body in pairs:
                workers._security(resource, body, term)
        step.append((time.perf_counter() - t0) * 1e6 / n)
    return statistics.median(whole), statistics.median(step)


def main() -> None:
    """Measure, print, optionally write the ``labels`` section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    options = ConversionOptions(terminology=Terminology.load_default(), institution="bench")
    plain = FIXTURE.read_bytes()
    hiv = plain.replace("HBSAG^乙肝表面抗原^L".encode(), b"56888-1^HIV 1+2 Ab^LN")
    rows = []
    for name, raw in (("ORU^R01, 5 OBX (no sensitive code)", plain), ("same, one HIV test", hiv)):
        whole, step = measure(raw, options, args.messages, args.rounds)
        rows.append(f"| {name} | {whole:.0f} µs | {step:.0f} µs | {step / whole:.1%} |")
    body = (
        "## Security labels at ingest (HL7 v2)\n\n"
        "The conversion worker's whole job per message (`convert_one`: parse, convert,"
        " prepare, labels included) and, in the same alternating rounds, the label step alone"
        " for that message's resources (`gateway/hl7/workers.py` `_security`: a scan of each"
        " resource's JSON for `code` strings against the labelling value sets, memoised per"
        " code, and the dictionary's `labels(resource)` only where one may match);"
        f" {args.rounds} rounds of {args.messages} messages, medians of the per-round means, one"
        " process. The step runs in the conversion workers, not on the gateway's event loop."
        " A first version that walked every resource with `labels(resource)` cost 83% of"
        " `convert_one` in one run.\n\n"
        "| message | `convert_one` | of it: labels | share |\n| --- | ---: | ---: | ---: |\n"
        + "\n".join(rows)
    )
    print(body)
    if args.write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "labels",
            body,
            command=".venv/bin/python bench/bench_labels.py --write",
        )


if __name__ == "__main__":
    main()
