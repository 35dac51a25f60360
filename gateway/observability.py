"""Structured JSON logs and Prometheus metrics.

Logs carry request ids, message control ids, CIDs and leaf indexes, never patient data and never
secrets: callers pass only such fields in ``extra``. Metrics live in a per-gateway registry so
that several gateways (in tests) do not collide.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """Send every log line as JSON to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "nats"):
        logging.getLogger(noisy).setLevel("WARNING")


class Metrics:
    """The gateway's Prometheus metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.records_stored = Counter(
            "gateway_records_stored_total", "Records stored and anchored", ["type"], registry=r
        )
        self.ledger_size = Gauge("gateway_ledger_size", "Leaves in the ledger", registry=r)
        self.ledger_batch = Histogram(
            "gateway_ledger_batch_leaves",
            "Leaves per ledger batch",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        )
        self.blob_batch = Histogram(
            "gateway_blob_batch_blocks",
            "Blocks per blob-store call",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
        )
        self._stored_by_type: dict[str, Any] = {}
        self.mllp_messages = Counter(
            "gateway_mllp_messages_total", "HL7 v2 messages by ACK code", ["ack"], registry=r
        )
        self.access_decisions = Counter(
            "gateway_access_decisions_total", "Read decisions", ["decision"], registry=r
        )
        self.break_glass = Counter(
            "gateway_break_glass_total",
            "Break-glass accesses logged (queued for the privacy officer's review), by the "
            "caller's institution",
            ["institution"],
            registry=r,
        )

    def count_stored(self, resource_types: Iterable[str]) -> None:
        """Count stored records by resource type (the labelled child kept per type: looking
        it up costs more than the increment, and stores come hundreds a second)."""
        for rtype in resource_types:
            child = self._stored_by_type.get(rtype)
            if child is None:
                child = self._stored_by_type[rtype] = self.records_stored.labels(rtype)
            child.inc()
