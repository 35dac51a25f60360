"""Benchmark: the shared ledger end to end. Not a test.

Two measurements, each printed as a markdown table and written to docs/benchmarks.md:

* ``throughput``: sustained leaves/s through the whole ledger (group commit, tree, Ed25519 +
  ML-DSA-65 checkpoint per batch, conditional append with message id) on a real 3-node NATS
  JetStream cluster (stream R3, file storage, servers with ``sync_interval: always``), beside
  the raw JetStream publish rate of the same cluster measured in the same run: leaf-sized
  messages published one at a time and with many in flight, and batch-sized messages.
  Leaves are pre-encoded record leaves (the pipeline's encoding cost is not the ledger's).
  The cluster is started here from the cached nats-server binary unless ``--nats-urls`` is given.
* ``audit``: ``gateway verify`` (a subprocess, as an auditor runs it) on an embedded data
  directory holding 10^6 leaves in 500-leaf batches, each with its signed checkpoint, plus the
  node's stored tree files: every signature, leaf, root, link and stored node is checked.

Usage::

    python bench/bench_ledger.py [--only throughput|audit] [--seconds 20] [--leaves 1000000]
        [--nats-urls nats://...,...] [--concurrency 64] [--per-call 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from ledger.batch import Batch, batch_id, encode_batch  # noqa: E402
from ledger.checkpoint import Checkpoint  # noqa: E402
from ledger.keys import Signer, TrustedKeys  # noqa: E402
from ledger.leaves import encode_leaf  # noqa: E402
from ledger.merkle import leaf_hash  # noqa: E402
from ledger.sequencer import Ledger  # noqa: E402
from ledger.stored_tree import TreeStore  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
ORIGIN = "alliance.example/ledger"
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


def record_leaf(i: int, source: str = "hosp-a") -> bytes:
    """A realistic record leaf (about 330 bytes), built directly in canonical key order (the
    RFC 8785 encoder is the pipeline's cost, not the ledger's); checked once below."""
    return (
        f'{{"cid":"{CID}","dictionary":"2026.1","kind":"record",'
        f'"patient":"{i * 7919:064x}","record":"r{i:010d}","sha256":"{i:064x}",'
        f'"source":"{source}","time":"2026-11-28T19:41:38Z","type":"Observation",'
        f'"v":1,"version":1}}'
    ).encode()


assert record_leaf(12) == encode_leaf(
    "record",
    {
        "record": "r0000000012",
        "version": 1,
        "cid": CID,
        "sha256": f"{12:064x}",
        "patient": f"{12 * 7919:064x}",
        "type": "Observation",
        "source": "hosp-a",
        "dictionary": "2026.1",
        "time": "2026-11-28T19:41:38Z",
    },
)


# ---- a 3-node JetStream cluster on loopback -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nats_binary() -> str:
    found = shutil.which("nats-server")
    cached = Path.home() / ".cache" / "alliance-gateway" / "bin" / "nats-server"
    if cached.exists():
        return str(cached)
    if found:
        return found
    raise SystemExit("nats-server not found: run scripts/install-services.sh or pass --nats-urls")


@contextlib.contextmanager
def nats_cluster(workdir: Path) -> Iterator[list[str]]:
    """Start three clustered nats-server processes with JetStream (sync_interval: always)."""
    binary = _nats_binary()
    clients = [_free_port() for _ in range(3)]
    routes = [_free_port() for _ in range(3)]
    procs = []
    try:
        for i in range(3):
            d = workdir / f"n{i}"
            d.mkdir(parents=True)
            conf = d / "nats.conf"
            route_urls = ", ".join(f"nats://127.0.0.1:{p}" for p in routes)
            conf.write_text(
                f"""server_name: bench-n{i}
listen: 127.0.0.1:{clients[i]}
jetstream {{ store_dir: "{d / "js"}", sync_interval: always }}
cluster {{ name: bench, listen: 127.0.0.1:{routes[i]}, routes: [{route_urls}] }}
"""
            )
            log = (d / "server.log").open("wb")
            procs.append(
                subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
            )
        yield [f"nats://127.0.0.1:{p}" for p in clients]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _js_context(urls: list[str]) -> tuple[Any, Any]:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=5)
    return nc, nc.jetstream(timeout=10)


async def _make_stream(js: Any, name: str) -> None:
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig

    deadline = time.monotonic() + 30
    while True:
        try:
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[f"{name}.>"],
                    num_replicas=3,
                    storage=StorageType.FILE,
                    deny_delete=True,
                    deny_purge=True,
                    discard=DiscardPolicy.NEW,
                )
            )
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def raw_publish(urls: list[str], seconds: float, size: int, inflight: int) -> float:
    """Messages/s of ``size`` bytes published to an R3 file stream, ``inflight`` at a time."""
    nc, js = await _js_context(urls)
    name = f"RAW{uuid.uuid4().hex[:8].upper()}"
    await _make_stream(js, name)
    payload = os.urandom(size)
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await js.publish(f"{name}.x", payload)
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - t0
    await js.delete_stream(name)
    await nc.close()
    return count / elapsed


async def ledger_throughput(
    urls: list[str], seconds: float, concurrency: int, per_call: int, max_leaves: int = 500
) -> dict[str, float]:
    """Leaves/s through Ledger over JetStreamLog with ``concurrency`` callers appending
    ``per_call`` leaves each (like a Bundle's records) in a loop; also the ack latency."""
    from gateway.backends.log_jetstream import JetStreamLog

    stream = f"LEDGER{uuid.uuid4().hex[:8].upper()}"
    log = JetStreamLog(servers=urls, stream=stream, replicas=3, timeout=10.0)
    await log.ping()
    signer = Signer.generate("hosp-a")
    ledger = Ledger(
        log=log,
        tree=TreeStore.memory(),
        signer=signer,
        trusted=TrustedKeys.of([signer]),
        origin=ORIGIN,
        max_leaves=max_leaves,
        max_delay=0.005,
    )
    await ledger.start(follow_interval=None)
    latencies: list[float] = []
    count = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal count
        i = w * per_call
        while time.perf_counter() < stop:
            leaves = [record_leaf(i + k) for k in range(per_call)]
            i += concurrency * per_call
            t0 = time.perf_counter()
            await ledger.append(leaves)
            latencies.append(time.perf_counter() - t0)
            count += per_call

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    batches = ledger.stats.batches_written
    await ledger.stop()
    await log.close()
    latencies.sort()
    return {
        "leaves_per_s": count / elapsed,
        "batches": batches,
        "leaves_per_batch": count / max(batches, 1),
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


async def run_throughput(args: argparse.Namespace) -> str:
    async def body(urls: list[str]) -> str:
        await asyncio.sleep(0)
        nc, js = await _js_context(urls)
        await _make_stream(js, "WARMUP")  # waits for the cluster to elect a meta leader
        await js.delete_stream("WARMUP")
        await nc.close()
        leaf_size = len(record_leaf(1))
        s = args.seconds
        raw_one = await raw_publish(urls, s / 2, leaf_size, 1)
        raw_many = await raw_publish(urls, s / 2, leaf_size, args.concurrency)
        raw_batch = await raw_publish(urls, s / 2, 300_000, 1)
        led = await ledger_throughput(urls, s, args.concurrency, args.per_call, args.max_leaves)
        return "\n".join(
            [
                "### Ledger throughput on a 3-node JetStream cluster (R3, file, sync always)",
                "",
                "| what | rate | notes |",
                "| --- | ---: | --- |",
                f"| raw JetStream publish, {leaf_size} B, 1 in flight | {raw_one:,.0f} msg/s | "
                "one leaf per message, each acked |",
                f"| raw JetStream publish, {leaf_size} B, {args.concurrency} in flight | "
                f"{raw_many:,.0f} msg/s | one leaf per message, concurrent publishers |",
                f"| raw JetStream publish, 300 kB, 1 in flight | {raw_batch:,.0f} msg/s | "
                "about a 500-leaf batch per message |",
                f"| **ledger append (whole path)** | **{led['leaves_per_s']:,.0f} leaves/s** | "
                f"{args.concurrency} callers x {args.per_call} leaves; "
                f"batches of at most {args.max_leaves} (mean {led['leaves_per_batch']:.0f}); "
                f"ack p50 {led['p50_ms']:.1f} ms, "
                f"p99 {led['p99_ms']:.1f} ms |",
                "",
                "The ledger path per batch: leaf hashes, tree append, checkpoint signed with "
                "Ed25519 and ML-DSA-65, canonical batch encoding, conditional publish "
                "(`Nats-Expected-Last-Sequence`, `Nats-Msg-Id`) acknowledged by the R3 stream.",
            ]
        )

    if args.nats_urls:
        return await body(args.nats_urls.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp, nats_cluster(Path(tmp)) as urls:
        return await body(urls)


# ---- audit at 10^6 leaves --------------------------------------------------------------------


def build_data_dir(data: Path, n: int, batch: int = 500) -> tuple[float, int]:
    """An embedded data dir with ``n`` leaves: log file, stored tree, keys, trust file.

    Returns (seconds, log file bytes).
    """
    from gateway.backends.log_file import encode_record
    from gateway.config import Settings
    from gateway.datadir import DataDir
    from gateway.runtime import load_signer, load_trust

    t0 = time.perf_counter()
    settings = Settings(profile="embedded", data_dir=data, institution="hosp-a")
    signer = load_signer(settings)
    trusted = load_trust(settings, signer)
    paths = DataDir.of(settings)
    paths.ledger.mkdir(parents=True, exist_ok=True)
    tree = TreeStore.open(paths.tree)
    prev = bytes(32)
    log_path = paths.log
    with log_path.open("wb") as out:
        for b, start in enumerate(range(0, n, batch)):
            leaves = [record_leaf(i) for i in range(start, min(n, start + batch))]
            if b == 0:
                leaves[0] = encode_leaf(
                    "key",
                    {
                        "action": "trust",
                        "sha256": trusted.digest().hex(),
                        "source": signer.name,
                        "time": "2026-11-28T19:41:38Z",
                    },
                )
            hashes = [leaf_hash(x) for x in leaves]
            tree.append(hashes)
            cp = Checkpoint(ORIGIN, tree.size, tree.root(), prev, 1_790_000_000_000 + b)
            signed = signer.sign(cp)
            prev = cp.body_hash()
            nonce = os.urandom(16)
            bid = batch_id(signer.name, hashes, nonce)
            message = Batch(signer.name, bid, tuple(leaves), signed.to_bytes(), nonce)
            out.write(encode_record(encode_batch(message), bid))
        out.flush()
        os.fsync(out.fileno())
    tree.close()
    return time.perf_counter() - t0, log_path.stat().st_size


def run_audit(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        data = Path(tmp) / "gw"
        build_s, size = build_data_dir(data, args.leaves)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "verify", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=env,
        )
        verify_s = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"verify failed:\n{res.stdout}\n{res.stderr}")
    batches = (args.leaves + 499) // 500
    return "\n".join(
        [
            "### Full audit (`gateway verify`) of the embedded ledger",
            "",
            "| leaves | batches (signed checkpoints) | log file | build | `gateway verify` |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {args.leaves:,} | {batches:,} | {size / 1e6:,.0f} MB | {build_s:.1f} s | "
            f"**{verify_s:.1f} s** |",
            "",
            "Everything is checked, nothing sampled: every record CRC of the log file, every "
            "batch decoded, both signatures (Ed25519 and ML-DSA-65) of every checkpoint, every "
            "leaf decoded and validated (canonical form and field shapes), the tree re-derived "
            "and every checkpoint's size, root, origin, batch id and `prev` link compared, the "
            "trust anchor, and the node's stored tree files (every CRC, every node re-hashed "
            "from its children, then compared with the re-derived tree). Wall time of the "
            "subprocess, including interpreter start.",
        ]
    )


def main() -> None:
    """Run the benchmarks, print the tables, write docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description="ledger benchmarks")
    parser.add_argument("--only", choices=["throughput", "audit"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-call", type=int, default=20)
    parser.add_argument("--max-leaves", type=int, default=500, help="group commit batch limit")
    parser.add_argument("--nats-urls", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "python bench/bench_ledger.py " + " ".join(sys.argv[1:])
    if args.only in (None, "throughput"):
        table = asyncio.run(run_throughput(args))
        print(table + "\n")
        if not args.no_write:
            write_section(DOC, "ledger-throughput", table, command=command.strip())
    if args.only in (None, "audit"):
        table = run_audit(args)
        print(table + "\n")
        if not args.no_write:
            write_section(DOC, "ledger-audit", table, command=command.strip())


if __name__ == "__main__":
    main()
