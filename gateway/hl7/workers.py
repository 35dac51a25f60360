"""Conversion workers: HL7 v2 parse and conversion to FHIR in other processes.

Converting one message is pure CPU work (about as much as everything else the gateway does for
it together), and one Python process runs on one core. So the gateway hands the raw messages of
concurrent senders, grouped, to a pool of worker processes (``hl7_convert_workers``; 0 converts
in the gateway's own process) and gets back, per message, either everything the record pipeline
stores for it, ready to seal, or the conversion's error with everything an acknowledgement
needs. Ready to seal means: the converted resources plus the original message as a ``Binary``
and the ``Provenance`` linking them (so nothing that was received is lost), each with its
ledger record id and serialised as JSON without ``meta`` (the pipeline sets ``meta`` when it
assigns versions), the patient's pseudonym and the id of the container they are stored in.
The worker runs the same pure ``mappings`` function the tests check; the raw message goes in,
and FHIR JSON, pseudonyms and record ids (HMACs under the gateway's pseudonym key, which the
worker is given at start) or an error description come out.

Each message goes with its sender's policy (:class:`MessagePolicy`, from the sender profile):
whether a value that does not fit its type is rejected rather than kept as text with a warning,
and whether a patient without the alliance's master identifier is rejected (AE, 101 at PID-3),
and whether a local clinical code the unified dictionary cannot map is rejected (AE, 103 at
its segment and field) or stored as sent, its resources tagged unmapped and the code reported
for the curation queue (``Converted.unmapped``).

With the search index on, the worker also extracts each resource's index rows
(:class:`gateway.search.extract.IndexRows`) beside its JSON, so the gateway's own process,
which is the bottleneck, only adds record versions and writes them (no JSON parsed again).

A worker that dies takes its batch with it: the batch's messages are answered AE 207 (nothing
was stored; the senders retry) and the pool is replaced. A worker whose gateway process died
exits on its own. Raises nothing to callers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from gateway.crypto import record_id
from gateway.identity import fhir_identifiers, institution_pseudonym, patient_identity
from gateway.pipeline import PreparedResource
from gateway.search.extract import IndexRows, index_rows
from ledger.errors import GroupCommitStoppedError
from ledger.groupcommit import GroupCommitter
from mappings.dictionary_apply import UNMAPPED_TAG, labels
from mappings.errors import ConversionWarning, MappingError
from mappings.terminology import Terminology
from mappings.v2.common import ConversionOptions, ConversionResult, stable_id
from mappings.v2.convert import convert
from mappings.v2.parse import ParsedMessage, parse

log = logging.getLogger("gateway.hl7")


HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"


class MessagePolicy(NamedTuple):
    """A sender's policy for one message (see ``gateway.config.SenderProfile``):
    ``reject_unmapped`` answers a local clinical code the dictionary cannot map with AE 103
    (``unmapped_codes = "reject"``) instead of storing it as sent, tagged and queued."""

    strict_types: bool = False
    reject_provisional: bool = False
    reject_unmapped: bool = False


DEFAULT_POLICY = MessagePolicy()


@dataclass(frozen=True, slots=True)
class Converted:
    """Everything one message is stored as: its entries (distinct type/id pairs, in order),
    the patient's pseudonym and the id of the container (collection Bundle) they go in; the
    conversion's warnings (values kept as text); whether the pseudonym is provisional (no
    master identifier); and ``aliases``, the pseudonyms the patient is also known by (its
    other identifiers, and for a merge (A40) the prior patient's), for ``link`` leaves.

    ``index``: each entry's search index rows (:class:`IndexRows`, in the order of
    ``entries``; empty when the workers do not index). ``unmapped``: the (system, code) of
    each local clinical code the dictionary did not map (the entries carrying one are tagged
    unmapped), for the curation queue under ``source``, the sending facility."""

    entries: tuple[PreparedResource, ...]
    patient: str
    container_id: str
    warnings: tuple[ConversionWarning, ...] = ()
    provisional: bool = False
    aliases: tuple[str, ...] = ()
    index: tuple[IndexRows, ...] = ()
    unmapped: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def resources(self) -> list[dict[str, Any]]:
        """The entries' resources as dicts (without ``meta``)."""
        return [orjson.loads(e.body) for e in self.entries]


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
_KEY = b""
_INDEX = False


def _init_worker(
    options: ConversionOptions, pseudonym_key: bytes, parent: int, index: bool
) -> None:
    global _OPTIONS, _KEY, _INDEX
    _OPTIONS, _KEY, _INDEX = options, pseudonym_key, index
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker once the gateway process that started it is gone. A pool worker
    holds both ends of its task queue's pipe, so a gateway that was killed (SIGKILL, the OOM
    killer) never closes it; without this the worker would wait on it for ever, and every
    restart would leave one more behind. Runs in a daemon thread; never returns otherwise."""
    while os.getppid() == parent:
        time.sleep(WATCH_PARENT_S)
    os._exit(0)


#: How often a worker checks that the gateway process is still its parent.
WATCH_PARENT_S = 0.5

#: Messages converted as one batch at most, split over the workers. Messages that arrive
#: together (from many senders at once) then stay together downstream: one blob-store write
#: and one ledger batch for all of them, far cheaper per message than several small batches.
CONVERT_BATCH_MAX = 32


_UNMAPPED_META = b'"tag":' + orjson.dumps([UNMAPPED_TAG])


@lru_cache(maxsize=8)
def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _carries(value: Any, codes: frozenset[tuple[str, str]]) -> bool:
    """True when a coding (system, code) of ``codes`` occurs anywhere in ``value``."""
    if isinstance(value, dict):
        system, code = value.get("system"), value.get("code")
        if isinstance(system, str) and isinstance(code, str) and (system, code) in codes:
            return True
        return any(_carries(v, codes) for v in value.values() if isinstance(v, dict | list))
    if isinstance(value, list):
        return any(_carries(v, codes) for v in value if isinstance(v, dict | list))
    return False


def prepare(
    raw: bytes,
    msg: ParsedMessage,
    result: ConversionResult,
    options: ConversionOptions,
    pseudonym_key: bytes,
    *,
    index: bool = False,
) -> Converted:
    """What a converted message is stored as: its resources, the original message as a Binary
    and the Provenance linking them, under the patient's pseudonym; the resources carrying a
    code the dictionary did not map (``result.unmapped``) tagged UNMAPPED_TAG; with ``index``,
    each resource's search index rows. Pure."""
    resources = result.resources
    facility = msg.sending_facility_id or "unknown"
    patient_res = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    provisional = False
    aliases: list[str] = []
    if patient_res is not None or result.patient_identifiers:
        identifiers = (
            fhir_identifiers(patient_res)
            if patient_res is not None
            else list(result.patient_identifiers)
        )
        identity = patient_identity(
            pseudonym_key,
            identifiers,
            master_system=options.master_id_system,
            facility=facility,
            master=result.master_identifier,
        )
        patient, provisional = identity.pseudonym, identity.provisional
        aliases += identity.aliases
    else:
        patient = institution_pseudonym(pseudonym_key, options.institution)
    if result.prior_identifiers:
        prior = patient_identity(
            pseudonym_key,
            result.prior_identifiers,
            master_system=options.master_id_system,
            facility=facility,
        )
        aliases += [p for p in (prior.pseudonym, *prior.aliases) if p != patient]
    binary_id = stable_id(options, "Binary", facility, msg.control_id)
    binary = {
        "resourceType": "Binary",
        "id": binary_id,
        "contentType": HL7_MEDIA_TYPE,
        "data": base64.b64encode(raw).decode("ascii"),
    }
    org = next((r for r in resources if r.get("resourceType") == "Organization"), None)
    who = {"reference": f"Organization/{org['id']}"} if org else {"display": facility}
    provenance = {
        "resourceType": "Provenance",
        "id": stable_id(options, "Provenance", facility, msg.control_id),
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in resources]
        or [{"reference": f"Binary/{binary_id}"}],
        "recorded": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                }
            ]
        },
        "agent": [{"who": who}],
        "entity": [{"role": "source", "what": {"reference": f"Binary/{binary_id}"}}],
    }
    # A resource produced twice (the same Specimen under two OBR) is stored once, as its
    # last form, exactly as two consecutive stores would have left it. The pipeline sets
    # ``meta``; the converters never do (a test checks every fixture).
    unique = {(r["resourceType"], r["id"]): r for r in (*resources, binary, provenance)}
    if any("meta" in r for r in unique.values()):
        raise ValueError("a converted resource carries meta")
    term = options.terminology
    unmapped = tuple(dict.fromkeys((u.system, u.code) for u in result.unmapped))
    codes = frozenset(unmapped)
    entries: list[PreparedResource] = []
    rows: list[IndexRows] = []
    tz = _zone(options.default_tz) if index else UTC
    for (rtype, rid), r in unique.items():
        tagged = bool(codes) and _carries(r, codes)
        rec = record_id(pseudonym_key, options.institution, rtype, rid)
        body = orjson.dumps(r)
        security = _security(r, body, term)
        members = [b'"security":' + security] if security else []
        if tagged:
            members.append(_UNMAPPED_META)
        entries.append(PreparedResource(rtype, rid, rec, body, b",".join(members)))
        if index:
            # Indexed as stored: with its labels and tag (without lastUpdated: the store sets it).
            meta: dict[str, Any] = {}
            if security:
                meta["security"] = orjson.loads(security)
            if tagged:
                meta["tag"] = [UNMAPPED_TAG]
            as_stored = {**r, "meta": meta} if meta else r
            rows.append(index_rows(as_stored, key=pseudonym_key, tz=tz))
    return Converted(
        tuple(entries),
        patient,
        stable_id(options, "Bundle", facility, msg.control_id),
        warnings=tuple(result.warnings),
        provisional=provisional,
        aliases=tuple(dict.fromkeys(aliases)),
        index=tuple(rows),
        unmapped=unmapped,
        source=facility,
    )


#: A JSON string member ``"code":"..."`` as orjson writes it (escapes kept).
_CODE_MEMBER = re.compile(rb'"code":"((?:[^"\\]|\\.)*)"')


def _security(resource: dict[str, Any], body: bytes, term: Terminology) -> bytes:
    """The security labels the dictionary gives a resource (``labels(resource)``), as the
    JSON array its ``meta.security`` is sealed with; ``b""`` for none. ``body`` is the
    resource's JSON: when none of its ``code`` strings is in a labelling value set under any
    system (:meth:`Terminology.may_label`, memoised), the resource is not walked at all, which
    keeps the common message (no sensitive code) cheap. The original message (Binary) is not
    looked into: its codes are those of the resources converted from it."""
    if resource.get("resourceType") == "Binary":
        return b""
    if not any(
        b"\\" in code or term.may_label(code.decode("utf-8", "replace"))
        for code in _CODE_MEMBER.findall(body)
    ):
        return b""
    found = labels(resource, term)
    return orjson.dumps(found) if found else b""


def convert_one(
    raw: bytes,
    options: ConversionOptions,
    pseudonym_key: bytes,
    policy: MessagePolicy = DEFAULT_POLICY,
    *,
    index: bool = False,
) -> Outcome:
    """Parse, convert and prepare one message for storage under the sender's ``policy``
    (with ``index``, its search index rows too). Pure; never raises."""
    try:
        msg = parse(raw)
        result = convert(
            msg,
            options=options,
            strict_types=policy.strict_types,
            strict_codes=policy.reject_unmapped,
        )
        converted = prepare(raw, msg, result, options, pseudonym_key, index=index)
        if policy.reject_provisional and converted.provisional:
            # Table 0357 code 101 (required field missing): the sender's profile makes the
            # master identifier a required repetition of PID-3. Not 204 (unknown key
            # identifier: a key the receiver does not know) nor 207 (our own failure).
            return Failed(
                ack_code="AE",
                hl7_code="101",
                text="patient has no master identifier (required by the sender policy)",
                segment="PID",
                segment_index=1,
                field=3,
            )
        return converted
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


def convert_batch(items: Sequence[tuple[bytes, MessagePolicy]]) -> list[Outcome]:
    """Worker entry point: convert each (message, policy) with the options given at start-up."""
    assert _OPTIONS is not None, "conversion worker not initialised"
    return [convert_one(raw, _OPTIONS, _KEY, policy, index=_INDEX) for raw, policy in items]


class ConversionWorkers:
    """Converts messages in ``workers`` processes (0: in this process), grouping concurrent
    messages into one task; with ``index``, the workers also compute each resource's search
    index rows. :meth:`start` inside the running loop, :meth:`stop` after."""

    def __init__(
        self,
        options: ConversionOptions,
        *,
        pseudonym_key: bytes,
        workers: int,
        index: bool = False,
    ) -> None:
        self.options = options
        self._key = pseudonym_key
        self.workers = workers
        self.index = index
        self._pool: ProcessPoolExecutor | None = None
        self._group: GroupCommitter[tuple[bytes, MessagePolicy], Outcome] = GroupCommitter(
            self._run_batch,
            name="hl7-convert",
            max_items=CONVERT_BATCH_MAX,
            max_delay=0.0005,
            # The next batch is handed over while the workers convert this one.
            concurrency=2,
        )

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the gateway process runs threads (fork would copy their locks).
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.options, self._key, os.getpid(), self.index),
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

    async def convert(self, raw: bytes, policy: MessagePolicy = DEFAULT_POLICY) -> Outcome:
        """The conversion of one message. Never raises (a stopped converter: Crashed)."""
        return await self.begin(raw, policy)

    def begin(self, raw: bytes, policy: MessagePolicy = DEFAULT_POLICY) -> asyncio.Future[Outcome]:
        """Start converting one message under its sender's ``policy``: a future that never
        fails (a stopped converter: Crashed), so that the caller can do something else
        meanwhile without a task. Cancelling it drops the result, not the conversion."""
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        try:
            batch = self._group.enqueue([(raw, policy)])
        except GroupCommitStoppedError as exc:
            outcome.set_result(Crashed(type(exc).__name__))
            return outcome

        def done(batch: asyncio.Future[list[Outcome]]) -> None:
            if outcome.done():
                return
            if batch.cancelled():
                outcome.set_result(Crashed("CancelledError"))
            elif (exc := batch.exception()) is not None:
                outcome.set_result(Crashed(type(exc).__name__))
            else:
                outcome.set_result(batch.result()[0])

        batch.add_done_callback(done)
        return outcome

    async def _run_batch(self, raws: list[tuple[bytes, MessagePolicy]]) -> list[Outcome]:
        """Convert a batch, split evenly over the workers, and return it whole: the batch
        stays one batch downstream (one blob-store write, one ledger batch), which costs far
        less per message than the same messages in several smaller batches."""
        if self._pool is None:
            return [
                convert_one(raw, self.options, self._key, policy, index=self.index)
                for raw, policy in raws
            ]
        pool = self._pool
        loop = asyncio.get_running_loop()
        size = -(-len(raws) // self.workers)
        futures: list[asyncio.Future[list[Outcome]]] = []
        try:
            for i in range(0, len(raws), size):
                futures.append(loop.run_in_executor(pool, convert_batch, raws[i : i + size]))
        except BrokenProcessPool:  # already known to be broken: submitting raises at once
            for fut in futures:
                fut.cancel()
            return self._replace(pool, len(raws))
        parts = await asyncio.gather(*futures, return_exceptions=True)
        outcomes: list[Outcome] = []
        for part in parts:
            if isinstance(part, BrokenProcessPool):
                return self._replace(pool, len(raws))
            if isinstance(part, BaseException):
                raise part
            outcomes += part
        return outcomes

    def _replace(self, pool: ProcessPoolExecutor, count: int) -> list[Outcome]:
        """A worker of ``pool`` died: replace the pool (once); ``count`` Crashed outcomes."""
        log.error("hl7 conversion worker died: batch answered AE, pool replaced")
        if self._pool is pool:
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return [Crashed("BrokenProcessPool")] * count
