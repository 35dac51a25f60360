"""Conversion workers: HL7 v2 parse and conversion to FHIR in other processes.

Converting one message is pure CPU work (about as much as everything else the gateway does for
it together), and one Python process runs on one core. So the gateway hands the raw messages of
concurrent senders, grouped, to a pool of worker processes (``hl7_convert_workers``; 0 converts
in the gateway's own process) and gets back, per message, either the resources as JSON bytes
or the conversion's error with everything an acknowledgement needs. The worker's code is the
same pure ``mappings`` function the tests check; nothing but the raw message goes in and
nothing but FHIR JSON or an error description comes out.

A worker that dies takes its batch with it: the batch's messages are answered AE 207 (nothing
was stored; the senders retry) and the pool is replaced. Raises nothing to callers.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import orjson

from ledger.groupcommit import GroupCommitter
from mappings.errors import MappingError
from mappings.v2.common import ConversionOptions
from mappings.v2.convert import convert
from mappings.v2.parse import parse

log = logging.getLogger("gateway.hl7")


@dataclass(frozen=True, slots=True)
class Converted:
    """The resources produced from one message, and what pseudonymisation needs."""

    resources: bytes  # JSON array of the resources
    patient_identifiers: tuple[tuple[str, str], ...]
    master_identifier: tuple[str, str] | None

    def resource_list(self) -> list[dict[str, Any]]:
        """The resources as dicts."""
        out: list[dict[str, Any]] = orjson.loads(self.resources)
        return out


@dataclass(frozen=True, slots=True)
class Failed:
    """The message cannot be converted: a MappingError, described (usable as an ACK's ERR)."""

    ack_code: str
    hl7_code: str
    text: str
    segment: str | None = None
    segment_index: int | None = None
    field: int | None = None
    component: int | None = None
    repetition: int | None = None


@dataclass(frozen=True, slots=True)
class Crashed:
    """The conversion failed for a reason of its own (a defect), or its worker died."""

    error: str  # the exception's type name; never message content


Outcome = Converted | Failed | Crashed

_OPTIONS: ConversionOptions | None = None


def _init_worker(options: ConversionOptions) -> None:
    global _OPTIONS
    _OPTIONS = options


def convert_one(raw: bytes, options: ConversionOptions) -> Outcome:
    """Parse and convert one message. Pure; never raises."""
    try:
        result = convert(parse(raw), options=options)
        return Converted(
            orjson.dumps(result.resources),
            tuple(result.patient_identifiers),
            result.master_identifier,
        )
    except MappingError as exc:
        return Failed(
            ack_code=exc.ack_code,
            hl7_code=exc.hl7_code,
            text=str(exc),
            segment=exc.segment,
            segment_index=exc.segment_index,
            field=exc.field,
            component=exc.component,
            repetition=exc.repetition,
        )
    except Exception as exc:  # a defect of the converter on odd input
        return Crashed(type(exc).__name__)


def convert_batch(raws: Sequence[bytes]) -> list[Outcome]:
    """Worker entry point: convert each message with the options given at start-up."""
    assert _OPTIONS is not None, "conversion worker not initialised"
    return [convert_one(raw, _OPTIONS) for raw in raws]


class ConversionWorkers:
    """Converts messages in ``workers`` processes (0: in this process), grouping concurrent
    messages into one task. :meth:`start` inside the running loop, :meth:`stop` after."""

    def __init__(self, options: ConversionOptions, *, workers: int) -> None:
        self.options = options
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._group: GroupCommitter[bytes, Outcome] = GroupCommitter(
            self._run_batch,
            name="hl7-convert",
            max_items=16,
            max_delay=0.0005,
            # One batch more than workers: the next is queued while a worker converts.
            concurrency=workers + 1,
        )

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the gateway process runs threads (fork would copy their locks).
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.options,),
        )

    async def start(self) -> None:
        """Start the pool and wait until its workers answer."""
        if self.workers > 0:
            self._pool = self._new_pool()
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(self._pool, convert_batch, []) for _ in range(self.workers))
            )
        self._group.start()

    async def stop(self) -> None:
        """Stop grouping and shut the pool down."""
        await self._group.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def convert(self, raw: bytes) -> Outcome:
        """The conversion of one message. Never raises (a stopped converter: Crashed)."""
        try:
            (outcome,) = await self._group.submit([raw])
        except RuntimeError as exc:
            return Crashed(type(exc).__name__)
        return outcome

    async def _run_batch(self, raws: list[bytes]) -> list[Outcome]:
        if self._pool is None:
            return [convert_one(raw, self.options) for raw in raws]
        pool = self._pool
        try:
            outcomes: list[Outcome] = await asyncio.get_running_loop().run_in_executor(
                pool, convert_batch, raws
            )
            return outcomes
        except BrokenProcessPool:
            log.error("hl7 conversion worker died: batch answered AE, pool replaced")
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            return [Crashed("BrokenProcessPool")] * len(raws)
