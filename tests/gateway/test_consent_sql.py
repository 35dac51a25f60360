"""The consent search filter inside the index query (gateway/search/index.py ``filter_sql``,
``consent_sql``, ``meta_of``): a property test that, for random consent filters and random
indexed records, the SQL selects exactly the records ``Filter.matches`` accepts, on SQLite and
on PostgreSQL (the real service), and that ``meta_of`` reports what the filter is matched on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.access import PatientFilter, SearchFilter
from gateway.consent import ALL, NOTHING, And, DateIn, Filter, In, Not, Or, RecordMeta
from gateway.search.extract import CONSENT_CODE_PARAMS, IndexEntry
from gateway.search.index import (
    _DDL,
    PostgresIndex,
    Query,
    SqliteIndex,
    _pg,
    _rows,
    _version_row,
    compile_query,
    consent_sql,
    filter_sql,
    micros,
    statistics_due,
)
from tests.services.harness import Services

TYPES = ("Observation", "Condition", "Patient")
CUSTODIANS = ("clinic", "hospital")
CODES = ("s1|c1", "s1|c2", "s2|c1", "|c3")
LABELS = ("L|R", "L|HIV", "M|x")
PATIENTS = ("p1", "p2", "p3")
BASE = datetime(2026, 1, 1, tzinfo=UTC)
DATES = tuple(BASE + timedelta(days=d, microseconds=m) for d in (0, 1, 2, 3) for m in (0, 1))


class Store(Protocol):
    def reset(self) -> None: ...

    def add(self, entries: Sequence[IndexEntry]) -> None: ...

    def select(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]: ...


class SqliteStore:
    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        for stmt in _DDL:
            self.db.execute(stmt)

    def reset(self) -> None:
        for table in ("versions", "tokens", "refs", "labels"):
            self.db.execute(f"DELETE FROM {table}")

    def add(self, entries: Sequence[IndexEntry]) -> None:
        for vid, e in enumerate(entries, 1):
            self.db.execute(
                f"INSERT INTO versions VALUES ({','.join('?' * 11)})", _version_row(e, vid, None)
            )
            tokens, _refs, labels = _rows(e, vid)
            self.db.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?)", tokens)
            self.db.executemany("INSERT INTO labels VALUES (?, ?)", labels)

    def select(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, args).fetchall()


class PostgresStore:
    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.conn.execute(f"CREATE SCHEMA {self.schema}")
        self.conn.execute(f"SET search_path TO {self.schema}")
        for stmt in _DDL:
            self.conn.execute(stmt)

    def reset(self) -> None:
        self.conn.execute("TRUNCATE versions, tokens, refs, labels")

    def add(self, entries: Sequence[IndexEntry]) -> None:
        with self.conn.cursor() as cur:
            for vid, e in enumerate(entries, 1):
                cur.execute(
                    _pg(f"INSERT INTO versions VALUES ({','.join('?' * 11)})"),
                    _version_row(e, vid, None),
                )
                tokens, _refs, labels = _rows(e, vid)
                if tokens:
                    cur.executemany("INSERT INTO tokens VALUES (%s, %s, %s, %s)", tokens)
                if labels:
                    cur.executemany("INSERT INTO labels VALUES (%s, %s)", labels)

    def select(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(_pg(sql), args).fetchall())

    def close(self) -> None:
        self.conn.execute(f"DROP SCHEMA {self.schema} CASCADE")
        self.conn.close()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.services),
    ],
)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "sqlite":
        yield SqliteStore()
        return
    services: Services = request.getfixturevalue("services")
    pg = PostgresStore(services.postgres_url)
    try:
        yield pg
    finally:
        pg.close()


# ---- strategies -----------------------------------------------------------------------------


@st.composite
def records(draw: st.DrawFn) -> IndexEntry:
    tokens = draw(
        st.lists(
            st.tuples(
                st.sampled_from((*CONSENT_CODE_PARAMS, "identifier", "status")),
                st.sampled_from(CODES),
            ),
            max_size=4,
        )
    )
    date = draw(st.none() | st.sampled_from(DATES))
    return IndexEntry(
        custodian=draw(st.sampled_from(CUSTODIANS)),
        record=uuid.uuid4().hex,
        resource_type=draw(st.sampled_from(TYPES)),
        resource_id=uuid.uuid4().hex[:8],
        version=1,
        last_updated=0,
        patient=draw(st.sampled_from(PATIENTS)),
        date_lo=None if date is None else micros(date),
        date_hi=None,
        tokens=[(p, *code.split("|", 1)) for p, code in tokens],  # type: ignore[misc]
        labels=draw(st.lists(st.sampled_from(LABELS), max_size=2)),
    )


def meta_of_entry(e: IndexEntry) -> RecordMeta:
    return RecordMeta(
        resource_type=e.resource_type,
        custodian=e.custodian,
        codes=frozenset(f"{s}|{c}" for p, s, c in e.tokens if p in CONSENT_CODE_PARAMS),
        clinical_date=None
        if e.date_lo is None
        else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=e.date_lo),
        labels=frozenset(e.labels),
    )


def atoms() -> st.SearchStrategy[Filter]:
    def values(domain: Sequence[str]) -> st.SearchStrategy[frozenset[str]]:
        return st.frozensets(st.sampled_from(domain), max_size=3)

    return st.one_of(
        st.builds(In, st.just("custodian"), values(CUSTODIANS)),
        st.builds(In, st.just("type"), values(TYPES)),
        st.builds(In, st.just("code"), values(CODES)),
        st.builds(In, st.just("label"), values(LABELS)),
        st.builds(DateIn, st.none() | st.sampled_from(DATES), st.none() | st.sampled_from(DATES)),
        st.sampled_from((ALL, NOTHING)),
    )


filters: st.SearchStrategy[Filter] = st.recursive(
    atoms(),
    lambda inner: st.one_of(
        st.builds(And, st.lists(inner, max_size=3).map(tuple)),
        st.builds(Or, st.lists(inner, max_size=3).map(tuple)),
        st.builds(Not, inner),
    ),
    max_leaves=8,
)

patient_sets = st.none() | st.frozensets(st.sampled_from(PATIENTS), max_size=2)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---- properties -----------------------------------------------------------------------------


@SETTINGS
@given(entries=st.lists(records(), min_size=1, max_size=12), where=filters)
def test_filter_sql_agrees_with_matches(
    store: Store, entries: list[IndexEntry], where: Filter
) -> None:
    """For random records and filters, the SQL condition selects exactly the records whose
    metadata the filter matches."""
    store.reset()
    store.add(entries)
    args: list[Any] = []
    sql = f"SELECT v.record FROM versions v WHERE {filter_sql(where, args)}"
    got = {str(r[0]) for r in store.select(sql, args)}
    want = {e.record for e in entries if where.matches(meta_of_entry(e))}
    assert got == want, where


@SETTINGS
@given(
    entries=st.lists(records(), min_size=1, max_size=12),
    terms=st.lists(st.tuples(patient_sets, filters), max_size=3),
)
def test_consent_terms_agree_with_matches(
    store: Store, entries: list[IndexEntry], terms: list[tuple[frozenset[str] | None, Filter]]
) -> None:
    """A consent search filter (terms per patient, one for everyone else) inside the whole
    query and its count: a record is returned when its patient's term (or, if no term names
    its patient, the catch-all term) matches it."""
    store.reset()
    store.add(entries)
    consent = tuple(PatientFilter(p, w) for p, w in terms)
    named = {p for t in consent if t.patients is not None for p in t.patients}

    def allowed(e: IndexEntry) -> bool:
        meta = meta_of_entry(e)
        return any(
            (e.patient in t.patients if t.patients is not None else e.patient not in named)
            and t.where.matches(meta)
            for t in consent
        )

    for custodian in CUSTODIANS:
        q = Query(custodian, None, filter=SearchFilter(consent=consent), snapshot=10**9, limit=100)
        sql, args = compile_query(q)
        got = {str(r[2]) for r in store.select(sql, args)}
        want = {e.resource_id for e in entries if e.custodian == custodian and allowed(e)}
        assert got == want
        sql, args = compile_query(q, count=True)
        assert int(store.select(sql, args)[0][0]) == len(want)


def test_no_terms_match_nothing() -> None:
    args: list[Any] = []
    assert consent_sql((), args) == "1=0" and args == []


async def test_meta_of_on_sqlite(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite3")
    await index.open()
    try:
        await _check_meta_of(index)
    finally:
        await index.close()


@pytest.mark.services
async def test_meta_of_on_postgres(services: Services) -> None:
    import psycopg

    schema = f"m_{uuid.uuid4().hex[:12]}"
    url = services.postgres_url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    index = PostgresIndex(f"{url}{sep}options=-csearch_path%3D{schema}")
    await index.open()
    try:
        await _check_meta_of(index)
    finally:
        await index.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def _check_meta_of(index: SqliteIndex | PostgresIndex) -> None:
    """meta_of returns the indexed version's type, codes and categories (not identifiers or
    status), clinical date and labels; None for an unknown version or a deletion."""
    when = BASE + timedelta(microseconds=7)
    entry = IndexEntry(
        custodian="clinic",
        record="r1",
        resource_type="Observation",
        resource_id="o1",
        version=1,
        last_updated=0,
        patient="p1",
        date_lo=micros(when),
        tokens=[("code", "s1", "c1"), ("category", "", "lab"), ("identifier", "s1", "c2")],
        labels=["L|R"],
    )
    plain = IndexEntry("clinic", "r2", "Patient", "p1", 1, 0, "p1")
    tombstone = IndexEntry("clinic", "r2", "", "", 2, 0, "")
    await index.add([entry, plain])
    await index.add([tombstone])
    meta = await index.meta_of("clinic", "r1", 1)
    assert meta == RecordMeta(
        "Observation", "clinic", frozenset({"s1|c1", "|lab"}), when, frozenset({"L|R"})
    )
    assert await index.meta_of("clinic", "r2", 1) == RecordMeta("Patient", "clinic")
    assert await index.meta_of("clinic", "r2", 2) is None  # the deletion
    assert await index.meta_of("clinic", "r1", 2) is None
    assert await index.meta_of("hospital", "r1", 1) is None


def test_statistics_are_due_at_each_doubling_from_a_thousand_versions() -> None:
    assert not statistics_due(999, 0)
    assert statistics_due(1000, 0)
    assert statistics_due(1000, 1999)
    assert not statistics_due(1000, 2002)
    assert statistics_due(5000, 10_000) and not statistics_due(4999, 10_000)


@pytest.mark.services
async def test_postgres_refreshes_its_statistics_as_the_index_grows(services: Services) -> None:
    """A young index's planner statistics are refreshed at open and once it has doubled
    (without it, the current-row lookup of every write scanned every current row until
    autovacuum's first ANALYZE, about a minute in: docs/benchmarks.md)."""
    import psycopg

    schema = f"s_{uuid.uuid4().hex[:12]}"
    url = services.postgres_url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def analyzed() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT analyze_count FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = 'versions'",
                (schema,),
            ).fetchone()
        return 0 if row is None else int(row[0])

    async def settled(at_least: int) -> int:
        for _ in range(100):  # the statistics are refreshed in the background
            if (count := analyzed()) >= at_least:
                return count
            await asyncio.sleep(0.1)
        return analyzed()

    sep = "&" if "?" in url else "?"
    index = PostgresIndex(f"{url}{sep}options=-csearch_path%3D{schema}")
    await index.open()
    try:
        at_open = await settled(1)
        assert at_open >= 1
        entries = [
            IndexEntry("clinic", f"r{n}", "Observation", f"o{n}", 1, 0, "p1") for n in range(999)
        ]
        await index.add(entries)
        await asyncio.sleep(0.5)
        assert analyzed() == at_open  # 999 versions: not due yet
        await index.add([IndexEntry("clinic", "r-last", "Observation", "o-last", 1, 0, "p1")])
        assert await settled(at_open + 1) == at_open + 1
    finally:
        await index.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
