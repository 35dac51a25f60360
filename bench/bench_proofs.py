"""Benchmark: RFC 9162 proof generation and verification at 10^4, 10^5 and 10^6 leaves.

Not a test. Builds an in-memory TreeStore per size (and once a file-backed one at the largest
size, to time reopening and the full re-hash audit), then times, for random leaves and random
earlier sizes, inclusion and consistency proof generation (TreeStore) and verification
(ledger.verify). Prints a markdown table of medians (and p99) in microseconds.

Usage: python bench/bench_proofs.py [--sizes 10000,100000,1000000] [--samples 2000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ledger import merkle
from ledger.stored_tree import TreeStore
from ledger.verify import verify_consistency, verify_inclusion

Timing = tuple[float, float]


def timed(fn: Callable[[], object], samples: int) -> Timing:
    """(median, p99) of ``fn``'s wall time in microseconds."""
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def build(store: TreeStore, n: int, batch: int = 500) -> float:
    """Append ``n`` leaf hashes in batches; return the seconds taken."""
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        end = min(n, start + batch)
        store.append([merkle.leaf_hash(b"leaf %d" % i) for i in range(start, end)])
    return time.perf_counter() - t0


def measure(n: int, samples: int, rng: random.Random) -> tuple[int, float, list[Timing]]:
    """Build an in-memory tree of ``n`` leaves and time proofs and roots over it."""
    store = TreeStore.memory()
    build_s = build(store, n)
    root = store.root(n)
    leaves = [rng.randrange(n) for _ in range(samples)]
    firsts = [rng.randrange(1, n) for _ in range(samples)]

    it_i = iter(leaves)
    incl_gen = timed(lambda: store.inclusion_proof(next(it_i), n), samples)
    proofs = {i: store.inclusion_proof(i, n) for i in leaves}
    it_v = iter(leaves)

    def verify_one() -> None:
        i = next(it_v)
        verify_inclusion(store.leaf_hash(i), i, n, proofs[i], root)

    incl_ver = timed(verify_one, samples)
    it_c = iter(firsts)
    cons_gen = timed(lambda: store.consistency_proof(next(it_c), n), samples)
    cproofs = {m: (store.consistency_proof(m, n), store.root(m)) for m in firsts}
    it_w = iter(firsts)

    def verify_cons() -> None:
        m = next(it_w)
        proof, first_root = cproofs[m]
        verify_consistency(m, n, proof, first_root, root)

    cons_ver = timed(verify_cons, samples)
    root_t = timed(lambda: store.root(n), samples)
    return n, build_s, [incl_gen, incl_ver, cons_gen, cons_ver, root_t]


def file_backed(n: int) -> str:
    """Time append, flush, reopen and check() of a file-backed store of ``n`` leaves."""
    with tempfile.TemporaryDirectory() as tmp:
        store = TreeStore.open(Path(tmp))
        build_s = build(store, n)
        t0 = time.perf_counter()
        store.flush()
        flush_s = time.perf_counter() - t0
        store.close()
        t0 = time.perf_counter()
        store = TreeStore.open(Path(tmp))
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.check()
        check_s = time.perf_counter() - t0
        store.close()
    return (
        f"File-backed store at {n:,} leaves: append {build_s:.2f} s, flush (fsync) "
        f"{flush_s:.3f} s, reopen {open_s:.3f} s (no re-hash), full check() {check_s:.2f} s."
    )


def main() -> None:
    """Run the benchmark and print the markdown table."""
    parser = argparse.ArgumentParser(description="RFC 9162 proof benchmark")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=9162)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(args.seed)
    rows = [measure(n, args.samples, rng) for n in sizes]
    print(
        "| leaves | inclusion proof | inclusion verify | consistency proof "
        "| consistency verify | root | append all leaves |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, build_s, timings in rows:
        cells = " | ".join(f"{m:.1f} µs (p99 {p:.1f})" for m, p in timings)
        print(f"| {n:,} | {cells} | {build_s:.2f} s |")
    print()
    print(
        f"Median (p99) over {args.samples} random leaves or earlier tree sizes, proofs against "
        "the full tree; TreeStore in memory, one Python process."
    )
    print()
    print(file_backed(max(sizes)))


if __name__ == "__main__":
    main()
