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

from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.errors import GatewayError

Interaction = Literal["read", "vread", "history", "create", "update", "delete", "search"]


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """What a caller asks of one record: the interaction, the resource type, the record's
    custodian (the institution whose gateway stores it) and its patient's pseudonym."""

    interaction: Interaction
    resource_type: str
    custodian: str
    patient: str


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

    @property
    def unrestricted(self) -> bool:
        """Whether this filter lets everything through."""
        return (self.patients, self.custodians, self.types, self.labels) == (None,) * 4


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
    patient data); a denied read is answered exactly like a missing record."""

    def __init__(self, reason: str, *, interaction: Interaction) -> None:
        super().__init__(f"access denied: {reason}")
        self.reason = reason
        self.interaction = interaction


class AccessPolicy(Protocol):
    """Decides one request. ``caller`` is the authenticated caller (None: a local sender with
    no credentials, as on the embedded profile's loopback MLLP)."""

    async def check(self, caller: object | None, request: AccessRequest) -> None:
        """Return to allow; raise AccessDeniedError to deny."""

    async def search_filter(self, caller: object | None) -> SearchFilter:
        """What ``caller`` may find by search (the index applies it in the query); each
        record returned is then also checked with :meth:`check` as a read. Raises
        AccessDeniedError when the caller may not search at all."""


class AllowAll:
    """Every request is allowed (no authentication or consent configured)."""

    async def check(self, caller: object | None, request: AccessRequest) -> None:
        """Allow."""

    async def search_filter(self, caller: object | None) -> SearchFilter:
        """No filter."""
        return SearchFilter()
