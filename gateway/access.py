"""The access seam: the one place that decides whether a caller may read or write a record.

Every entry point (FHIR REST, HL7 v2 over MLLP or HTTP, imaging, later the federation API)
reaches records through :class:`gateway.records.RecordService`, which asks the gateway's
:class:`AccessPolicy` before it decrypts or stores anything. The policy decides from who is
calling (the authenticated caller, with its institution and purpose of use), what is asked
(:class:`AccessRequest`: the interaction, the resource type, the record's custodian and
patient pseudonym) and nothing else: never from the HTTP request, so every transport shares it.
Consent is evaluated behind this seam; until authentication and consent are configured the
policy is :class:`AllowAll`.

Raises :class:`AccessDeniedError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from gateway.consent import Filter, RecordMeta
from gateway.errors import GatewayError

Interaction = Literal[
    "read", "vread", "history", "create", "update", "delete", "search", "everything", "receipt"
]


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """What a caller asks of one record: the interaction, the resource type, the record's
    custodian (the institution whose gateway stores it) and its patient's pseudonym; for a
    stored record also its opaque id and version, and its index metadata (``meta``: codes,
    clinical date, security labels; None when not known, e.g. before it is stored)."""

    interaction: Interaction
    resource_type: str
    custodian: str
    patient: str
    record: str | None = None
    version: int | None = None
    meta: RecordMeta | None = None


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The outcome of one check: permitted or not, the consent (and its provision path) that
    decided (None: no consent was involved, e.g. the caller's own write, or nothing matched),
    whether the glass was broken, the patient's consent version the decision was taken
    against (the ledger index of their latest ``consent`` leaf, 0 for none), and a reason for
    logs and ``$explain`` (element names and ids only, never patient data)."""

    permitted: bool
    reason: str = ""
    consent_id: str | None = None
    path: str | None = None
    break_glass: bool = False
    consent_version: int = 0


PERMIT = AccessDecision(True, "no restriction")
"""The decision of a policy that restricts nothing."""


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """What a caller may find, applied by the search index in its query (before counting,
    paging and ``_include``): only records of these patient pseudonyms, custodians, resource
    types, and only records whose security labels (``system|code``) are all in ``labels``.
    None: no restriction on that dimension. The default restricts nothing."""

    patients: frozenset[str] | None = None
    custodians: frozenset[str] | None = None
    types: frozenset[str] | None = None
    labels: frozenset[str] | None = None

    consent: tuple[PatientFilter, ...] | None = None

    @property
    def unrestricted(self) -> bool:
        """Whether this filter lets everything through."""
        return (self.patients, self.custodians, self.types, self.labels, self.consent) == (
            None,
        ) * 5


@dataclass(frozen=True, slots=True)
class PatientFilter:
    """One term of a consent-based search filter: records of the patients ``patients`` (every
    pseudonym of them; None: of every patient not named by another term of the same filter)
    that satisfy ``where`` (a :data:`gateway.consent.Filter` over record metadata, which the
    search index translates into its query). A :class:`SearchFilter` with ``consent`` set
    returns only records matched by one of its terms (``()``: nothing)."""

    patients: frozenset[str] | None
    where: Filter


def caller_key(caller: object | None) -> str:
    """The stable string naming a caller, which search cursors are bound to (``anonymous``
    for None; else the caller's ``key`` or ``id`` attribute, else its ``str``). Raises
    nothing."""
    if caller is None:
        return "anonymous"
    for attr in ("key", "id", "client_id"):
        value = getattr(caller, attr, None)
        if isinstance(value, str) and value:
            return value
    return str(caller)


class AccessDeniedError(GatewayError):
    """The policy refused the request. ``reason`` says why, for logs and metrics (never
    patient data); a denied read is answered exactly like a missing record. ``decision`` is
    the policy's decision when one was taken (for the access log)."""

    def __init__(
        self, reason: str, *, interaction: Interaction, decision: AccessDecision | None = None
    ) -> None:
        super().__init__(f"access denied: {reason}")
        self.reason = reason
        self.interaction = interaction
        self.decision = decision


class AccessPolicy(Protocol):
    """Decides one request. ``caller`` is the authenticated caller (None: a local sender with
    no credentials, as on the embedded profile's loopback MLLP)."""

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        """Return the decision to allow; raise AccessDeniedError (with its decision) to
        deny."""

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        """What ``caller`` may find by search (the index applies it in the query); each
        record returned is then also checked with :meth:`check` as a read. ``patients``: the
        pseudonyms the search names (``patient=``, ``subject=``, ``$everything``), None when
        it names none. Raises AccessDeniedError when the caller may not search at all (or
        not without naming a patient)."""


class AllowAll:
    """Every request is allowed (no authentication or consent configured)."""

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        """Allow."""
        return PERMIT

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        """No filter."""
        return SearchFilter()


# --------------------------------------------------------------------------------------------
# the access log: every decision of an authenticated request, provable to the patient


@dataclass(frozen=True, slots=True)
class AccessEvent:
    """One decision to log (an AuditEvent and an ``access`` leaf): who asked (``caller``, the
    authenticated :class:`gateway.auth.caller.Caller`), what (``interaction``; ``query``: the
    search's canonical query string, None for other interactions), about which patient (a
    pseudonym; a search logs one event per patient named or returned), the decision, the
    records concerned (``Type/id/_history/version`` of this custodian: returned on a permit,
    asked on a deny) and when (timezone-aware)."""

    caller: object
    interaction: Interaction
    patient: str
    decision: AccessDecision
    records: tuple[str, ...] = ()
    query: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now().astimezone())


class AccessLog(Protocol):
    """Records access decisions durably. :meth:`record` returns only once every event's
    sealed AuditEvent and ``access`` leaf are durable (concurrent calls share one batch), so
    a permitted resource is sent only after its trace exists."""

    async def record(self, events: Sequence[AccessEvent]) -> None:
        """Log ``events``. Raises BackendError, LedgerError (the caller then answers 503 and
        sends nothing)."""


class NoAccessLog:
    """Logs nothing (no authentication configured, or the benchmark-only setting)."""

    async def record(self, events: Sequence[AccessEvent]) -> None:
        """Do nothing."""
