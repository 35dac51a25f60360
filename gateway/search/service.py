"""The search service: parses FHIR search parameters, asks the access seam for a filter, queries
the index at a snapshot, reads each match through the record service, and builds ``searchset``
Bundles with keyset paging (:mod:`gateway.search.cursor`).

It also keeps the index up to date: :meth:`SearchService.start` registers it as an indexer of
the record service (every stored version is indexed before the store returns), and
:meth:`SearchService.reindex` rebuilds it from the ledger and the blobs.

Raises :class:`gateway.errors.InvalidInputError` (400: unknown or malformed parameters, bad
cursors), :class:`gateway.errors.NotFoundError`, :class:`gateway.errors.BackendError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.access import (
    AccessDecision,
    AccessDeniedError,
    AccessEvent,
    AccessPolicy,
    Interaction,
    SearchFilter,
    caller_key,
)
from gateway.consent import DateIn, Filter, In, Not
from gateway.crypto import pseudonym
from gateway.errors import (
    GoneError,
    IntegrityError,
    InvalidInputError,
    KeyDestroyedError,
    NotFoundError,
)
from gateway.pipeline import StoredRecord
from gateway.records import RecordService, logged
from gateway.search.cursor import cursor_key, decode_cursor, encode_cursor
from gateway.search.extract import (
    ANY_SYSTEM,
    IndexEntry,
    IndexRows,
    entry_of_rows,
    extract,
    last_updated_of,
    reference_of,
)
from gateway.search.index import (
    Clause,
    Dates,
    Hit,
    Ids,
    Missing,
    Patients,
    Query,
    Refs,
    SearchIndex,
    Sort,
    Token,
)
from gateway.search.params import (
    DEFAULT_COUNT,
    MAX_COUNT,
    PARAMS,
    PATIENT_PARAMS,
    date_range,
    split_prefix,
    split_values,
    token,
)
from gateway.views import RecordAnchor

log = logging.getLogger("gateway.search")

Params = Sequence[tuple[str, str]]

#: Parameters that shape the result rather than select records. ``_total``, ``_totalMethod``
#: (sent by some clients, e.g. fhirpy's ``count()``), ``_format`` and ``_pretty`` are accepted
#: and ignored: the total is always exact and the format always JSON.
CONTROL = frozenset(
    {
        "_count",
        "_sort",
        "_summary",
        "_include",
        "_revinclude",
        "_total",
        "_totalMethod",
        "_format",
        "_pretty",
    }
)
_SORTS: dict[str, Sort] = {
    "date": "date",
    "-date": "-date",
    "_lastUpdated": "_lastUpdated",
    "-_lastUpdated": "-_lastUpdated",
}
#: At most this many resources are added to one page by ``_include`` and ``_revinclude``.
MAX_INCLUDED = 1000
EVERYTHING = "$everything"


@dataclass(slots=True)
class ParsedSearch:
    """A search as the index runs it, plus what shapes the Bundle."""

    clauses: list[Clause] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    sort: Sort = ""
    summary_count: bool = False
    includes: list[tuple[str, str]] = field(default_factory=list)  # (source type, param)
    revincludes: list[tuple[str, str]] = field(default_factory=list)  # (source type, param)


def _tz(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


class SearchService:
    """FHIR search over this gateway's records (see the module docstring)."""

    def __init__(
        self,
        *,
        records: RecordService,
        index: SearchIndex,
        policy: AccessPolicy,
        pseudonym_key: bytes,
        institution: str,
        default_tz: str = "UTC",
    ) -> None:
        self.records = records
        self.index = index
        self.policy = policy
        self._pkey = pseudonym_key
        self._ckey = cursor_key(pseudonym_key)
        self.institution = institution
        self.tz = _tz(default_tz)
        self._started = False

    # ---- lifecycle and indexing ------------------------------------------------------------

    async def start(self) -> None:
        """Open the index, index every store from now on, and catch up with what the ledger
        holds and the index does not (:meth:`catch_up`). Call after the gateway started (its
        ledger replayed). Raises BackendError, IntegrityError."""
        await self.index.open()
        if not self._started:
            self.records.add_indexer(self.index_records, rows=self.index_rows)
            self.records.meta_source = self.index.meta_of
            self._started = True
        await self.catch_up()

    async def catch_up(self) -> int:
        """Index the versions of this custodian's records that the ledger has and the index
        lacks (a crash between a store and its indexing; an index file lost or restored from a
        backup), read from the blobs. Returns how many (an unreadable one is logged and left
        out). Raises BackendError."""
        have = await self.index.indexed(self.institution)
        missing = [
            a
            for a in self.records.index.all_versions()
            if a.source == self.institution and (a.record, a.version) not in have
        ]
        done = 0
        for start in range(0, len(missing), 200):
            batch = []
            for anchor in missing[start : start + 200]:
                resource = await self._readable(anchor)
                if resource is not None:
                    batch.append(self._entry_of_anchor(anchor, resource))
            await self.index.add(batch)
            done += len(batch)
        if missing:
            log.info("search index caught up", extra={"versions": done})
        return done

    async def _readable(self, anchor: RecordAnchor) -> dict[str, Any] | None:
        """The resource of an anchor, or None (logged, by record id and CID only) when its
        ciphertext fails its check or its key was destroyed: such a record cannot be read, so
        it is not searchable either, and the rest of the index is still built."""
        try:
            return await self.records.pipeline.read_anchor(anchor)
        except (IntegrityError, KeyDestroyedError) as exc:
            log.warning(
                "record not indexed: unreadable",
                extra={
                    "record": anchor.record,
                    "version": anchor.version,
                    "cid": anchor.cid,
                    "error": type(exc).__name__,
                },
            )
            return None

    def _entry_of_anchor(self, anchor: RecordAnchor, resource: dict[str, Any]) -> IndexEntry:
        if anchor.deleted:
            return self._tombstone(anchor.record, anchor.version)
        return extract(
            resource,
            custodian=self.institution,
            record=anchor.record,
            version=anchor.version,
            patient=anchor.patient,
            key=self._pkey,
            tz=self.tz,
        )

    async def stop(self) -> None:
        """Index what the record service still has queued, then close the index. Raises
        nothing."""
        await self.records.drain()
        await self.index.close()

    def entry_of(self, stored: StoredRecord, resource: dict[str, Any], patient: str) -> IndexEntry:
        """The index entry of a stored version. Raises nothing."""
        return extract(
            resource,
            custodian=self.institution,
            record=stored.record,
            version=stored.version,
            patient=patient,
            key=self._pkey,
            tz=self.tz,
        )

    async def index_records(self, items: Sequence[tuple[StoredRecord, dict[str, Any]]]) -> None:
        """Indexer (see :data:`gateway.records.Indexer`): index stored versions. Raises
        BackendError."""
        entries = []
        for stored, resource in items:
            anchor = self.records.index.version(stored.record, stored.version)
            if anchor is not None and anchor.deleted:
                entries.append(self._tombstone(stored.record, stored.version))
                continue
            patient = anchor.patient if anchor is not None else self.records.no_patient
            entries.append(self.entry_of(stored, resource, patient))
        await self.index.add(entries)

    async def index_rows(self, items: Sequence[tuple[StoredRecord, str, IndexRows]]) -> None:
        """Rows indexer (see :data:`gateway.records.RowsIndexer`): index stored versions whose
        rows were extracted where they were prepared (the HL7 conversion workers); only the
        record id, version, lastUpdated and patient are added here. Raises BackendError."""
        updated: dict[str, int] = {}  # the versions of one store share one lastUpdated
        entries = []
        for stored, patient, rows in items:
            last = updated.get(stored.last_updated)
            if last is None:
                last = updated[stored.last_updated] = last_updated_of(stored.last_updated)
            entries.append(
                entry_of_rows(
                    rows,
                    custodian=self.institution,
                    record=stored.record,
                    version=stored.version,
                    last_updated=last,
                    patient=patient,
                )
            )
        await self.index.add(entries)

    def _tombstone(self, record: str, version: int) -> IndexEntry:
        """The entry of a deletion: it ends the visibility of the record's earlier versions
        and matches no search itself (no type, no patient, nothing to search by)."""
        return IndexEntry(
            custodian=self.institution,
            record=record,
            resource_type="",
            resource_id="",
            version=version,
            last_updated=0,
            patient="",
        )

    async def reindex(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Rebuild this custodian's index from the ledger and the blobs (every version, in
        ledger order). ``progress(done, total)`` is called as it goes. Returns how many versions
        were indexed (an unreadable one is logged and left out). Raises BackendError."""
        anchors = [a for a in self.records.index.all_versions() if a.source == self.institution]
        await self.index.clear(self.institution)
        done = 0
        batch: list[IndexEntry] = []
        for position, anchor in enumerate(anchors):
            resource = await self._readable(anchor)
            if resource is not None:
                batch.append(self._entry_of_anchor(anchor, resource))
                done += 1
            if len(batch) >= 200:
                await self.index.add(batch)
                batch = []
            if progress is not None:
                progress(position + 1, len(anchors))
        if batch:
            await self.index.add(batch)
        await self.index.optimize()
        return done

    # ---- parsing ---------------------------------------------------------------------------

    def _pseudonyms_of(self, patient_ids: Sequence[str]) -> list[str]:
        out: set[str] = set()
        for pid in patient_ids:
            p = self.records.patient_of("Patient", pid)
            if p is not None:
                out |= self.records.index.links.all_of(p)
        return sorted(out)

    def _identifier_tokens(self, value: str) -> list[tuple[str | None, str | None]]:
        out: list[tuple[str | None, str | None]] = []
        for v in split_values(value):
            system, code = token(v)
            if code is None:
                out.append((system, None))
            elif system is None:
                out.append((ANY_SYSTEM, pseudonym(self._pkey, "", code)))
            else:
                out.append((system, pseudonym(self._pkey, system, code)))
        return out

    async def _ids_by_identifier(
        self, rtype: str, value: str, snapshot: int, flt: SearchFilter
    ) -> list[str]:
        q = Query(
            custodian=self.institution,
            resource_type=rtype,
            clauses=[Token("identifier", self._identifier_tokens(value))],
            filter=flt,
            snapshot=snapshot,
            limit=MAX_INCLUDED,
        )
        return [h.resource_id for h in await self.index.search(q)]

    async def parse(
        self,
        rtype: str,
        params: Params,
        *,
        snapshot: int,
        flt: SearchFilter,
        lenient: bool = False,
    ) -> ParsedSearch:
        """The index query of FHIR search parameters on ``rtype``. Raises InvalidInputError
        (unknown parameters unless ``lenient``, malformed values)."""
        defs = PARAMS.get(rtype)
        if defs is None:
            raise InvalidInputError(
                f"resource type {rtype} is not searchable here", code="not-supported"
            )
        out = ParsedSearch()
        for name, value in params:
            if name in CONTROL:
                self._control(rtype, name, value, out, lenient)
                continue
            base, _, chain = name.partition(".")
            pname, _, modifier = base.partition(":")
            d = defs.get(pname)
            if d is None or (chain and (d.kind != "reference" or chain != "identifier")):
                if lenient:
                    continue
                raise InvalidInputError(
                    f"unknown search parameter {name!r} for {rtype}",
                    location=name,
                    code="not-supported",
                )
            if modifier == "missing":
                if value not in ("true", "false"):
                    raise InvalidInputError(":missing takes true or false", location=name)
                kind = {"token": "token", "reference": "ref", "date": "date"}.get(d.kind)
                param = "subject" if pname in PATIENT_PARAMS else pname
                if kind is None or pname == "_lastUpdated":
                    raise InvalidInputError(f"{name} is not supported", location=name)
                out.clauses.append(Missing(param, kind, value == "true"))  # type: ignore[arg-type]
                continue
            if d.kind == "special":
                self._no_modifier(name, modifier)
                out.clauses.append(Ids(split_values(value)))
            elif d.kind == "token":
                if modifier not in ("", "not"):
                    raise InvalidInputError(f"modifier :{modifier} is not supported", location=name)
                if pname == "identifier":
                    values = self._identifier_tokens(value)
                else:
                    values = [token(v) for v in split_values(value)]
                out.clauses.append(Token(pname, values, negate=modifier == "not"))
            elif d.kind == "date":
                self._no_modifier(name, modifier)
                ranges = []
                for v in split_values(value):
                    prefix, rest = split_prefix(v)
                    lo, hi = date_range(rest, self.tz)
                    ranges.append((prefix, lo, hi))
                column = "updated" if pname == "_lastUpdated" else "date"
                out.clauses.append(Dates(column, ranges))  # type: ignore[arg-type]
            else:
                out.clauses.append(
                    await self._reference(d.target, pname, modifier, chain, value, snapshot, flt)
                )
        return out

    @staticmethod
    def _no_modifier(name: str, modifier: str) -> None:
        if modifier:
            raise InvalidInputError(f"modifier :{modifier} is not supported", location=name)

    async def _reference(
        self,
        target: str,
        pname: str,
        modifier: str,
        chain: str,
        value: str,
        snapshot: int,
        flt: SearchFilter,
    ) -> Clause:
        if not target:  # a reference to any type (Provenance.target): Type/id only
            if modifier or chain:
                raise InvalidInputError(
                    f"{pname} takes Type/id, without modifiers", location=pname, code="invalid"
                )
            targets = []
            for v in split_values(value):
                ref = reference_of({"reference": v})
                if ref is None:
                    raise InvalidInputError(
                        f"{pname} must be a reference Type/id", location=pname, code="invalid"
                    )
                targets.append(ref)
            return Refs(pname, targets)
        if modifier == "identifier" or chain == "identifier":
            ids = await self._ids_by_identifier(target, value, snapshot, flt)
        elif modifier and modifier != target:
            raise InvalidInputError(
                f"modifier :{modifier} is not supported", location=f"{pname}:{modifier}"
            )
        else:
            ids = []
            for v in split_values(value):
                ref = reference_of({"reference": v}) if "/" in v else f"{target}/{v}"
                if ref is None or not ref.startswith(f"{target}/"):
                    raise InvalidInputError(
                        f"{pname} must reference a {target}", location=pname, code="invalid"
                    )
                ids.append(ref.split("/", 1)[1])
        targets = [f"{target}/{i}" for i in ids]
        if pname in PATIENT_PARAMS:
            return Patients(self._pseudonyms_of(ids), targets)
        return Refs(pname, targets)

    def _control(self, rtype: str, name: str, value: str, out: ParsedSearch, lenient: bool) -> None:
        if name == "_count":
            if not value.isdigit():
                raise InvalidInputError("_count must be a non-negative integer", location=name)
            out.count = min(int(value), MAX_COUNT)
            if out.count == 0:
                out.summary_count = True
        elif name == "_sort":
            sort = _SORTS.get(value)
            if sort is None or (sort.lstrip("-") == "date" and "date" not in PARAMS[rtype]):
                if lenient:
                    return
                raise InvalidInputError(f"cannot sort by {value!r}", location=name)
            out.sort = sort
        elif name == "_summary":
            if value == "count":
                out.summary_count = True
            elif value != "false" and not lenient:
                raise InvalidInputError(f"_summary={value} is not supported", location=name)
        elif name in ("_include", "_revinclude"):
            source, _, param = value.partition(":")
            param = param.split(":")[0]
            if name == "_include" and source not in (rtype, "*"):
                raise InvalidInputError(f"{value} does not start at {rtype}", location=name)
            src_defs = PARAMS.get(source, {}) if source != "*" else PARAMS[rtype]
            d = src_defs.get(param)
            if d is None or d.kind != "reference":
                if lenient:
                    return
                raise InvalidInputError(f"cannot {name} {value!r}", location=name)
            if name == "_include":
                out.includes.append((rtype, param))
            else:
                if d.target not in (rtype, ""):  # "": any type (Provenance:target)
                    raise InvalidInputError(f"{value} does not point at {rtype}", location=name)
                out.revincludes.append((source, param))

    # ---- searching -------------------------------------------------------------------------

    async def named_patients(
        self, rtype: str, params: Params, patient_id: str | None, snapshot: int
    ) -> frozenset[str] | None:
        """The pseudonyms of the patients a search names (what the access policy's
        ``search_filter`` is told), None when it names none: ``$everything``'s patient;
        ``patient=`` and ``subject=`` (a Patient id or reference, or ``:identifier`` /
        ``.identifier``); on Patient, ``_id`` and ``identifier``. Identifiers are looked up
        here unrestricted to learn who is named; what the search returns is still filtered by
        that patient's consent. A named patient not stored here is an empty set. Raises
        InvalidInputError (a malformed reference), BackendError."""
        if rtype == EVERYTHING:
            return frozenset(self._pseudonyms_of([patient_id] if patient_id else []))
        defs = PARAMS.get(rtype, {})
        ids: list[str] = []
        named = False
        for name, value in params:
            base, _, chain = name.partition(".")
            pname, _, modifier = base.partition(":")
            by_identifier = modifier == "identifier" or chain == "identifier"
            if rtype == "Patient" and pname in ("_id", "identifier") and not chain:
                if modifier:
                    continue
                named = True
                if pname == "_id":
                    ids += split_values(value)
                else:
                    ids += await self._ids_by_identifier("Patient", value, snapshot, SearchFilter())
                continue
            d = defs.get(pname)
            if pname not in PATIENT_PARAMS or d is None or d.target != "Patient":
                continue
            if by_identifier:
                named = True
                ids += await self._ids_by_identifier("Patient", value, snapshot, SearchFilter())
                continue
            if modifier not in ("", "Patient"):
                continue
            named = True
            for v in split_values(value):
                ref = reference_of({"reference": v}) if "/" in v else f"Patient/{v}"
                if ref is not None and ref.startswith("Patient/"):
                    ids.append(ref.split("/", 1)[1])
        if not named:
            return None
        return frozenset(self._pseudonyms_of(sorted(set(ids))))

    async def _log_search(
        self,
        caller: object | None,
        interaction: Interaction,
        query: str,
        named: frozenset[str] | None,
        returned: Sequence[tuple[Hit, AccessDecision]],
        denied: Sequence[tuple[Hit, AccessDeniedError]],
    ) -> None:
        """One access event per patient named or returned (listing the records returned;
        one more per patient whose records the second-line check refused). Raises
        BackendError, LedgerError (nothing is sent then)."""
        if not logged(caller):
            return
        links = self.records.index.links

        def person(p: str) -> str:
            return min(links.all_of(p))

        permitted: dict[str, tuple[AccessDecision, list[str]]] = {}
        for p in sorted(named or ()):
            permitted.setdefault(person(p), (AccessDecision(True, "search", consent_version=0), []))
        for hit, decision in returned:
            key = person(hit.patient)
            taken, refs = permitted.get(key, (decision, []))
            if not refs or taken.consent_version < decision.consent_version:
                taken = decision
            refs.append(f"{hit.resource_type}/{hit.resource_id}/_history/{hit.version}")
            permitted[key] = (taken, refs)
        refused: dict[str, tuple[AccessDecision, list[str]]] = {}
        for hit, exc in denied:
            taken = exc.decision or AccessDecision(False, exc.reason)
            ref = f"{hit.resource_type}/{hit.resource_id}/_history/{hit.version}"
            refused.setdefault(person(hit.patient), (taken, []))[1].append(ref)
        events = [
            AccessEvent(caller, interaction, patient, decision, tuple(refs), query)
            for group in (refused, permitted)
            for patient, (decision, refs) in group.items()
        ]
        if events:
            await self.records.access_log.record(events)

    async def find(
        self, resource_type: str, params: Params, *, caller: object | None = None
    ) -> list[str]:
        """The ids of this gateway's current ``resource_type`` resources matching ``params``
        (for conditional create/update: ``If-None-Exist``, ``PUT ?identifier=``). Raises
        InvalidInputError, BackendError."""
        flt = await self.policy.search_filter(caller)
        snapshot = await self.index.snapshot()
        parsed = await self.parse(resource_type, params, snapshot=snapshot, flt=flt)
        q = Query(self.institution, resource_type, parsed.clauses, flt, snapshot, limit=MAX_COUNT)
        return [h.resource_id for h in await self.index.search(q)]

    async def search(
        self,
        resource_type: str,
        params: Params,
        *,
        caller: object | None,
        base_url: str,
        lenient: bool = False,
    ) -> dict[str, Any]:
        """The ``searchset`` Bundle of one page of a search (``params`` may instead carry a
        ``_cursor`` from a ``next`` link). Raises InvalidInputError, BackendError."""
        return await self._page(resource_type, None, params, caller, base_url, lenient)

    async def everything(
        self,
        patient_id: str,
        params: Params,
        *,
        caller: object | None,
        base_url: str,
    ) -> dict[str, Any]:
        """``Patient/{id}/$everything``: this gateway's current records of the patient, under
        every pseudonym linked to it, paged like a search. Raises NotFoundError (the patient is
        not stored here), InvalidInputError, BackendError."""
        if self.records.patient_of("Patient", patient_id) is None:
            raise NotFoundError(f"Patient/{patient_id} is not known")
        return await self._page(EVERYTHING, patient_id, params, caller, base_url, False)

    async def _page(
        self,
        rtype: str,
        patient_id: str | None,
        params: Params,
        caller: object | None,
        base_url: str,
        lenient: bool,
    ) -> dict[str, Any]:
        who = caller_key(caller)
        cursor = [v for k, v in params if k == "_cursor"]
        after: tuple[int, int] | None = None
        total: int | None = None
        state: dict[str, Any] = {}
        if cursor:
            state = decode_cursor(self._ckey, cursor[0], who)
            if state.get("t") != rtype or state.get("p") != patient_id:
                raise InvalidInputError(
                    "search cursor belongs to another search", location="_cursor"
                )
            params = [(str(k), str(v)) for k, v in state["q"]]
            snapshot = int(state["s"])
            after = (int(state["a"][0]), int(state["a"][1]))
            total = int(state["n"])
            lenient = bool(state.get("l"))
        else:
            snapshot = await self.index.snapshot()
        own = [(k, v) for k, v in params if k != "_cursor"]
        named = await self.named_patients(rtype, own, patient_id, snapshot)
        flt = await self.policy.search_filter(caller, named)
        fingerprint = filter_fingerprint(flt)
        if cursor and state.get("f") != fingerprint:
            total = None  # consent changed since the first page: the total is counted anew
        if rtype == EVERYTHING:
            parsed = ParsedSearch()
            for name, value in params:
                if name == "_count":
                    self._control("Patient", name, value, parsed, False)
                elif name not in ("_cursor", "_format"):
                    raise InvalidInputError(
                        f"$everything does not take {name!r}", location=name, code="not-supported"
                    )
            assert patient_id is not None
            parsed.clauses = [Patients(self._pseudonyms_of([patient_id]))]
            qtype: str | None = None
        else:
            parsed = await self.parse(
                rtype,
                [p for p in params if p[0] != "_cursor"],
                snapshot=snapshot,
                flt=flt,
                lenient=lenient,
            )
            qtype = rtype
        query = Query(
            custodian=self.institution,
            resource_type=qtype,
            clauses=parsed.clauses,
            filter=flt,
            snapshot=snapshot,
            sort=parsed.sort,
            after=after,
            limit=parsed.count + 1,
        )
        if total is None:
            total = await self.index.count(query)
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total}
        path = (
            f"{base_url}/fhir/Patient/{patient_id}/$everything"
            if patient_id is not None
            else f"{base_url}/fhir/{rtype}"
        )
        links = [{"relation": "self", "url": path + (f"?{urlencode(own)}" if own else "")}]
        bundle["link"] = links
        interaction: Interaction = "everything" if rtype == EVERYTHING else "search"
        what = f"{'Patient/$everything' if rtype == EVERYTHING else rtype}?{urlencode(own)}"
        if parsed.summary_count:
            await self._log_search(caller, interaction, what, named, [], [])
            return bundle
        hits = await self.index.search(query)
        more = len(hits) > parsed.count
        hits = hits[: parsed.count]
        returned: list[tuple[Hit, AccessDecision]] = []
        denied: list[tuple[Hit, AccessDeniedError]] = []
        resources = await self._read_all(hits, caller, interaction, returned, denied)
        entries = [self._entry(base_url, r, "match") for r in resources if r is not None]
        included = await self._included(
            rtype,
            parsed,
            [r for r in resources if r is not None],
            hits,
            flt,
            snapshot,
            caller,
            (interaction, returned, denied),
        )
        entries += [self._entry(base_url, r, "include") for r in included]
        await self._log_search(caller, interaction, what, named, returned, denied)
        if entries:
            bundle["entry"] = entries
        if more and hits:
            state = {
                "t": rtype,
                "p": patient_id,
                "q": [list(p) for p in own],
                "s": snapshot,
                "a": [hits[-1].key, hits[-1].vid],
                "n": total,
                "f": fingerprint,
                "c": who,
                "l": lenient,
            }
            token_ = encode_cursor(self._ckey, state)
            links.append({"relation": "next", "url": f"{path}?{urlencode({'_cursor': token_})}"})
        return bundle

    @staticmethod
    def _entry(base_url: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
        return {
            "fullUrl": f"{base_url}/fhir/{resource['resourceType']}/{resource['id']}",
            "resource": resource,
            "search": {"mode": mode},
        }

    async def _read_all(
        self,
        hits: Sequence[Hit],
        caller: object | None,
        interaction: Interaction = "search",
        returned: list[tuple[Hit, AccessDecision]] | None = None,
        denied: list[tuple[Hit, AccessDeniedError]] | None = None,
    ) -> list[dict[str, Any] | None]:
        """Read each hit, checked as a read (the second line behind the index filter);
        what is refused or gone is left out. The decisions are collected in ``returned``
        and ``denied`` for the access log."""

        async def one(h: Hit) -> dict[str, Any] | None:
            try:
                rec, decision = await self.records.read_checked(
                    h.resource_type,
                    h.resource_id,
                    caller=caller,
                    version=h.version,
                    interaction=interaction,
                )
            except AccessDeniedError as exc:
                if denied is not None:
                    denied.append((h, exc))
                return None  # a denied read is answered as a missing record: left out
            except (NotFoundError, GoneError):
                return None
            if returned is not None:
                returned.append((h, decision))
            return rec.resource

        return list(await asyncio.gather(*(one(h) for h in hits)))

    async def _included(
        self,
        rtype: str,
        parsed: ParsedSearch,
        matches: list[dict[str, Any]],
        hits: Sequence[Hit],
        flt: SearchFilter,
        snapshot: int,
        caller: object | None,
        collect: tuple[
            Interaction, list[tuple[Hit, AccessDecision]], list[tuple[Hit, AccessDeniedError]]
        ]
        | None = None,
    ) -> list[dict[str, Any]]:
        if not matches or not (parsed.includes or parsed.revincludes):
            return []
        seen = {(str(r["resourceType"]), str(r["id"])) for r in matches}
        found: list[Hit] = []
        by_type: dict[str, list[str]] = {}
        for _, param in parsed.includes:
            for r in matches:
                for target in _targets(r, param):
                    t, _, i = target.partition("/")
                    if (t, i) not in seen:
                        by_type.setdefault(t, []).append(i)
        for t, ids in by_type.items():
            if t not in PARAMS:
                continue
            q = Query(
                self.institution, t, [Ids(sorted(set(ids)))], flt, snapshot, limit=MAX_INCLUDED
            )
            found += await self.index.search(q)
        own = [f"{r['resourceType']}/{r['id']}" for r in matches]
        for source, param in parsed.revincludes:
            clause: Clause
            if param in PATIENT_PARAMS:
                ids = [str(r["id"]) for r in matches]
                clause = Patients(self._pseudonyms_of(ids), own)
            else:
                clause = Refs(param, own)
            q = Query(self.institution, source, [clause], flt, snapshot, limit=MAX_INCLUDED)
            found += await self.index.search(q)
        unique: list[Hit] = []
        for h in found:
            if (h.resource_type, h.resource_id) not in seen and len(unique) < MAX_INCLUDED:
                seen.add((h.resource_type, h.resource_id))
                unique.append(h)
        interaction, returned, denied = collect or ("search", None, None)
        read = await self._read_all(unique, caller, interaction, returned, denied)
        return [r for r in read if r is not None]


def _canonical(f: Filter) -> str:
    if isinstance(f, In):
        return f"in({f.field}:{','.join(sorted(f.values))})"
    if isinstance(f, DateIn):
        return f"date({f.start and f.start.isoformat()},{f.end and f.end.isoformat()})"
    if isinstance(f, Not):
        return f"not({_canonical(f.term)})"
    return f"{type(f).__name__.lower()}({';'.join(_canonical(t) for t in f.terms)})"


def filter_fingerprint(flt: SearchFilter) -> str:
    """A short stable digest of an access filter (the same in every process), kept in a
    search cursor: when the filter of a later page differs (a consent changed), its total is
    counted again, so no page reports a total the caller may no longer see. Raises
    nothing."""
    parts = [
        ",".join(sorted(x)) if x is not None else "*"
        for x in (flt.patients, flt.custodians, flt.types, flt.labels)
    ]
    if flt.consent is not None:
        parts += [
            f"{','.join(sorted(t.patients)) if t.patients is not None else '*'}:"
            + _canonical(t.where)
            for t in flt.consent
        ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _targets(resource: dict[str, Any], param: str) -> list[str]:
    """``Type/id`` references of a resource under a reference search parameter."""
    elements = {
        "patient": ("subject", "patient"),
        "subject": ("subject", "patient"),
        "encounter": ("encounter", "context"),
        "based-on": ("basedOn",),
        "result": ("result",),
        "target": ("target",),
    }.get(param, ())
    out = []
    for element in elements:
        value = resource.get(element)
        for v in value if isinstance(value, list) else [value]:
            ref = reference_of(v)
            if ref is not None:
                out.append(ref)
    return out
