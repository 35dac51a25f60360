"""Where an HL7 message's time goes: per-stage latencies inside one gateway, on real services.

Runs a gateway in this process (no MLLP socket: ``HL7Ingest.handle`` is called by 32 concurrent
tasks, like 32 connections) and times each stage with wrappers: the de-duplication claim and
acceptance (Redis), the conversion (worker processes), the Kubo batch write, the ledger append
(and within it signing, the JetStream append, the whole batch write), and the whole store.
Prints medians and 90th percentiles and the gateway process's CPU time per message (the
conversion workers' CPU is not included). The stages overlap across messages, so their sum is
each message's latency, not the throughput's inverse.

Run:  .venv/bin/python bench/bench_hl7_stages.py [--messages 3000] [--profile production]
(starts its own services with tests/services/harness.py unless GATEWAY_SERVICES_ENV is set).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import pct  # noqa: E402
from bench.report import write_section  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.backends.blobs_kubo import KuboBlobStore  # noqa: E402
from gateway.backends.log_jetstream import JetStreamLog  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.hl7.dedup import Deduplicator  # noqa: E402
from gateway.hl7.workers import ConversionWorkers  # noqa: E402
from gateway.pipeline import RecordPipeline  # noqa: E402
from ledger.keys import Signer  # noqa: E402
from ledger.sequencer import Ledger  # noqa: E402
from tests.services.harness import services_from_env_or_start  # noqa: E402

FIXTURE = ROOT / "fixtures" / "hl7v2" / "oru_r01_lab.hl7"
TIMES: dict[str, list[float]] = defaultdict(list)


def timed_async(cls: Any, name: str, label: str) -> None:
    """Wrap ``cls.name`` (a coroutine method) to record its wall time under ``label``."""
    original: Callable[..., Awaitable[Any]] = getattr(cls, name)

    @functools.wraps(original)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(self, *args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)

    setattr(cls, name, wrapper)


def timed_sync(cls: Any, name: str, label: str) -> None:
    """Wrap ``cls.name`` (a plain method) to record its wall time under ``label``."""
    original: Callable[..., Any] = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)

    setattr(cls, name, wrapper)


def timed_future(cls: Any, name: str, label: str) -> None:
    """Wrap ``cls.name`` (a plain method returning a future) to record the time until the
    future is done under ``label``."""
    original: Callable[..., asyncio.Future[Any]] = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        start = time.perf_counter()
        fut = original(self, *args, **kwargs)
        fut.add_done_callback(lambda _: TIMES[label].append(time.perf_counter() - start))
        return fut

    setattr(cls, name, wrapper)


async def run(settings: Settings, messages: int, concurrency: int) -> tuple[float, float]:
    """Send ``messages`` ORU messages through ``HL7Ingest.handle``; (msgs/s, CPU µs/msg)."""
    raw = FIXTURE.read_bytes()
    control = raw.split(b"|")[9]
    queue = [
        raw.replace(control, f"S{i}-{uuid.uuid4().hex[:6]}".encode(), 1) for i in range(messages)
    ]
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        ingest = app.state.hl7

        async def sender() -> None:
            while queue:
                answer = await ingest.handle(queue.pop())
                assert answer and (b"MSA|AA|" in answer[0] or b"MSA|CA|" in answer[0])

        TIMES.clear()
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return messages / elapsed, cpu / messages * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--profile", default="production", choices=["production", "embedded"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    gc.set_threshold(50_000, 20, 100)  # as `gateway serve` does
    stages = (
        (Deduplicator, "begin", "dedup claim (Redis)"),
        (RecordPipeline, "store_group", "store: Kubo, key, ledger"),
        (KuboBlobStore, "put_many", "  Kubo write (per batch)"),
        (Ledger, "append", "  ledger append"),
        (Ledger, "_write_group", "    ledger batch write"),
        (JetStreamLog, "append", "    JetStream append (R3)"),
        (Ledger, "_sync_tree", "    stored tree fsync"),
    )
    for cls, name, label in stages:
        timed_async(cls, name, label)
    timed_sync(Signer, "sign", "    checkpoint signing")
    futures = (
        (Deduplicator, "record", "dedup acceptance (after the ACK)"),
        (ConversionWorkers, "begin", "conversion (worker processes)"),
    )
    for cls, name, label in futures:
        timed_future(cls, name, label)
    labels = [stages[0][2], futures[0][2], futures[1][2]]
    labels += [label for _, _, label in stages[1:]] + ["    checkpoint signing"]
    with services_from_env_or_start() as services, tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {"profile": args.profile}
        if args.profile == "production":
            extra.update(
                kubo_url=services.kubo_url,
                nats_urls=",".join(services.nats_urls),
                redis_url=services.redis_url,
                postgres_url=services.postgres_url,
                nats_stream=f"STAGES{uuid.uuid4().hex[:8].upper()}",
                redis_prefix=f"stages:{uuid.uuid4().hex[:8]}:",
            )
        settings = Settings(
            data_dir=Path(tmp) / "gw", mllp_enabled=False, institution="hosp-a", **extra
        )
        rate, cpu_us = asyncio.run(run(settings, args.messages, args.concurrency))
    lines = [
        f"{args.messages} ORU^R01 messages through `HL7Ingest.handle` from {args.concurrency} "
        f"concurrent tasks (no socket), {args.profile} profile: {rate:.0f} messages/s; the "
        f"gateway process spent {cpu_us:.0f} µs of CPU per message (the conversion workers' "
        "CPU not included).",
        "",
        "| stage (indented: part of the stage above) | calls | p50 | p90 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in labels:
        values = TIMES.get(label)
        if values:
            name = "&nbsp;" * (len(label) - len(label.lstrip())) * 2 + label.strip()
            lines.append(
                f"| {name} | {len(values)} | {pct(values, 0.5) * 1000:.1f} ms "
                f"| {pct(values, 0.9) * 1000:.1f} ms |"
            )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "hl7-stages",
            text,
            command=".venv/bin/python bench/bench_hl7_stages.py",
        )


if __name__ == "__main__":
    main()
