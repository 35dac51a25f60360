"""Erasure within the law on medical records: restrict at once, crypto-shred what the law allows.

A patient's erasure request (``POST /fhir/Patient/{id}/$erase``, :meth:`ErasureService.erase`)
does three things, in this order:

1. **Restriction**, at once and alliance-wide: one ``key`` leaf of action ``restrict`` per
   pseudonym of the patient. Every gateway's :class:`ErasureView` applies it from the ledger
   (so a restriction recorded at one member reaches every member with the log), drops the keys
   and caches it holds for the patient (the pipeline's cached KEKs, and every hook registered
   with :meth:`ErasureView.on_restrict`, e.g. a consent cache), and :class:`RestrictPolicy`
   (an :class:`gateway.access.AccessPolicy` wrapper) denies every other institution and keeps
   the custodian to reads for treatment (``TREAT``, ``ETREAT``) and legal purposes
   (``HLEGAL``). New records are still written (a patient may come back for treatment).
2. **Crypto-shredding** of what the law does not keep: records are classed
   (:class:`RetentionRules`: by resource type, and ``Encounter.class``: inpatient against
   outpatient), each class has a retention period (China: outpatient records 15 years,
   inpatient records 30 years, 《医疗机构病历管理规定》(2013) art. 29), counted from the
   record's clinical date (for a record of an inpatient encounter, the encounter's end, the
   discharge, when later), else from its latest version's ledger time. Records past retention,
   and records of a class that is not retained, have their wrapped data keys destroyed in the
   key store (:meth:`gateway.backends.protocols.KeyStore.destroy_wrapped_keys`); their blocks
   stay (a pack shared with other patients is untouched, and ``gateway verify --blobs`` still
   re-hashes them); an ``erasure`` leaf lists them (by the id they are sealed under). A
   container (the records of one HL7 message, one ciphertext under one data key) is shredded
   when every record in it is due. The patient's Patient resource is kept as long as any
   other record of theirs is.
3. **The patient's KEK** is destroyed (``key`` leaf of action ``erasure``) only once nothing of
   theirs is retained at this custodian. Records stored later get a new KEK.

What is retained is shredded later by the scheduled job (:meth:`ErasureService.run`: a
background task at ``erasure_interval_s``, woken at once when a restriction is applied, and
``gateway erasure run`` for cron). Each custodian shreds its own records: every member's job
does so for the patients the ledger says are restricted.

Never destroyed here: the audit key (access log, h3), the alliance consent key, the pseudonym
key; only patient pseudonyms' KEKs and the wrapped data keys of the patient's records.

Raises :class:`gateway.errors.BackendError`, :class:`ledger.errors.LedgerError`,
:class:`gateway.access.AccessDeniedError`, :class:`gateway.errors.NotFoundError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.access import (
    AccessDecision,
    AccessDeniedError,
    AccessPolicy,
    AccessRequest,
    PatientFilter,
    SearchFilter,
)
from gateway.backends.protocols import KeyStore
from gateway.consent import ALL, NOTHING
from gateway.errors import IntegrityError, KeyDestroyedError, KeyNotFoundError
from gateway.pipeline import RecordPipeline
from gateway.search.extract import clinical_date
from gateway.views import RecordAnchor, RecordIndex
from ledger.leaves import MAX_ERASED, decode_leaf, encode_leaf
from ledger.sequencer import Ledger

log = logging.getLogger("gateway.erasure")

#: What the custodian may still read of a restricted patient's records.
RESTRICTED_PURPOSES = frozenset({"TREAT", "ETREAT", "HLEGAL"})

#: The retention class of a patient's demographic record (the Patient resource): kept as long
#: as any other record of theirs is.
PATIENT_CLASS = "patient"
#: A class whose records are not retained: shredded as soon as the patient asks.
NOT_RETAINED = "not-retained"

# Canonical (sorted-key) JSON of the leaves this view reads starts with these: a cheap
# pre-filter, so that the view does not decode every record leaf again.
_RESTRICT_PREFIX = b'{"action":"restrict",'
_KEY_ERASURE_PREFIX = b'{"action":"erasure",'
_ERASURE_PREFIX = b'{"kind":"erasure",'


def _utc_now() -> datetime:
    return datetime.now(UTC)


def leaf_time(at: datetime) -> str:
    """An RFC 3339 UTC time as leaves carry it."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# the ledger-derived view


RestrictHook = Callable[[frozenset[str]], None]


class ErasureView:
    """Restrictions, shredded ciphertexts and destroyed KEKs, from the ledger (a listener, like
    :class:`gateway.views.RecordIndex`). ``restricted(p)`` covers every pseudonym linked to
    ``p``. Raises nothing."""

    def __init__(self, index: RecordIndex) -> None:
        self._index = index
        self._restricted: dict[str, int] = {}  # pseudonym -> leaf index of its restriction
        self._erased: dict[tuple[str, str], int] = {}  # (custodian, sealed id) -> leaf index
        self._kek_erased: dict[tuple[str, str], int] = {}  # (custodian, pseudonym) -> leaf
        self._hooks: list[RestrictHook] = []

    def on_restrict(self, hook: RestrictHook) -> None:
        """Call ``hook(pseudonyms)`` (every pseudonym of the patient) whenever a restriction is
        applied, on this gateway's own and on every other member's: drop what is cached for
        them. Hooks run inside the ledger's listener: they must be quick and must not raise."""
        self._hooks.append(hook)

    def on_batch(self, first: int, leaves: Sequence[bytes], seq: int) -> None:
        """Ledger listener: apply the ``restrict`` and ``erasure`` key leaves and the
        ``erasure`` leaves of a batch."""
        for offset, raw in enumerate(leaves):
            if raw.startswith(_RESTRICT_PREFIX):
                leaf = decode_leaf(raw)
                patient = str(leaf["patient"])
                self._restricted.setdefault(patient, first + offset)
                everyone = self._index.links.all_of(patient)
                for hook in self._hooks:
                    try:
                        hook(everyone)
                    except Exception:  # a cache hook must not stop the ledger's listeners
                        log.exception("restriction hook failed")
            elif raw.startswith(_ERASURE_PREFIX):
                leaf = decode_leaf(raw)
                source = str(leaf["source"])
                for rec in leaf["records"]:
                    self._erased[(source, str(rec))] = first + offset
            elif raw.startswith(_KEY_ERASURE_PREFIX):
                leaf = decode_leaf(raw)
                key = (str(leaf["source"]), str(leaf["patient"]))
                self._kek_erased[key] = first + offset

    def restricted(self, patient: str) -> bool:
        """Whether the patient (under any pseudonym linked to ``patient``) is restricted."""
        if not self._restricted:
            return False
        return any(p in self._restricted for p in self._index.links.all_of(patient))

    def pseudonym_restricted(self, pseudonym: str) -> bool:
        """Whether this very pseudonym has a ``restrict`` leaf (not only a linked one)."""
        return pseudonym in self._restricted

    def restricted_roots(self) -> frozenset[str]:
        """The pseudonyms named by ``restrict`` leaves."""
        return frozenset(self._restricted)

    def restriction_of(self, patient: str) -> int | None:
        """The leaf index of the patient's first restriction (any linked pseudonym), or None."""
        links = self._index.links.all_of(patient)
        found = [self._restricted[p] for p in links if p in self._restricted]
        return min(found) if found else None

    def restricted_pseudonyms(self) -> frozenset[str]:
        """Every pseudonym of every restricted patient (linked ones included)."""
        out: set[str] = set()
        for p in self._restricted:
            out |= self._index.links.all_of(p)
        return frozenset(out)

    def shredded(self, anchor: RecordAnchor) -> bool:
        """Whether this anchored version's ciphertext was crypto-shredded (its wrapped data key
        destroyed by its custodian, listed by an ``erasure`` leaf after it)."""
        if not self._erased:
            return False
        at = self._erased.get((anchor.source, anchor.sealed_as[0]))
        return at is not None and at > anchor.leaf_index

    def kek_erased_at(self, custodian: str, pseudonym: str) -> int:
        """The leaf index of the latest destruction of this pseudonym's KEK at ``custodian``
        (-1: never)."""
        return self._kek_erased.get((custodian, pseudonym), -1)


# --------------------------------------------------------------------------------------------
# the access policy wrapper


class RestrictPolicy:
    """An :class:`gateway.access.AccessPolicy` around another (``inner``, the consent policy):
    once a patient is restricted, a read by any institution other than the record's custodian
    is denied, and the custodian's own callers read only for ``TREAT``, ``ETREAT`` or
    ``HLEGAL``; writes, the patient's own token and internal calls are left to ``inner``.
    Raises AccessDeniedError."""

    def __init__(self, inner: AccessPolicy, view: ErasureView, *, institution: str) -> None:
        self.inner = inner
        self.view = view
        self.institution = institution

    @staticmethod
    def _restrictable(caller: object | None) -> bool:
        """Whether the restriction applies to this caller: an authenticated system caller (not
        an internal call, not the loopback sender, not the patient's own token)."""
        return caller is not None and getattr(caller, "kind", None) == "system"

    def _refusal(self, caller: object, custodian: str) -> str | None:
        if getattr(caller, "institution", None) != custodian:
            return "restricted: the patient asked for erasure; only the custodian reads"
        if getattr(caller, "purpose", None) not in RESTRICTED_PURPOSES:
            return "restricted: the custodian reads only for treatment or legal purposes"
        return None

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        """Deny a restricted patient's record as above; otherwise ask ``inner``."""
        writing = request.interaction in ("create", "update", "delete")
        if not writing and self._restrictable(caller) and self.view.restricted(request.patient):
            assert caller is not None
            reason = self._refusal(caller, request.custodian)
            if reason is not None:
                decision = AccessDecision(False, reason)
                raise AccessDeniedError(reason, interaction=request.interaction, decision=decision)
        return await self.inner.check(caller, request)

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        """``inner``'s filter, without the restricted patients' records for a caller the
        restriction refuses (this gateway's index holds this custodian's records)."""
        flt = await self.inner.search_filter(caller, patients)
        if not self._restrictable(caller):
            return flt
        assert caller is not None
        if self._refusal(caller, self.institution) is None:
            return flt
        hidden = self.view.restricted_pseudonyms()
        if not hidden:
            return flt
        return exclude_patients(flt, hidden)


def exclude_patients(flt: SearchFilter, hidden: frozenset[str]) -> SearchFilter:
    """``flt`` without any record of the pseudonyms ``hidden``: they are taken out of every
    term that names them and named by a term that matches nothing (so a term for "every other
    patient" no longer covers them). Raises nothing."""
    base = flt.consent if flt.consent is not None else (PatientFilter(None, ALL),)
    terms: list[PatientFilter] = []
    for term in base:
        if term.patients is None:
            terms.append(term)
            continue
        left = term.patients - hidden
        if left:
            terms.append(PatientFilter(left, term.where))
    terms.append(PatientFilter(hidden, NOTHING))
    patients = flt.patients - hidden if flt.patients is not None else None
    return SearchFilter(
        patients=patients,
        custodians=flt.custodians,
        types=flt.types,
        labels=flt.labels,
        consent=tuple(terms),
    )


# --------------------------------------------------------------------------------------------
# retention


@dataclass(frozen=True, slots=True)
class RetentionRules:
    """Which class a record belongs to and how long each class is kept. ``years``: class ->
    retention period in years (0: not retained); ``by_type``: resource type -> class (an
    Encounter is classed by ``Encounter.class`` first); ``inpatient_codes``: the
    ``Encounter.class`` codes (v3 ActCode) of inpatient stays, whose encounters and the
    records that reference them are class ``inpatient``; every other record is
    ``default_class``. Pure; raises nothing."""

    years: Mapping[str, int]
    by_type: Mapping[str, str] = field(default_factory=dict)
    default_class: str = "outpatient"
    inpatient_class: str = "inpatient"
    inpatient_codes: frozenset[str] = frozenset({"IMP", "ACUTE", "NONAC"})

    def _inpatient(self, encounter: Mapping[str, Any] | None) -> bool:
        cls = encounter.get("class") if encounter is not None else None
        return isinstance(cls, dict) and cls.get("code") in self.inpatient_codes

    def class_of(
        self, resource: Mapping[str, Any], encounters: Mapping[str, Mapping[str, Any]]
    ) -> str:
        """The retention class of ``resource``; ``encounters``: the patient's Encounters by
        id (for a record that references one)."""
        rtype = str(resource.get("resourceType"))
        if rtype == "Patient":
            return PATIENT_CLASS
        if rtype == "Encounter" and self._inpatient(resource):
            return self.inpatient_class
        if self._inpatient(self._encounter_of(resource, encounters)):
            return self.inpatient_class
        return self.by_type.get(rtype, self.default_class)

    @staticmethod
    def _encounter_of(
        resource: Mapping[str, Any], encounters: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, Any] | None:
        ref = resource.get("encounter")
        reference = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(reference, str) and reference.startswith("Encounter/"):
            return encounters.get(reference.split("/", 1)[1])
        return None

    def starts(
        self,
        resource: Mapping[str, Any],
        encounters: Mapping[str, Mapping[str, Any]],
        last_update: datetime,
    ) -> datetime:
        """When the record's retention period starts: its clinical date (the end of its
        clinical period when it has one), or for a record of an inpatient encounter that
        encounter's end when later; without a clinical date, ``last_update``."""
        found = [_end_of(dict(resource))]
        encounter = self._encounter_of(resource, encounters)
        if self._inpatient(encounter):
            assert encounter is not None
            found.append(_end_of(dict(encounter)))
        dates = [d for d in found if d is not None]
        return max(dates) if dates else last_update

    def until(
        self,
        resource: Mapping[str, Any],
        encounters: Mapping[str, Mapping[str, Any]],
        last_update: datetime,
    ) -> datetime | None:
        """When the record may be destroyed (None: at once, not retained). The Patient class
        is decided by the caller (kept while anything else is)."""
        years = self.years.get(self.class_of(resource, encounters))
        if years is None or years <= 0:
            return None
        start = self.starts(resource, encounters, last_update)
        try:
            return start.replace(year=start.year + years)
        except ValueError:  # 29 February
            return start.replace(year=start.year + years, day=28)


def _end_of(resource: dict[str, Any]) -> datetime | None:
    """The end (else the start) of a resource's clinical date, UTC, or None."""
    lo, hi = clinical_date(resource, UTC)
    micros = hi if hi is not None else lo
    if micros is None:
        return None
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------
# the service


@dataclass(frozen=True, slots=True)
class ShredResult:
    """What one shredding pass did for one patient at this custodian: the records (``Type/id``)
    shredded now, how many stay retained and until when the earliest of them is kept, and the
    ``key`` leaves of the KEKs destroyed (leaf index, pseudonym)."""

    shredded: tuple[str, ...] = ()
    retained: int = 0
    next_due: datetime | None = None
    keks_destroyed: tuple[tuple[int, str], ...] = ()
    erasure_leaves: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ErasureResult:
    """The answer to an erasure request: the restriction's leaf index (the first one, when
    the patient was restricted before) and what was shredded now."""

    restrict_leaf: int
    newly_restricted: bool
    shred: ShredResult


@dataclass(slots=True)
class _Record:
    """A logical record of the patient at this custodian, as the shredding pass sees it."""

    type: str
    id: str
    record: str
    versions: list[RecordAnchor]
    resource: dict[str, Any] | None = None
    until: datetime | None = None
    due: bool = False


class ErasureService:
    """Restricts and crypto-shreds (see the module docstring). One per gateway."""

    def __init__(
        self,
        *,
        view: ErasureView,
        index: RecordIndex,
        pipeline: RecordPipeline,
        keys: KeyStore,
        ledger: Ledger,
        institution: str,
        rules: RetentionRules,
        interval: float = 3600.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.view = view
        self.index = index
        self.pipeline = pipeline
        self.keys = keys
        self.ledger = ledger
        self.institution = institution
        self.rules = rules
        self.interval = interval
        self.clock = clock
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        view.on_restrict(self._restricted)

    def _restricted(self, pseudonyms: frozenset[str]) -> None:
        for p in pseudonyms:
            self.pipeline.forget_kek(p)
        self._wake.set()

    # ---- the request -----------------------------------------------------------------------

    async def erase(self, patient: str) -> ErasureResult:
        """Restrict the patient (every linked pseudonym not yet restricted gets a ``key``
        leaf of action ``restrict``), then shred what is due now. Raises BackendError,
        LedgerError."""
        async with self._lock:  # the job (woken by the restriction) waits for this pass
            pseudonyms = sorted(self.index.links.all_of(patient))
            now = leaf_time(self.clock())
            leaves = [
                encode_leaf(
                    "key",
                    {"action": "restrict", "patient": p, "source": self.institution, "time": now},
                )
                for p in pseudonyms
                if not self.view.pseudonym_restricted(p)
            ]
            if leaves:
                await self.ledger.append(leaves)
            at = self.view.restriction_of(patient)
            assert at is not None  # applied by the ledger's listeners before append returned
            shred = await self._shred(patient)
        return ErasureResult(at, bool(leaves), shred)

    # ---- the scheduled job -----------------------------------------------------------------

    async def run(self) -> list[ShredResult]:
        """One pass of the job: shred what is due for every restricted patient with records
        at this custodian. Raises BackendError, LedgerError."""
        done: set[str] = set()
        out = []
        for p in sorted(self.view.restricted_roots()):
            if p in done:
                continue
            everyone = self.index.links.all_of(p)
            done |= everyone
            result = await self.shred_patient(p)
            if result.shredded or result.keks_destroyed:
                out.append(result)
        return out

    def start(self) -> None:
        """Run the job in the background every ``interval`` seconds (and at once when a
        restriction is applied); ``interval`` 0 or less: not at all."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="erasure-job")

    async def stop(self) -> None:
        """Stop the background job. Raises nothing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run()
            except Exception:
                log.exception("erasure job failed (retried at the next interval)")

    # ---- shredding -------------------------------------------------------------------------

    def _records_here(self, patient: str) -> list[_Record]:
        out = []
        for latest in self.index.records_of(patient):
            if latest.source != self.institution:
                continue
            versions = self.index.history(latest.record)
            out.append(_Record(latest.resource_type, "", latest.record, versions))
        return out

    async def _read_latest(self, rec: _Record) -> None:
        """The newest readable, non-deleted version of the record (None when none is)."""
        for anchor in reversed(rec.versions):
            if anchor.deleted or self.view.shredded(anchor):
                continue
            try:
                rec.resource = await self.pipeline.read_anchor(anchor)
            except (KeyDestroyedError, KeyNotFoundError, IntegrityError):
                continue
            rec.id = str(rec.resource.get("id", ""))
            return

    async def shred_patient(self, patient: str) -> ShredResult:
        """Shred the patient's records at this custodian that are past retention or not
        retained; destroy the patient's KEKs here when nothing is retained. Only for a
        restricted patient (else nothing happens). Raises BackendError, LedgerError."""
        if not self.view.restricted(patient):
            return ShredResult()
        async with self._lock:
            return await self._shred(patient)

    async def _shred(self, patient: str) -> ShredResult:
        now = self.clock()
        records = self._records_here(patient)
        live = [r for r in records if not all(self.view.shredded(a) for a in r.versions)]
        for rec in live:
            await self._read_latest(rec)
        encounters = {
            r.id: r.resource for r in live if r.type == "Encounter" and r.resource is not None
        }
        for rec in live:
            last = _parse_time(rec.versions[-1].time)
            if rec.resource is None:
                rec.due = True  # nothing left to read (deleted): its versions go
                continue
            if rec.type == "Patient":
                continue
            rec.until = self.rules.until(rec.resource, encounters, last)
            rec.due = rec.until is None or rec.until <= now
        others_kept = any(not r.due for r in live if r.type != "Patient")
        for rec in live:
            if rec.type == "Patient":
                rec.due = not others_kept
        due = {r.record for r in live if r.due}
        # Ciphertexts (by the id they are sealed under) and the records each carries.
        carries: dict[str, set[str]] = {}
        anchors_of: dict[str, list[RecordAnchor]] = {}
        for rec in live:
            for anchor in rec.versions:
                if self.view.shredded(anchor):
                    continue
                sealed = anchor.sealed_as[0]
                carries.setdefault(sealed, set()).add(rec.record)
                anchors_of.setdefault(sealed, []).append(anchor)
        shred = sorted(s for s, recs in carries.items() if recs <= due)
        going = set(shred)
        # A record is gone when every ciphertext of it left is; one due that shares a
        # container with a record still retained stays (and is shredded with it later).
        gone = [
            r
            for r in live
            if all(a.sealed_as[0] in going for a in r.versions if not self.view.shredded(a))
        ]
        leaves: list[int] = []
        if shred:
            digests = sorted({a.sha256 for s in shred for a in anchors_of[s]})
            await self.keys.destroy_wrapped_keys(digests)
            leaves = await self._anchor_erasure(shred, anchors_of, now)
            log.info(
                "records crypto-shredded",
                extra={"ciphertexts": len(digests), "records": len(gone), "leaves": len(leaves)},
            )
        gone_ids = {r.record for r in gone}
        kept = [r for r in live if r.record not in gone_ids]
        next_due = min((r.until for r in kept if r.until is not None), default=None)
        keks: tuple[tuple[int, str], ...] = ()
        if not kept:
            keks = await self._destroy_keks(patient, now)
        return ShredResult(
            shredded=tuple(sorted(f"{r.type}/{r.id}" if r.id else r.record for r in gone)),
            retained=len(kept),
            next_due=next_due,
            keks_destroyed=keks,
            erasure_leaves=tuple(leaves),
        )

    async def _anchor_erasure(
        self, shred: Sequence[str], anchors_of: Mapping[str, list[RecordAnchor]], now: datetime
    ) -> list[int]:
        """``erasure`` leaves listing the shredded ciphertexts' ids, per pseudonym they are
        filed under, at most MAX_ERASED each."""
        by_patient: dict[str, list[str]] = {}
        for sealed in shred:
            for p in dict.fromkeys(a.patient for a in anchors_of[sealed]):
                by_patient.setdefault(p, []).append(sealed)
        leaves = []
        for p, ids in sorted(by_patient.items()):
            for n in range(0, len(ids), MAX_ERASED):
                leaves.append(
                    encode_leaf(
                        "erasure",
                        {
                            "patient": p,
                            "records": ids[n : n + MAX_ERASED],
                            "source": self.institution,
                            "time": leaf_time(now),
                        },
                    )
                )
        results = await self.ledger.append(leaves)
        return [r.index for r in results]

    async def _destroy_keks(self, patient: str, now: datetime) -> tuple[tuple[int, str], ...]:
        """Destroy the KEK of every pseudonym of the patient that sealed something here since
        its last destruction; anchor a ``key`` leaf of action ``erasure`` for each."""
        out = []
        for p in sorted(self.index.links.all_of(patient)):
            last = max(
                (
                    a.leaf_index
                    for rec in self.index.records_of(p)
                    for a in self.index.history(rec.record)
                    if a.source == self.institution and a.patient == p
                ),
                default=-1,
            )
            if last < 0 or last < self.view.kek_erased_at(self.institution, p):
                continue
            try:
                kid = await self.keys.destroy_kek(p)
            except KeyNotFoundError:
                continue
            self.pipeline.forget_kek(p)
            (result,) = await self.ledger.append(
                [
                    encode_leaf(
                        "key",
                        {
                            "action": "erasure",
                            "key_id": kid,
                            "patient": p,
                            "source": self.institution,
                            "time": leaf_time(now),
                        },
                    )
                ]
            )
            out.append((result.index, p))
            log.info("patient key destroyed", extra={"leaf": result.index})
        return tuple(out)


def retention_rules(
    years: Mapping[str, int],
    by_type: Mapping[str, str],
    default_class: str,
    inpatient_codes: Iterable[str],
) -> RetentionRules:
    """Rules from settings values (see :class:`gateway.config.Settings`). Raises nothing."""
    return RetentionRules(
        years=dict(years),
        by_type=dict(by_type),
        default_class=default_class,
        inpatient_codes=frozenset(inpatient_codes),
    )
