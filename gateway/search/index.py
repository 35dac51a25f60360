"""The search index: a :class:`SearchIndex` protocol and its two stores, SQLite (embedded
profile: a file under the data directory) and PostgreSQL (production profile, ``psycopg`` 3).

Both keep every indexed version (table ``versions``, one row per resource version, with its
tokens, references and security labels in side tables) under a increasing version-row id
``vid``. A row stays visible until a newer version of its record is indexed (``until_vid``), so
a query *at a snapshot* (the largest ``vid`` when a search began) sees exactly the versions
that were current then: paging by keyset over ``(sort key, vid)`` at that snapshot returns
each match exactly once while writes continue. Both stores run the same SQL
(:func:`compile_query`); only placeholders and id allocation differ.

Raises :class:`gateway.errors.BackendError` when the store fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import orjson

from gateway.access import PatientFilter, SearchFilter
from gateway.consent import And, DateIn, Filter, In, Or, RecordMeta
from gateway.errors import BackendError
from gateway.search.extract import CONSENT_CODE_PARAMS, IndexEntry

log = logging.getLogger("gateway.search.index")

# ---- queries --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """A token parameter: any of ``values`` ((system or None, code or None)); ``negate`` for
    ``:not`` (no token of the parameter matches)."""

    param: str
    values: Sequence[tuple[str | None, str | None]]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Missing:
    """``:missing``: the parameter has no value (``missing``) or has one."""

    param: str
    kind: Literal["token", "ref", "date"]
    missing: bool


@dataclass(frozen=True, slots=True)
class Refs:
    """A reference parameter pointing at any of ``targets`` (``Type/id``)."""

    param: str
    targets: Sequence[str]


@dataclass(frozen=True, slots=True)
class Patients:
    """The record belongs to one of these patient pseudonyms; when there are none (the patient
    is not stored here), its subject is one of ``targets`` (``Patient/id``)."""

    pseudonyms: Sequence[str]
    targets: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Dates:
    """A date parameter: any of ``values`` ((prefix, low, high) in microseconds) against the
    clinical date (``date``) or lastUpdated (``updated``)."""

    column: Literal["date", "updated"]
    values: Sequence[tuple[str, int, int]]


@dataclass(frozen=True, slots=True)
class Ids:
    """``_id``: any of these resource ids."""

    ids: Sequence[str]


Clause = Token | Missing | Refs | Patients | Dates | Ids

Sort = Literal["", "date", "-date", "_lastUpdated", "-_lastUpdated"]


@dataclass(frozen=True, slots=True)
class Query:
    """A search at ``snapshot``: the custodian's current versions of type ``resource_type``
    (any type when None) matching every clause and the access filter, sorted, after the
    keyset position ``after`` ((sort key, vid) of the last entry returned), at most
    ``limit``."""

    custodian: str
    resource_type: str | None
    clauses: Sequence[Clause] = ()
    filter: SearchFilter = field(default_factory=SearchFilter)
    snapshot: int = 0
    sort: Sort = ""
    after: tuple[int, int] | None = None
    limit: int = 50


class Hit(NamedTuple):
    """One matching version: its row id, type, id, version, sort key and patient pseudonym."""

    vid: int
    resource_type: str
    resource_id: str
    version: int
    key: int
    patient: str


LOW = -(2**62)
HIGH = 2**62


def _in(column: str, values: Sequence[str], args: list[Any]) -> str:
    if not values:
        return "1=0"
    args.extend(values)
    return f"{column} IN ({','.join('?' * len(values))})"


def _date_sql(lo_col: str, hi_col: str, prefix: str, slo: int, shi: int, args: list[Any]) -> str:
    rlo, rhi = f"COALESCE({lo_col}, {LOW})", f"COALESCE({hi_col}, {HIGH})"
    conds = {
        "eq": (f"{rlo} >= ? AND {rhi} <= ?", (slo, shi)),
        "ne": (f"NOT ({rlo} >= ? AND {rhi} <= ?)", (slo, shi)),
        "lt": (f"{rlo} < ?", (slo,)),
        "le": (f"{rlo} < ?", (shi,)),
        "gt": (f"{rhi} > ?", (shi,)),
        "ge": (f"{rhi} > ?", (slo,)),
        "sa": (f"{rlo} >= ?", (shi,)),
        "eb": (f"{rhi} <= ?", (slo,)),
    }
    sql, values = conds[prefix]
    args.extend(values)
    return f"({sql})"


def _clause_sql(c: Clause, args: list[Any]) -> str:
    if isinstance(c, Ids):
        return _in("v.rid", c.ids, args)
    if isinstance(c, Patients):
        # A patient stored here is matched by pseudonym (indexed: no OR, so the patient index
        # serves the query); the subject reference is the fallback for one that is not.
        if c.pseudonyms or not c.targets:
            return _in("v.patient", c.pseudonyms, args)
        sub = _in("r.target", c.targets, args)
        return (
            f"EXISTS (SELECT 1 FROM refs r WHERE r.vid = v.vid AND r.param = 'subject' AND {sub})"
        )
    if isinstance(c, Refs):
        args.append(c.param)
        sub = _in("r.target", c.targets, args)
        return f"EXISTS (SELECT 1 FROM refs r WHERE r.vid = v.vid AND r.param = ? AND {sub})"
    if isinstance(c, Dates):
        lo, hi = ("v.date_lo", "v.date_hi") if c.column == "date" else ("v.last_updated", None)
        hi_col = hi if hi is not None else "v.last_updated + 1"
        parts = [_date_sql(lo, hi_col, p, slo, shi, args) for p, slo, shi in c.values]
        if c.column == "date":
            return (
                "(v.date_lo IS NOT NULL OR v.date_hi IS NOT NULL) AND (" + " OR ".join(parts) + ")"
            )
        return "(" + " OR ".join(parts) + ")"
    if isinstance(c, Missing):
        if c.kind == "date":
            return (
                "(v.date_lo IS NULL AND v.date_hi IS NULL)"
                if c.missing
                else ("(v.date_lo IS NOT NULL OR v.date_hi IS NOT NULL)")
            )
        table = "tokens" if c.kind == "token" else "refs"
        args.append(c.param)
        exists = f"EXISTS (SELECT 1 FROM {table} x WHERE x.vid = v.vid AND x.param = ?)"
        return f"NOT {exists}" if c.missing else exists
    # Token
    args.append(c.param)
    alts: list[str] = []
    for system, code in c.values:
        conds = []
        if system is not None:
            conds.append("t.system = ?")
            args.append(system)
        if code is not None:
            conds.append("t.code = ?")
            args.append(code)
        alts.append("(" + " AND ".join(conds or ["1=1"]) + ")")
    exists = (
        "EXISTS (SELECT 1 FROM tokens t WHERE t.vid = v.vid AND t.param = ? AND ("
        + " OR ".join(alts)
        + "))"
    )
    return f"NOT {exists}" if c.negate else exists


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(value: datetime) -> int:
    """Microseconds since the epoch of a timezone-aware datetime (exact; the index's unit)."""
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    """The UTC datetime of microseconds since the epoch (inverse of :func:`micros`)."""
    return _EPOCH + timedelta(microseconds=value)


def filter_sql(f: Filter, args: list[Any]) -> str:
    """The SQL condition (over ``versions v``) of a consent :data:`gateway.consent.Filter`,
    so that a version matches exactly when ``f.matches`` holds for its metadata (type,
    custodian, codes and categories, clinical date ``date_lo``, security labels: what
    :meth:`SearchIndex.meta_of` returns). Every atom is two-valued (never NULL), so ``NOT``
    is exact. Raises nothing."""
    if isinstance(f, In):
        values = sorted(f.values)
        if not values:
            return "1=0"
        if f.field == "custodian":
            return _in("v.custodian", values, args)
        if f.field == "type":
            return _in("v.rtype", values, args)
        if f.field == "label":
            sub = _in("l.label", values, args)
            return f"EXISTS (SELECT 1 FROM labels l WHERE l.vid = v.vid AND {sub})"
        params = _in("t.param", CONSENT_CODE_PARAMS, args)
        alts = []
        for value in values:
            system, _, code = value.partition("|")
            alts.append("(t.system = ? AND t.code = ?)")
            args.extend((system, code))
        return (
            f"EXISTS (SELECT 1 FROM tokens t WHERE t.vid = v.vid AND {params} AND ("
            + " OR ".join(alts)
            + "))"
        )
    if isinstance(f, DateIn):
        conds = ["v.date_lo IS NOT NULL"]
        if f.start is not None:
            conds.append("v.date_lo >= ?")
            args.append(micros(f.start))
        if f.end is not None:
            conds.append("v.date_lo < ?")
            args.append(micros(f.end))
        return "(" + " AND ".join(conds) + ")"
    if isinstance(f, And):
        return "(" + " AND ".join(filter_sql(t, args) for t in f.terms) + ")" if f.terms else "1=1"
    if isinstance(f, Or):
        return "(" + " OR ".join(filter_sql(t, args) for t in f.terms) + ")" if f.terms else "1=0"
    return f"NOT ({filter_sql(f.term, args)})"


def consent_sql(terms: Sequence[PatientFilter], args: list[Any]) -> str:
    """The SQL condition of a consent-based search filter (``SearchFilter.consent``): a
    version matches one of the terms, each its patients (None: every patient no other term
    names) and its :data:`Filter`. No terms: nothing matches. Raises nothing."""
    named = sorted({p for t in terms if t.patients is not None for p in t.patients})
    alts = []
    for term in terms:
        if term.patients is not None:
            who = _in("v.patient", sorted(term.patients), args)
        elif named:
            who = "NOT " + _in("v.patient", named, args)
        else:
            who = "1=1"
        alts.append(f"({who} AND {filter_sql(term.where, args)})")
    return "(" + " OR ".join(alts) + ")" if alts else "1=0"


def _sort_key(sort: Sort) -> tuple[str, bool]:
    if sort in ("date", "-date"):
        return f"COALESCE(v.date_lo, {LOW})", sort.startswith("-")
    if sort in ("_lastUpdated", "-_lastUpdated"):
        return "v.last_updated", sort.startswith("-")
    return "v.vid", False


def compile_query(q: Query, *, count: bool = False) -> tuple[str, list[Any]]:
    """The SQL (``?`` placeholders) and arguments of a query, or of its count."""
    args: list[Any] = [q.custodian, q.snapshot, q.snapshot]
    where = ["v.custodian = ?", "v.vid <= ?", "(v.until_vid IS NULL OR v.until_vid > ?)"]
    if q.resource_type is not None:
        where.append("v.rtype = ?")
        args.append(q.resource_type)
    f = q.filter
    if f.patients is not None:
        where.append(_in("v.patient", sorted(f.patients), args))
    if f.custodians is not None:
        where.append(_in("v.custodian", sorted(f.custodians), args))
    if f.types is not None:
        where.append(_in("v.rtype", sorted(f.types), args))
    if f.labels is not None:
        allowed = sorted(f.labels)
        sub = "1=1" if not allowed else "NOT " + _in("l.label", allowed, args)
        where.append(f"NOT EXISTS (SELECT 1 FROM labels l WHERE l.vid = v.vid AND {sub})")
    if f.consent is not None:
        where.append(consent_sql(f.consent, args))
    for c in q.clauses:
        where.append(_clause_sql(c, args))
    key, desc = _sort_key(q.sort)
    if count:
        return "SELECT count(*) FROM versions v WHERE " + " AND ".join(where), args
    if q.after is not None:
        where.append(f"({key}, v.vid) {'<' if desc else '>'} (?, ?)")
        args.extend(q.after)
    order = "DESC" if desc else "ASC"
    sql = (
        f"SELECT v.vid, v.rtype, v.rid, v.version, {key}, v.patient FROM versions v WHERE "
        + " AND ".join(where)
        + f" ORDER BY {key} {order}, v.vid {order} LIMIT ?"
    )
    args.append(q.limit)
    return sql, args


# ---- the protocol ---------------------------------------------------------------------------


class SearchIndex(Protocol):
    """What the search service needs of an index store."""

    async def open(self) -> None:
        """Connect and create the schema if needed. Raises BackendError."""

    async def close(self) -> None:
        """Release connections. Raises nothing."""

    async def add(self, entries: Sequence[IndexEntry]) -> None:
        """Index resource versions (each supersedes the older versions of its record).
        Raises BackendError."""

    async def snapshot(self) -> int:
        """The newest row id: a query at it sees everything indexed so far. Raises
        BackendError."""

    async def search(self, query: Query) -> list[Hit]:
        """The page of matches of ``query``. Raises BackendError."""

    async def count(self, query: Query) -> int:
        """How many versions match ``query`` (keyset and limit ignored). Raises BackendError."""

    async def clear(self, custodian: str) -> None:
        """Forget everything indexed of ``custodian`` (before a rebuild). Raises
        BackendError."""

    async def optimize(self) -> None:
        """Refresh the query planner's statistics (after a bulk load). Raises BackendError."""

    async def indexed(self, custodian: str) -> set[tuple[str, int]]:
        """Every (record, version) indexed of ``custodian``. Raises BackendError."""

    async def meta_of(self, custodian: str, record: str, version: int) -> RecordMeta | None:
        """What consent looks at of one indexed version (type, custodian, codes and
        categories, clinical date, security labels), in one query, without decrypting
        anything; None when that version is not indexed (or is a deletion). Raises
        BackendError."""


_DDL = [
    """CREATE TABLE IF NOT EXISTS versions (
        vid BIGINT PRIMARY KEY, custodian TEXT NOT NULL, record TEXT NOT NULL,
        rtype TEXT NOT NULL, rid TEXT NOT NULL, version INTEGER NOT NULL,
        last_updated BIGINT NOT NULL, patient TEXT NOT NULL, date_lo BIGINT, date_hi BIGINT,
        until_vid BIGINT)""",
    "CREATE TABLE IF NOT EXISTS tokens (vid BIGINT NOT NULL, param TEXT NOT NULL, "
    "system TEXT NOT NULL, code TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS refs (vid BIGINT NOT NULL, param TEXT NOT NULL, "
    "target TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS labels (vid BIGINT NOT NULL, label TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS versions_type ON versions (custodian, rtype, vid)",
    "CREATE INDEX IF NOT EXISTS versions_record ON versions (custodian, record, until_vid)",
    "CREATE INDEX IF NOT EXISTS versions_patient ON versions (custodian, patient, rtype, vid)",
    "CREATE INDEX IF NOT EXISTS versions_date ON versions (custodian, rtype, date_lo)",
    "CREATE INDEX IF NOT EXISTS tokens_code ON tokens (param, code, vid)",
    "CREATE INDEX IF NOT EXISTS tokens_vid ON tokens (vid)",
    "CREATE INDEX IF NOT EXISTS refs_target ON refs (param, target, vid)",
    "CREATE INDEX IF NOT EXISTS refs_vid ON refs (vid)",
    "CREATE INDEX IF NOT EXISTS labels_vid ON labels (vid)",
]

_CURRENT_MANY = (
    "SELECT record, vid, version FROM versions WHERE custodian = ? AND record IN ({}) "
    "AND until_vid IS NULL"
)
#: Records looked up in one statement at most (SQLite's limit on parameters is far above).
_LOOKUP_CHUNK = 500
_INDEXED = "SELECT record, version FROM versions WHERE custodian = ?"
_SUPERSEDE = "UPDATE versions SET until_vid = ? WHERE vid = ?"
_INSERT = (
    "INSERT INTO versions (vid, custodian, record, rtype, rid, version, last_updated, patient, "
    "date_lo, date_hi, until_vid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# One query: the version's row, then its codes and its labels (columns as text, so both
# stores accept the UNION).
_META = (
    "SELECT 0, v.rtype, CAST(v.date_lo AS TEXT) FROM versions v"
    " WHERE v.custodian = ? AND v.record = ? AND v.version = ?"
    " UNION ALL SELECT 1, t.system, t.code FROM versions v JOIN tokens t ON t.vid = v.vid"
    " WHERE v.custodian = ? AND v.record = ? AND v.version = ?"
    f" AND t.param IN ({', '.join(repr(p) for p in CONSENT_CODE_PARAMS)})"
    " UNION ALL SELECT 2, l.label, NULL FROM versions v JOIN labels l ON l.vid = v.vid"
    " WHERE v.custodian = ? AND v.record = ? AND v.version = ?"
)


def _meta_of_rows(custodian: str, rows: Sequence[tuple[Any, ...]]) -> RecordMeta | None:
    head = [r for r in rows if int(r[0]) == 0]
    if not head or not head[0][1]:  # not indexed, or a deletion's entry
        return None
    date = head[0][2]
    return RecordMeta(
        resource_type=str(head[0][1]),
        custodian=custodian,
        codes=frozenset(f"{r[1]}|{r[2]}" for r in rows if int(r[0]) == 1),
        clinical_date=from_micros(int(date)) if date is not None else None,
        labels=frozenset(str(r[1]) for r in rows if int(r[0]) == 2),
    )


_CLEAR = [
    "DELETE FROM tokens WHERE vid IN (SELECT vid FROM versions WHERE custodian = ?)",
    "DELETE FROM refs WHERE vid IN (SELECT vid FROM versions WHERE custodian = ?)",
    "DELETE FROM labels WHERE vid IN (SELECT vid FROM versions WHERE custodian = ?)",
    "DELETE FROM versions WHERE custodian = ?",
]


def _rows(
    entry: IndexEntry, vid: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    tokens = [(vid, p, s, c) for p, s, c in dict.fromkeys(entry.tokens)]
    refs = [(vid, p, t) for p, t in dict.fromkeys(entry.refs)]
    labels = [(vid, label) for label in dict.fromkeys(entry.labels)]
    return tokens, refs, labels


@dataclass(slots=True)
class _Plan:
    """The rows one batch of entries writes: new versions, (new vid, old vid) supersessions,
    tokens, references, labels."""

    versions: list[tuple[Any, ...]] = field(default_factory=list)
    supersede: list[tuple[int, int]] = field(default_factory=list)
    tokens: list[tuple[Any, ...]] = field(default_factory=list)
    refs: list[tuple[Any, ...]] = field(default_factory=list)
    labels: list[tuple[Any, ...]] = field(default_factory=list)


def _plan(
    entries: Sequence[IndexEntry], vids: Sequence[int], current: dict[str, tuple[int, int]]
) -> _Plan:
    """What indexing ``entries`` (in order, with row ids ``vids``) writes, given ``current``
    (record -> (vid, version) of its current row; updated as the batch supersedes rows): a
    version already indexed is skipped, a newer one supersedes the current row, an older one
    arriving late is stored as never current. Shared by both stores (one rule)."""
    plan = _Plan()
    for entry, vid in zip(entries, vids, strict=True):
        found = current.get(entry.record)
        until: int | None = None
        if found is not None:
            if found[1] == entry.version:
                continue
            if found[1] < entry.version:
                plan.supersede.append((vid, found[0]))
            else:
                until = found[0]
        if until is None:
            current[entry.record] = (vid, entry.version)
        plan.versions.append(_version_row(entry, vid, until))
        t, r, lb = _rows(entry, vid)
        plan.tokens += t
        plan.refs += r
        plan.labels += lb
    return plan


def _version_row(entry: IndexEntry, vid: int, until: int | None) -> tuple[Any, ...]:
    return (
        vid,
        entry.custodian,
        entry.record,
        entry.resource_type,
        entry.resource_id,
        entry.version,
        entry.last_updated,
        entry.patient,
        entry.date_lo,
        entry.date_hi,
        until,
    )


# ---- SQLite ---------------------------------------------------------------------------------


class SqliteIndex:
    """The embedded profile's index: one SQLite file (WAL), used from the event loop (its
    statements take well under a millisecond at the embedded profile's sizes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._next = 1
        self._since_optimize = 0

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection. Raises BackendError when not open."""
        if self._db is None:
            raise BackendError("the search index is not open", backend="search-index")
        return self._db

    async def open(self) -> None:
        """Open (creating) the file and the schema. Raises BackendError."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for stmt in _DDL:
                db.execute(stmt)
            self._next = int(db.execute("SELECT COALESCE(max(vid), 0) FROM versions").fetchone()[0])
            self._next += 1
            self._db = db
            await self.optimize()
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"{self.path}: {exc}", backend="search-index") from exc

    async def close(self) -> None:
        """Close the file. Raises nothing."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    async def add(self, entries: Sequence[IndexEntry]) -> None:
        """Index resource versions in one transaction: one lookup of the records' current
        rows per custodian and chunk, then one ``executemany`` per table. Raises
        BackendError."""
        db = self.db
        if not entries:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                current: dict[tuple[str, str], tuple[int, int]] = {}
                by_custodian: dict[str, list[str]] = {}
                for entry in entries:
                    by_custodian.setdefault(entry.custodian, []).append(entry.record)
                for custodian, records in by_custodian.items():
                    unique = list(dict.fromkeys(records))
                    for n in range(0, len(unique), _LOOKUP_CHUNK):
                        chunk = unique[n : n + _LOOKUP_CHUNK]
                        rows = db.execute(
                            _CURRENT_MANY.format(",".join("?" * len(chunk))), (custodian, *chunk)
                        ).fetchall()
                        for record, vid, version in rows:
                            current[(custodian, str(record))] = (int(vid), int(version))
                plan = _Plan()
                for custodian in by_custodian:
                    part = [e for e in entries if e.custodian == custodian]
                    mine = {r: v for (c, r), v in current.items() if c == custodian}
                    vids = range(self._next, self._next + len(part))
                    p = _plan(part, vids, mine)
                    self._next += len(part)
                    plan.versions += p.versions
                    plan.supersede += p.supersede
                    plan.tokens += p.tokens
                    plan.refs += p.refs
                    plan.labels += p.labels
                db.executemany(_INSERT, plan.versions)
                db.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?)", plan.tokens)
                db.executemany("INSERT INTO refs VALUES (?, ?, ?)", plan.refs)
                db.executemany("INSERT INTO labels VALUES (?, ?)", plan.labels)
                # After the inserts (as on PostgreSQL): a batch may supersede its own rows.
                db.executemany(_SUPERSEDE, plan.supersede)
                db.execute("COMMIT")
                self._since_optimize += len(entries)
            except BaseException:
                db.execute("ROLLBACK")
                self._next = (
                    int(db.execute("SELECT COALESCE(max(vid),0) FROM versions").fetchone()[0]) + 1
                )
                raise
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: {exc}", backend="search-index") from exc
        if statistics_due(self._since_optimize, self._next):
            self._since_optimize = 0
            await self.optimize()

    async def snapshot(self) -> int:
        """The newest row id. Raises BackendError."""
        return self._next - 1

    async def optimize(self) -> None:
        """Refresh the planner's statistics (``PRAGMA optimize``, bounded). Raises
        BackendError."""
        try:
            self.db.execute("PRAGMA analysis_limit=2000")
            self.db.execute("PRAGMA optimize=0x10002")
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: {exc}", backend="search-index") from exc

    def _query(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: {exc}", backend="search-index") from exc

    async def search(self, query: Query) -> list[Hit]:
        """The page of matches. Raises BackendError."""
        sql, args = compile_query(query)
        return [Hit(*row) for row in self._query(sql, args)]

    async def indexed(self, custodian: str) -> set[tuple[str, int]]:
        """Every (record, version) indexed of ``custodian``. Raises BackendError."""
        rows = self._query(_INDEXED, [custodian])
        return {(str(r), int(v)) for r, v in rows}

    async def count(self, query: Query) -> int:
        """How many match. Raises BackendError."""
        sql, args = compile_query(query, count=True)
        return int(self._query(sql, args)[0][0])

    async def meta_of(self, custodian: str, record: str, version: int) -> RecordMeta | None:
        """One version's consent metadata (one query). Raises BackendError."""
        return _meta_of_rows(custodian, self._query(_META, [custodian, record, version] * 3))

    async def clear(self, custodian: str) -> None:
        """Forget a custodian's rows. Raises BackendError."""
        try:
            for stmt in _CLEAR:
                self.db.execute(stmt, (custodian,))
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: {exc}", backend="search-index") from exc


# ---- PostgreSQL -----------------------------------------------------------------------------


# The rows of a batch go as one JSON array of arrays per table (serialised by orjson, parsed
# by the server): adapting them as PostgreSQL arrays cost the gateway process, which is the HL7
# path's bottleneck, about a tenth of its CPU (psycopg's array dumper is Python). As ``jsonb``:
# parsed once, where each ``->>`` on ``json`` parses the element again (about a fifth of the
# server's CPU per indexed message, docs/benchmarks.md).
_JSON_VERSIONS = (
    "INSERT INTO versions SELECT (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4, (r->>5)::int, "
    "(r->>6)::bigint, r->>7, (r->>8)::bigint, (r->>9)::bigint, (r->>10)::bigint "
    "FROM jsonb_array_elements(%s::jsonb) r"
)
_JSON_TOKENS = (
    "INSERT INTO tokens SELECT (r->>0)::bigint, r->>1, r->>2, r->>3 "
    "FROM jsonb_array_elements(%s::jsonb) r"
)
_JSON_REFS = (
    "INSERT INTO refs SELECT (r->>0)::bigint, r->>1, r->>2 FROM jsonb_array_elements(%s::jsonb) r"
)
_JSON_LABELS = (
    "INSERT INTO labels SELECT (r->>0)::bigint, r->>1 FROM jsonb_array_elements(%s::jsonb) r"
)


def statistics_due(written: int, rows: int) -> bool:
    """Whether a store's planner statistics are due for a refresh: ``written`` versions since
    the last one, ``rows`` in all (so at each doubling, from 1,000 on). Both stores follow this
    rule. A young index grows fast, and a plan chosen on the statistics of a near-empty table
    (PostgreSQL: the current-row lookup of a write scanning every current row instead of one
    index probe per record) cost nine times the CPU of the write itself before autovacuum's
    first ``ANALYZE`` (docs/benchmarks.md); refreshing more often than at each doubling cost
    more than it saved there."""
    return written >= max(1000, rows // 2)


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresIndex:
    """The production profile's index in PostgreSQL (``psycopg`` 3, async): one writer
    connection (index writes of all of this custodian's gateway processes serialised by a
    transaction advisory lock, so row ids commit in order) and a few reader connections."""

    def __init__(self, url: str, *, readers: int = 4) -> None:
        self.url = url
        self._readers = readers
        self._writer: Any = None
        self._pool: asyncio.Queue[Any] = asyncio.Queue()
        self._all: list[Any] = []
        self._write_lock = asyncio.Lock()
        self._pending: list[tuple[list[IndexEntry], asyncio.Future[None]]] = []
        self._rows = 0
        self._since_stats = 0
        self._stats: asyncio.Task[None] | None = None

    def _error(self, exc: Exception) -> BackendError:
        return BackendError(f"PostgreSQL: {type(exc).__name__}: {exc}", backend="search-index")

    async def open(self) -> None:
        """Connect and create the schema. Raises BackendError."""
        import psycopg

        try:
            self._writer = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            await self._writer.execute("SET synchronous_commit = off")
            self._all.append(self._writer)
            async with self._writer.transaction():
                await self._writer.execute("SELECT pg_advisory_xact_lock(7461)")
                for stmt in _DDL:
                    await self._writer.execute(stmt)
                await self._writer.execute("CREATE SEQUENCE IF NOT EXISTS search_vid")
            for _ in range(self._readers):
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                self._all.append(conn)
                self._pool.put_nowait(conn)
            self._rows = await self.snapshot()
        except psycopg.Error as exc:
            await self.close()
            raise self._error(exc) from exc
        self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        """Refresh the planner's statistics in the background (on a reader connection;
        ``ANALYZE`` does not block writes), unless a refresh is running. Raises nothing."""
        if self._stats is not None and not self._stats.done():
            return
        self._since_stats = 0

        async def run() -> None:
            try:
                await self.optimize()
            except BackendError:
                log.warning("search index statistics not refreshed", exc_info=True)

        self._stats = asyncio.create_task(run(), name="search-index-statistics")

    async def close(self) -> None:
        """Close every connection. Raises nothing."""
        if self._stats is not None:
            self._stats.cancel()
            with contextlib.suppress(BaseException):
                await self._stats
            self._stats = None
        for conn in self._all:
            with contextlib.suppress(Exception):
                await conn.close()
        self._all.clear()
        self._writer = None
        self._pool = asyncio.Queue()

    async def add(self, entries: Sequence[IndexEntry]) -> None:
        """Index resource versions. Concurrent calls are group-committed: whoever takes the
        writer writes everything waiting in one transaction (one commit, one fsync), so index
        writes keep up with the pipeline's own batching. Raises BackendError."""
        if self._writer is None:
            raise BackendError("the search index is not open", backend="search-index")
        if not entries:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((list(entries), done))
        async with self._write_lock:
            if not done.done():
                batch, self._pending = self._pending, []
                try:
                    await self._write([e for group, _ in batch for e in group])
                except BackendError as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
        await done

    async def _write(self, entries: Sequence[IndexEntry]) -> None:
        """One transaction in two pipelined round trips: ``BEGIN``, the lock, row ids and the
        current rows of these records; then every insert, the supersession and ``COMMIT``.
        (A ``conn.transaction()`` block would add a round trip for each of ``BEGIN`` and
        ``COMMIT``; every round trip is latency each HL7 message waits for.)"""
        import psycopg

        conn = self._writer
        custodian = entries[0].custodian
        records = sorted({e.record for e in entries})
        try:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (custodian,))
                ids = await conn.execute(
                    "SELECT nextval('search_vid') FROM generate_series(1, %s)",
                    (len(entries),),
                )
                cur = await conn.execute(
                    "SELECT record, vid, version FROM versions WHERE custodian = %s "
                    "AND record = ANY(%s) AND until_vid IS NULL",
                    (custodian, records),
                )
            vids = sorted(int(r[0]) for r in await ids.fetchall())
            current: dict[str, tuple[int, int]] = {
                str(record): (int(vid), int(version))
                for record, vid, version in await cur.fetchall()
            }
            plan = _plan(entries, vids, current)
            supersede = plan.supersede
            async with conn.pipeline():
                for sql, rows in (
                    (_JSON_VERSIONS, plan.versions),
                    (_JSON_TOKENS, plan.tokens),
                    (_JSON_REFS, plan.refs),
                    (_JSON_LABELS, plan.labels),
                ):
                    if rows:
                        await conn.execute(sql, (orjson.dumps(rows).decode(),))
                if supersede:  # after the inserts: a batch may supersede its own rows
                    await conn.execute(
                        "UPDATE versions SET until_vid = d.n FROM (SELECT unnest(%s::bigint[])"
                        " AS n, unnest(%s::bigint[]) AS o) d WHERE versions.vid = d.o",
                        ([n for n, _ in supersede], [o for _, o in supersede]),
                    )
                await conn.execute("COMMIT")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")  # a no-op (warning) outside a transaction
            raise self._error(exc) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise
        self._rows += len(plan.versions)
        self._since_stats += len(plan.versions)
        if statistics_due(self._since_stats, self._rows):
            self._refresh_statistics()

    async def _query(
        self, sql: str, args: Sequence[Any], *, rows: bool = True
    ) -> list[tuple[Any, ...]]:
        import psycopg

        if not self._all:
            raise BackendError("the search index is not open", backend="search-index")
        conn = await self._pool.get()
        try:
            cur = await conn.execute(_pg(sql), args)
            return list(await cur.fetchall()) if rows else []
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._pool.put_nowait(conn)

    async def optimize(self) -> None:
        """Refresh the planner's statistics (``ANALYZE``; autovacuum also does it as the
        tables grow). Raises BackendError."""
        for table in ("versions", "tokens", "refs", "labels"):
            await self._query(f"ANALYZE {table}", [], rows=False)

    async def snapshot(self) -> int:
        """The newest committed row id. Raises BackendError."""
        rows = await self._query("SELECT COALESCE(max(vid), 0) FROM versions", [])
        return int(rows[0][0])

    async def search(self, query: Query) -> list[Hit]:
        """The page of matches. Raises BackendError."""
        sql, args = compile_query(query)
        return [Hit(*row) for row in await self._query(sql, args)]

    async def indexed(self, custodian: str) -> set[tuple[str, int]]:
        """Every (record, version) indexed of ``custodian``. Raises BackendError."""
        rows = await self._query(_INDEXED, [custodian])
        return {(str(r), int(v)) for r, v in rows}

    async def count(self, query: Query) -> int:
        """How many match. Raises BackendError."""
        sql, args = compile_query(query, count=True)
        return int((await self._query(sql, args))[0][0])

    async def meta_of(self, custodian: str, record: str, version: int) -> RecordMeta | None:
        """One version's consent metadata (one query). Raises BackendError."""
        rows = await self._query(_META, [custodian, record, version] * 3)
        return _meta_of_rows(custodian, rows)

    async def clear(self, custodian: str) -> None:
        """Forget a custodian's rows. Raises BackendError."""
        import psycopg

        if self._writer is None:
            raise BackendError("the search index is not open", backend="search-index")
        async with self._write_lock:
            try:
                async with self._writer.transaction():
                    for stmt in _CLEAR:
                        await self._writer.execute(_pg(stmt), (custodian,))
            except psycopg.Error as exc:
                raise self._error(exc) from exc


def open_index(profile: str, *, data_dir: Path, postgres_url: str) -> SearchIndex:
    """The index store of a profile (not yet opened): SQLite under ``data_dir/search`` for the
    embedded profile, PostgreSQL at ``postgres_url`` for production. Raises nothing."""
    if profile == "production":
        return PostgresIndex(postgres_url)
    return SqliteIndex(data_dir / "search" / "index.sqlite3")
