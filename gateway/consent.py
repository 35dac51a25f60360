"""Consent evaluation: FHIR R4 ``Consent`` (scope ``patient-privacy``) as a pure function.

Pure: no I/O and no clock (the time of the access is part of the query). The caller gathers a
patient's consents (and the institution's administrative default, which is a Consent like any
other, see :func:`default_consent`), compiles them once per consent version with
:func:`compile_policy` (validation with located errors) and keeps the :class:`Policy`; every
read asks :meth:`Policy.evaluate` with the record's index metadata before anything is
decrypted, and every search asks :meth:`Policy.search_filter` for a :class:`Filter` that the
index applies before counting and paging.

Semantics (docs/architecture.md, "Consent evaluation", says the same with the reasons):

- Only ``status: active`` consents count (``inactive`` is a revocation; draft, proposed,
  rejected and entered-in-error never applied). A consent whose ``dateTime`` is after the
  access is not yet in force; ``provision.period`` bounds when a provision (the root one: the
  whole consent) applies, so an expired consent or exception no longer matches.
- A provision matches a request when every element it has matches (elements are a
  conjunction, the entries of one element a disjunction): ``actor`` (the requester: an
  ``Organization/{institution}``, a ``Practitioner/{user}``, a role coding, or several of them
  in one entry, which must all hold), ``action`` (R4 consent-action codes), ``purpose`` (v3
  ActReason; a provision for ``TREAT`` also covers the specialisations ``ETREAT``,
  ``CLINTRL`` and ``POPHLTH``, one for ``HRESCH`` covers ``CLINTRCH``), ``class`` (resource
  types), ``code`` (any of the record's ``system|code``), ``period`` (the time of access),
  ``dataPeriod`` (the record's clinical date; a record without one does not match),
  ``securityLabel`` (any of the record's labels).
- Nested provisions are exceptions: they are looked at only where their parent matches, and
  a matching exception overrides its parent (a nested provision without ``type`` has the
  opposite type of its parent). The provisions left (matching, with no matching exception)
  compete across all consents: the most specific decides, specificity being the number of
  distinct elements constrained on the provision's path from its root (``actor``,
  ``custodian``, ``action``, ``purpose``, ``class``, ``code``, ``dataPeriod``,
  ``securityLabel``; ``period`` is when, not what, and does not count). Deny wins at the same
  specificity, inside a consent and across consents. Nothing matching is a deny.
- Sensitive security labels (confidentiality ``R``/``V`` and the v3 ActCode categories such
  as ``HIV``, ``PSY``, ``ETH``, ``SDV``; :data:`SENSITIVE_LABELS`, replaceable per policy)
  need an explicit permit: a permit applies to a record only when every sensitive label the
  record carries is named in a ``securityLabel`` on the permit's path.
- The custodian is modelled as an actor with role ``CST`` (v3 ParticipationType
  "custodian") and ``reference: Organization/{institution}``; it constrains the record's
  custodian, not the requester. Reasons: R4 defines ``actor.role`` as how the party is
  involved in the resources the provision controls, and the custodian is exactly such a
  party, so a Consent written this way is valid R4 that other systems read the same way; a
  dedicated element would need an extension nobody else understands. Any other actor entry
  (role ``IRCP``/``PRCP`` or any other participation type, or a role coding of another
  system, which must match the requester's role) is about the requester.
- The institution-wide default (the custodian reads its own records for treatment, everyone
  else is denied) is an administrative Consent: :func:`default_consent`.
- Break-glass: a request denied by policy with purpose ``ETREAT``, a stated reason and a
  caller allowed to break the glass (``may_break_glass``, the caller's decision) is permitted,
  and the :class:`Decision` says so, so that the access log flags it.

Elements that would change the meaning if ignored and are not supported (``provision.data``,
references to other actor kinds, codings of unknown systems) are refused, never skipped.

Raises :class:`gateway.errors.InvalidInputError` (with ``location``, a FHIRPath inside the
Consent such as ``Consent.provision.provision[1].actor[0].reference``) from
:func:`compile_policy`, and from :class:`AccessQuery` / :class:`RecordMeta` when built with a
naive datetime or an unknown action.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeAlias

from gateway.errors import InvalidInputError

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

MAX_DEPTH = 5
"""Provision nesting levels allowed below the root (``provision.provision...``)."""
MAX_PROVISIONS = 64
"""Provisions (root and nested) allowed in one Consent."""
MAX_CONSENTS = 256
"""Consents allowed per patient (the administrative default included)."""
MAX_ENTRIES = 64
"""Entries allowed in one element (actors, codes, labels ...) of one provision."""

SENSITIVE_LABELS: frozenset[str] = frozenset(
    [f"{CONFIDENTIALITY}|{c}" for c in ("R", "V")]
    + [
        f"{ACT_CODE}|{c}"
        for c in ("HIV", "PSY", "ETH", "SDV", "SEX", "STD", "GDIS", "SCA", "SICKLE", "DRGIS")
    ]
)
"""Security labels (``system|code``) whose records need an explicit permit."""

Action = Literal["access", "use", "disclose", "correct", "collect"]
ACTIONS: frozenset[str] = frozenset(("access", "use", "disclose", "correct", "collect"))

PURPOSE_PARENTS: Mapping[str, str] = {
    "ETREAT": "TREAT",
    "CLINTRL": "TREAT",
    "POPHLTH": "TREAT",
    "CLINTRCH": "HRESCH",
}
"""v3 ActReason specialisations: a provision for the parent also covers the child."""

_STATUSES = frozenset(("draft", "proposed", "active", "rejected", "inactive", "entered-in-error"))
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?"
    r"(Z|[+-]\d{2}:\d{2}))?)?)?"
)
_DIMENSIONS = (
    "actor",
    "custodian",
    "action",
    "purpose",
    "class",
    "code",
    "dataPeriod",
    "securityLabel",
)


# --------------------------------------------------------------------------------------------
# queries and decisions


def _aware(value: datetime | None, what: str) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise InvalidInputError(f"{what} must be timezone-aware", location=what)


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """A record's index metadata, all that consent looks at: resource type, codes
    (``system|code``), clinical date (None: unknown), custodian institution and security
    labels (``system|code``). Raises InvalidInputError for a naive clinical date."""

    resource_type: str
    custodian: str
    codes: frozenset[str] = frozenset()
    clinical_date: datetime | None = None
    labels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _aware(self.clinical_date, "RecordMeta.clinical_date")


@dataclass(frozen=True, slots=True)
class AccessQuery:
    """One access request: who asks (institution, practitioner id or None, role as
    ``system|code`` or None), why (purpose of use, a v3 ActReason code), what for (a
    consent-action code), when (``at``, timezone-aware), break-glass (the stated reason, and
    whether the caller's registration allows it), and the record's metadata (None for a
    search, see :meth:`Policy.search_filter`).

    Raises InvalidInputError for a naive ``at`` or an unknown action."""

    institution: str
    purpose: str
    at: datetime
    user: str | None = None
    role: str | None = None
    action: Action = "access"
    break_glass_reason: str | None = None
    may_break_glass: bool = False
    record: RecordMeta | None = None

    def __post_init__(self) -> None:
        _aware(self.at, "AccessQuery.at")
        if self.action not in ACTIONS:
            raise InvalidInputError(
                f"unknown consent action {self.action!r}", location="AccessQuery.action"
            )

    @property
    def breaks_glass(self) -> bool:
        """Whether this request may break the glass: purpose ETREAT, a stated reason and a
        caller allowed to."""
        return (
            self.may_break_glass
            and self.purpose == "ETREAT"
            and bool(self.break_glass_reason and self.break_glass_reason.strip())
        )


@dataclass(frozen=True, slots=True)
class Match:
    """A provision that applied to the request and was not overridden by an exception:
    its consent, path, type and specificity (what ``$explain`` lists)."""

    consent_id: str
    path: str
    type: Literal["permit", "deny"]
    specificity: int
    elements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one :class:`AccessQuery`: permitted or not, the consent and provision
    path that decided (None when nothing matched or the glass was broken), whether it was
    break-glass, a reason for logs and ``$explain`` (element names and ids only, never patient
    data or the stated break-glass reason) and every provision that competed."""

    permitted: bool
    consent_id: str | None
    path: str | None
    reason: str
    break_glass: bool = False
    matches: tuple[Match, ...] = ()


# --------------------------------------------------------------------------------------------
# search filters: a small boolean expression over record metadata


@dataclass(frozen=True, slots=True)
class In:
    """The record's ``field`` (custodian, type) is one of ``values``; for the set-valued
    fields (code, label) the record has at least one of them."""

    field: Literal["custodian", "type", "code", "label"]
    values: frozenset[str]

    def matches(self, record: RecordMeta) -> bool:
        """Whether the record satisfies this atom."""
        if self.field == "custodian":
            return record.custodian in self.values
        if self.field == "type":
            return record.resource_type in self.values
        if self.field == "code":
            return not self.values.isdisjoint(record.codes)
        return not self.values.isdisjoint(record.labels)


@dataclass(frozen=True, slots=True)
class DateIn:
    """The record's clinical date is known and ``start <= date < end`` (None: unbounded)."""

    start: datetime | None
    end: datetime | None

    def matches(self, record: RecordMeta) -> bool:
        """Whether the record satisfies this atom."""
        return _in_range(record.clinical_date, self.start, self.end)


@dataclass(frozen=True, slots=True)
class And:
    """All terms hold (``And(())`` is true)."""

    terms: tuple[Filter, ...]

    def matches(self, record: RecordMeta) -> bool:
        """Whether the record satisfies every term."""
        return all(t.matches(record) for t in self.terms)


@dataclass(frozen=True, slots=True)
class Or:
    """At least one term holds (``Or(())`` is false)."""

    terms: tuple[Filter, ...]

    def matches(self, record: RecordMeta) -> bool:
        """Whether the record satisfies some term."""
        return any(t.matches(record) for t in self.terms)


@dataclass(frozen=True, slots=True)
class Not:
    """The term does not hold."""

    term: Filter

    def matches(self, record: RecordMeta) -> bool:
        """Whether the record fails the term."""
        return not self.term.matches(record)


Filter: TypeAlias = In | DateIn | And | Or | Not
"""What a search may return, over :class:`RecordMeta` fields; translates directly to an
index query's WHERE clause. :data:`ALL` and :data:`NOTHING` are the constants."""
ALL: Filter = And(())
NOTHING: Filter = Or(())


def _and(*terms: Filter) -> Filter:
    out: list[Filter] = []
    for t in terms:
        if t == NOTHING:
            return NOTHING
        if isinstance(t, And):
            out.extend(t.terms)
        else:
            out.append(t)
    return out[0] if len(out) == 1 else And(tuple(dict.fromkeys(out)))


def _or(*terms: Filter) -> Filter:
    out: list[Filter] = []
    for t in terms:
        if t == ALL:
            return ALL
        if isinstance(t, Or):
            out.extend(t.terms)
        else:
            out.append(t)
    return out[0] if len(out) == 1 else Or(tuple(dict.fromkeys(out)))


def _not(term: Filter) -> Filter:
    if term == ALL:
        return NOTHING
    if term == NOTHING:
        return ALL
    if isinstance(term, Not):
        return term.term
    return Not(term)


# --------------------------------------------------------------------------------------------
# the compiled form


def _in_range(value: datetime | None, start: datetime | None, end: datetime | None) -> bool:
    if value is None:
        return False
    return (start is None or start <= value) and (end is None or value < end)


@dataclass(frozen=True, slots=True)
class _Actor:
    institution: str | None
    user: str | None
    roles: frozenset[str] | None

    def matches(self, q: AccessQuery) -> bool:
        return (
            (self.institution is None or self.institution == q.institution)
            and (self.user is None or self.user == q.user)
            and (self.roles is None or q.role in self.roles)
        )


@dataclass(slots=True)
class _Node:
    consent_id: str
    path: str
    permit: bool
    specificity: int
    elements: tuple[str, ...]
    period: tuple[datetime | None, datetime | None] | None
    actors: tuple[_Actor, ...] | None
    actions: frozenset[str] | None
    purposes: frozenset[str] | None
    custodians: frozenset[str] | None
    classes: frozenset[str] | None
    codes: frozenset[str] | None
    labels: frozenset[str] | None
    data_period: tuple[datetime | None, datetime | None] | None
    named_labels: frozenset[str]  # securityLabel entries on the path (explicit permits)
    children: list[_Node] = field(default_factory=list)

    def requester_matches(self, q: AccessQuery, purposes: tuple[str, ...]) -> bool:
        if self.period is not None and not _in_range(q.at, *self.period):
            return False
        if self.actions is not None and q.action not in self.actions:
            return False
        if self.purposes is not None and self.purposes.isdisjoint(purposes):
            return False
        return self.actors is None or any(a.matches(q) for a in self.actors)

    def record_matches(self, r: RecordMeta) -> bool:
        if self.custodians is not None and r.custodian not in self.custodians:
            return False
        if self.classes is not None and r.resource_type not in self.classes:
            return False
        if self.codes is not None and self.codes.isdisjoint(r.codes):
            return False
        if self.labels is not None and self.labels.isdisjoint(r.labels):
            return False
        return self.data_period is None or _in_range(r.clinical_date, *self.data_period)

    def record_filter(self) -> Filter:
        terms: list[Filter] = []
        if self.custodians is not None:
            terms.append(In("custodian", self.custodians))
        if self.classes is not None:
            terms.append(In("type", self.classes))
        if self.codes is not None:
            terms.append(In("code", self.codes))
        if self.labels is not None:
            terms.append(In("label", self.labels))
        if self.data_period is not None:
            terms.append(DateIn(*self.data_period))
        return _and(*terms)

    def match(self) -> Match:
        return Match(
            self.consent_id,
            self.path,
            "permit" if self.permit else "deny",
            self.specificity,
            self.elements,
        )


@dataclass(frozen=True, slots=True)
class _Consent:
    id: str
    not_before: datetime | None
    root: _Node


def _purposes_of(code: str) -> tuple[str, ...]:
    out = [code]
    while code in PURPOSE_PARENTS and len(out) < 8:
        code = PURPOSE_PARENTS[code]
        out.append(code)
    return tuple(out)


class Policy:
    """A patient's compiled consents (built by :func:`compile_policy`; immutable, safe to
    cache and share). :meth:`evaluate` decides one record access, :meth:`search_filter` says
    which records a search may return."""

    __slots__ = (
        "_anyone",
        "_by_institution",
        "_consents",
        "consent_ids",
        "inactive_ids",
        "sensitive",
    )

    def __init__(
        self,
        consents: tuple[_Consent, ...],
        *,
        inactive_ids: tuple[str, ...],
        sensitive: frozenset[str],
    ) -> None:
        self._consents = consents
        # Index by requester institution: a consent whose root provision names institutions
        # (and nothing else of the requester) is looked at only for them; the others for
        # everyone. Order kept, so which consent is named in a decision does not depend on it.
        anyone: list[int] = []
        named: dict[str, list[int]] = {}
        for i, c in enumerate(consents):
            actors = c.root.actors
            if actors is None or any(a.institution is None for a in actors):
                anyone.append(i)
            else:
                for inst in {a.institution for a in actors if a.institution is not None}:
                    named.setdefault(inst, []).append(i)
        self._anyone = tuple(consents[i] for i in anyone)
        self._by_institution = {
            inst: tuple(consents[i] for i in sorted([*anyone, *idx])) for inst, idx in named.items()
        }
        self.consent_ids = tuple(c.id for c in consents)
        """Ids of the active consents, in the order given."""
        self.inactive_ids = inactive_ids
        """Ids of the consents that do not count (revoked, draft, rejected ...)."""
        self.sensitive = sensitive
        """Security labels that need an explicit permit."""

    def _frontier(
        self,
        node: _Node,
        q: AccessQuery,
        purposes: tuple[str, ...],
        r: RecordMeta,
        sensitive: frozenset[str],
        out: list[_Node],
    ) -> bool:
        if not (node.requester_matches(q, purposes) and node.record_matches(r)):
            return False
        overridden = False
        for child in node.children:
            if self._frontier(child, q, purposes, r, sensitive, out):
                overridden = True
        if overridden:
            return True
        if node.permit and not sensitive <= node.named_labels:
            return False
        out.append(node)
        return True

    def evaluate(self, query: AccessQuery) -> Decision:
        """Decide one access to the record in ``query.record``.

        Raises InvalidInputError when the query carries no record metadata."""
        record = query.record
        if record is None:
            raise InvalidInputError(
                "evaluate needs the record's metadata", location="AccessQuery.record"
            )
        purposes = _purposes_of(query.purpose)
        sensitive = record.labels & self.sensitive
        found: list[_Node] = []
        for consent in self._by_institution.get(query.institution, self._anyone):
            if consent.not_before is not None and query.at < consent.not_before:
                continue
            self._frontier(consent.root, query, purposes, record, sensitive, found)
        best: _Node | None = None
        for node in found:
            if (
                best is None
                or node.specificity > best.specificity
                or (node.specificity == best.specificity and best.permit and not node.permit)
            ):
                best = node
        matches = tuple(n.match() for n in found)
        if best is not None and best.permit:
            return Decision(
                True,
                best.consent_id,
                best.path,
                f"permitted by Consent/{best.consent_id} {best.path}"
                f" (specificity {best.specificity}: {', '.join(best.elements) or 'no element'})",
                matches=matches,
            )
        if query.breaks_glass:
            return Decision(
                True,
                None,
                None,
                "break-glass: emergency treatment with a stated reason"
                + (
                    f", overriding Consent/{best.consent_id} {best.path}"
                    if best is not None
                    else ""
                ),
                break_glass=True,
                matches=matches,
            )
        if best is None:
            return Decision(False, None, None, "denied: no provision applies", matches=matches)
        return Decision(
            False,
            best.consent_id,
            best.path,
            f"denied by Consent/{best.consent_id} {best.path}"
            f" (specificity {best.specificity}: {', '.join(best.elements) or 'no element'})",
            matches=matches,
        )

    def search_filter(self, query: AccessQuery) -> Filter:
        """The records a search by this requester may return, as a :class:`Filter` over
        record metadata (``query.record`` is ignored): for every record,
        ``search_filter(q).matches(r) == evaluate(q with record r).permitted``.

        Built per specificity level: the permits at level k that are not overridden by an
        exception, and no deny at level k or above that is not overridden. Raises nothing."""
        if query.breaks_glass:
            return ALL
        purposes = _purposes_of(query.purpose)
        sensitive_all = self.sensitive
        permits: dict[int, list[Filter]] = {}
        denies: dict[int, list[Filter]] = {}

        def walk(node: _Node, path_filter: Filter) -> Filter:
            # Returns "node or one of its descendants applies"; records frontier filters.
            if not node.requester_matches(query, purposes):
                return NOTHING
            here = _and(path_filter, node.record_filter())
            if here == NOTHING:
                return NOTHING
            below = _or(*(walk(c, here) for c in node.children))
            applies = (
                _and(here, _not(In("label", sensitive_all - node.named_labels)))
                if node.permit and sensitive_all - node.named_labels
                else here
            )
            frontier = _and(applies, _not(below))
            if frontier != NOTHING:
                (permits if node.permit else denies).setdefault(node.specificity, []).append(
                    frontier
                )
            return _or(applies, below)

        for consent in self._by_institution.get(query.institution, self._anyone):
            if consent.not_before is not None and query.at < consent.not_before:
                continue
            walk(consent.root, ALL)
        levels: list[Filter] = []
        for level, terms in permits.items():
            stronger = [t for k, ts in denies.items() if k >= level for t in ts]
            levels.append(_and(_or(*terms), _not(_or(*stronger))))
        return _or(*levels)


# --------------------------------------------------------------------------------------------
# compiling (and validating) consents


def _fail(message: str, location: str, index: int, consent_id: str | None) -> InvalidInputError:
    which = f"Consent {consent_id}" if consent_id else f"consent [{index}]"
    return InvalidInputError(f"{which}: {message}", location=location)


class _Compiler:
    def __init__(self, index: int, consent_id: str | None) -> None:
        self.index = index
        self.consent_id = consent_id
        self.count = 0

    def error(self, message: str, location: str) -> InvalidInputError:
        return _fail(message, location, self.index, self.consent_id)

    def instant(self, value: object, location: str, *, end: bool) -> datetime:
        if not isinstance(value, str):
            raise self.error("a date or dateTime string is expected", location)
        m = _DATE.fullmatch(value)
        if m is None:
            raise self.error(f"not a FHIR date or dateTime: {value!r}", location)
        year, month, day, hh, mi, ss, frac, tz = m.groups()
        try:
            if hh is None:
                start = datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
                if not end:
                    return start
                if day is not None:
                    return start + timedelta(days=1)
                if month is not None:
                    y, mo = (
                        (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
                    )
                    return start.replace(year=y, month=mo)
                return start.replace(year=start.year + 1)
            stamp = datetime.fromisoformat(
                f"{year}-{month}-{day}T{hh}:{mi}:{ss or '00'}{(frac or '')[:7]}"
                + ("+00:00" if tz == "Z" else tz)
            )
        except ValueError as exc:
            raise self.error(f"not a valid date: {value!r}", location) from exc
        if not end:
            return stamp
        return stamp + (
            timedelta(microseconds=1)
            if frac
            else timedelta(seconds=1)
            if ss
            else timedelta(minutes=1)
        )

    def period(self, value: object, location: str) -> tuple[datetime | None, datetime | None]:
        if not isinstance(value, Mapping):
            raise self.error("a Period object is expected", location)
        unknown = set(value) - {"start", "end", "id", "extension"}
        if unknown:
            raise self.error(f"unknown element {sorted(unknown)[0]!r}", location)
        start = (
            self.instant(value["start"], f"{location}.start", end=False)
            if "start" in value
            else None
        )
        stop = self.instant(value["end"], f"{location}.end", end=True) if "end" in value else None
        if start is not None and stop is not None and stop <= start:
            raise self.error("the period ends before it starts", location)
        return start, stop

    def entries(self, value: object, location: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error("a non-empty array is expected", location)
        if len(value) > MAX_ENTRIES:
            raise self.error(f"more than {MAX_ENTRIES} entries", location)
        return value

    def coding(self, value: object, location: str, *, systems: frozenset[str] | None) -> str:
        """``system|code`` of a Coding; ``systems`` are the allowed ones (a missing system
        is taken as the only allowed one when there is exactly one)."""
        if not isinstance(value, Mapping):
            raise self.error("a Coding object is expected", location)
        code = value.get("code")
        if not isinstance(code, str) or not code.strip():
            raise self.error("the coding has no code", f"{location}.code")
        system = value.get("system")
        if system is None and systems is not None and len(systems) == 1:
            system = next(iter(systems))
        if not isinstance(system, str) or not system:
            raise self.error("the coding has no system", f"{location}.system")
        if systems is not None and system not in systems:
            raise self.error(f"unsupported code system {system!r}", f"{location}.system")
        return f"{system}|{code}"

    def concept(self, value: object, location: str) -> list[tuple[str, str]]:
        if not isinstance(value, Mapping):
            raise self.error("a CodeableConcept object is expected", location)
        codings = self.entries(value.get("coding"), f"{location}.coding")
        out = []
        for i, c in enumerate(codings):
            sc = self.coding(c, f"{location}.coding[{i}]", systems=None)
            system, _, code = sc.partition("|")
            out.append((system, code))
        return out

    def reference(self, value: object, location: str) -> tuple[str, str]:
        if not isinstance(value, Mapping):
            raise self.error("a Reference object is expected", location)
        ref = value.get("reference")
        if not isinstance(ref, str):
            raise self.error("a literal reference (Type/id) is required", location)
        kind, _, ident = ref.partition("/")
        if kind not in ("Organization", "Practitioner") or not _ID.fullmatch(ident):
            raise self.error(
                f"only Organization/{{id}} and Practitioner/{{id}} references are supported,"
                f" not {ref[:80]!r}",
                location,
            )
        return kind, ident

    def actors(
        self, value: object, location: str
    ) -> tuple[tuple[_Actor, ...] | None, frozenset[str] | None]:
        requesters: list[_Actor] = []
        custodians: set[str] = set()
        for i, item in enumerate(self.entries(value, location)):
            here = f"{location}[{i}]"
            if not isinstance(item, Mapping):
                raise self.error("an actor object is expected", here)
            codings = self.concept(item["role"], f"{here}.role") if "role" in item else []
            participation = {code for system, code in codings if system == PARTICIPATION_TYPE}
            roles = frozenset(f"{s}|{c}" for s, c in codings if s != PARTICIPATION_TYPE)
            ref = (
                self.reference(item["reference"], f"{here}.reference")
                if "reference" in item
                else None
            )
            if "CST" in participation:
                if roles or len(participation) > 1:
                    raise self.error("a custodian actor has no other role", f"{here}.role")
                if ref is None or ref[0] != "Organization":
                    raise self.error("a custodian actor names an Organization", f"{here}.reference")
                custodians.add(ref[1])
                continue
            if ref is None and not roles:
                raise self.error("the actor names no organization, practitioner or role", here)
            requesters.append(
                _Actor(
                    ref[1] if ref and ref[0] == "Organization" else None,
                    ref[1] if ref and ref[0] == "Practitioner" else None,
                    roles or None,
                )
            )
        return (tuple(requesters) or None), (frozenset(custodians) or None)

    def provision(
        self, value: object, location: str, depth: int, parent: _Node | None, dims: frozenset[str]
    ) -> _Node:
        if not isinstance(value, Mapping):
            raise self.error("a provision object is expected", location)
        self.count += 1
        if self.count > MAX_PROVISIONS:
            raise self.error(f"more than {MAX_PROVISIONS} provisions in one consent", location)
        # Extensions may be ignored; a modifierExtension may not (it is refused below).
        supported = {
            "id",
            "type",
            "period",
            "actor",
            "action",
            "securityLabel",
            "purpose",
            "class",
            "code",
            "dataPeriod",
            "provision",
            "extension",
        }
        for key in value:
            if key not in supported:
                raise self.error(f"provision element {key!r} is not supported", f"{location}.{key}")
        kind = value.get("type")
        if kind is None:
            if parent is None:
                raise self.error("the root provision needs a type", f"{location}.type")
            permit = not parent.permit
        elif kind in ("permit", "deny"):
            permit = kind == "permit"
        else:
            raise self.error("type is 'permit' or 'deny'", f"{location}.type")
        own: set[str] = set()
        period = self.period(value["period"], f"{location}.period") if "period" in value else None
        actors: tuple[_Actor, ...] | None = None
        custodians: frozenset[str] | None = None
        if "actor" in value:
            actors, custodians = self.actors(value["actor"], f"{location}.actor")
            own |= {"actor"} if actors else set()
            own |= {"custodian"} if custodians else set()
        actions = None
        if "action" in value:
            actions = frozenset(
                c
                for i, cc in enumerate(self.entries(value["action"], f"{location}.action"))
                for c in self._codes(cc, f"{location}.action[{i}]", CONSENT_ACTION)
            )
            own.add("action")
        purposes = None
        if "purpose" in value:
            purposes = frozenset(
                self.coding(
                    c, f"{location}.purpose[{i}]", systems=frozenset((ACT_REASON,))
                ).partition("|")[2]
                for i, c in enumerate(self.entries(value["purpose"], f"{location}.purpose"))
            )
            own.add("purpose")
        classes = None
        if "class" in value:
            classes = frozenset(
                self.coding(
                    c, f"{location}.class[{i}]", systems=frozenset((RESOURCE_TYPES,))
                ).partition("|")[2]
                for i, c in enumerate(self.entries(value["class"], f"{location}.class"))
            )
            own.add("class")
        codes = None
        if "code" in value:
            codes = frozenset(
                f"{s}|{c}"
                for i, cc in enumerate(self.entries(value["code"], f"{location}.code"))
                for s, c in self.concept(cc, f"{location}.code[{i}]")
            )
            own.add("code")
        labels = None
        if "securityLabel" in value:
            labels = frozenset(
                self.coding(c, f"{location}.securityLabel[{i}]", systems=None)
                for i, c in enumerate(
                    self.entries(value["securityLabel"], f"{location}.securityLabel")
                )
            )
            own.add("securityLabel")
        data_period = None
        if "dataPeriod" in value:
            data_period = self.period(value["dataPeriod"], f"{location}.dataPeriod")
            own.add("dataPeriod")
        path_dims = dims | own
        node = _Node(
            consent_id=self.consent_id or f"[{self.index}]",
            path=location,
            permit=permit,
            specificity=len(path_dims),
            elements=tuple(d for d in _DIMENSIONS if d in path_dims),
            period=period,
            actors=actors,
            actions=actions,
            purposes=purposes,
            custodians=custodians,
            classes=classes,
            codes=codes,
            labels=labels,
            data_period=data_period,
            named_labels=(parent.named_labels if parent else frozenset()) | (labels or frozenset()),
        )
        if "provision" in value:
            if depth >= MAX_DEPTH:
                raise self.error(
                    f"provisions nest deeper than {MAX_DEPTH} levels", f"{location}.provision"
                )
            for i, child in enumerate(self.entries(value["provision"], f"{location}.provision")):
                node.children.append(
                    self.provision(child, f"{location}.provision[{i}]", depth + 1, node, path_dims)
                )
        return node

    def _codes(self, value: object, location: str, system: str) -> list[str]:
        out = []
        for s, c in self.concept(value, location):
            if s != system:
                raise self.error(f"unsupported code system {s!r}", f"{location}.coding")
            out.append(c)
        return out


def _consent_id(consent: object) -> str | None:
    if isinstance(consent, Mapping):
        ident = consent.get("id")
        if isinstance(ident, str) and _ID.fullmatch(ident):
            return ident
    return None


def compile_policy(
    consents: Sequence[Mapping[str, Any]], *, sensitive: frozenset[str] = SENSITIVE_LABELS
) -> Policy:
    """Validate and compile one patient's consents (and the administrative default) into a
    :class:`Policy`. Inactive consents are validated too (a bad revoked consent is still a
    bad input) and then kept aside. ``sensitive`` names the labels that need an explicit
    permit.

    Raises InvalidInputError naming the consent and the element (``location``) for anything
    invalid or unsupported, more than :data:`MAX_CONSENTS` consents, provisions nested deeper
    than :data:`MAX_DEPTH` or more than :data:`MAX_PROVISIONS` provisions in one consent."""
    if len(consents) > MAX_CONSENTS:
        raise InvalidInputError(
            f"more than {MAX_CONSENTS} consents for one patient", location="Consent"
        )
    active: list[_Consent] = []
    inactive: list[str] = []
    seen: set[str] = set()
    for index, consent in enumerate(consents):
        ident = _consent_id(consent)
        c = _Compiler(index, ident)
        if not isinstance(consent, Mapping) or consent.get("resourceType") != "Consent":
            raise c.error("not a Consent resource", "Consent.resourceType")
        if ident is None:
            raise c.error("a Consent needs a valid id", "Consent.id")
        if ident in seen:
            raise c.error("the same consent id is given twice", "Consent.id")
        seen.add(ident)
        if "modifierExtension" in consent:
            raise c.error("modifier extensions are not supported", "Consent.modifierExtension")
        status = consent.get("status")
        if status not in _STATUSES:
            raise c.error(f"unknown status {status!r}", "Consent.status")
        scope = consent.get("scope")
        codings = scope.get("coding") if isinstance(scope, Mapping) else None
        if not isinstance(codings, list) or not any(
            isinstance(x, Mapping)
            and x.get("code") == "patient-privacy"
            and x.get("system") in (None, CONSENT_SCOPE)
            for x in codings
        ):
            raise c.error("only scope patient-privacy is evaluated", "Consent.scope")
        not_before = (
            c.instant(consent["dateTime"], "Consent.dateTime", end=False)
            if "dateTime" in consent
            else None
        )
        if "provision" not in consent:
            raise c.error("a privacy consent needs a provision", "Consent.provision")
        root = c.provision(consent["provision"], "Consent.provision", 0, None, frozenset())
        if status == "active":
            active.append(_Consent(ident, not_before, root))
        else:
            inactive.append(ident)
    return Policy(tuple(active), inactive_ids=tuple(inactive), sensitive=sensitive)


def default_consent(
    institution: str, *, consent_id: str | None = None, sensitive: frozenset[str] = SENSITIVE_LABELS
) -> dict[str, Any]:
    """The institution-wide administrative default as a Consent: deny, except the custodian
    ``institution`` reading its own records for treatment (``TREAT``, which covers
    ``ETREAT``), sensitive ones included (a second permit names the ``sensitive`` labels, as
    every permit of a sensitive record must). Raises InvalidInputError for an institution
    that is not a valid id."""
    if not _ID.fullmatch(institution):
        raise InvalidInputError("not a valid institution id", location="institution")
    org = {"reference": f"Organization/{institution}"}
    own_for_treatment: dict[str, Any] = {
        "type": "permit",
        "actor": [
            {"role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "CST"}]}, "reference": org},
            {
                "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
                "reference": org,
            },
        ],
        "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
    }
    labels = [
        {"system": s, "code": c}
        for s, _, c in (label.partition("|") for label in sorted(sensitive))
    ]
    nested = [own_for_treatment] + (
        [{**own_for_treatment, "securityLabel": labels}] if labels else []
    )
    return {
        "resourceType": "Consent",
        "id": consent_id or f"default-{institution}"[:64],
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": {"type": "deny", "provision": nested},
    }
