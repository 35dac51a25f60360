"""SMART App Launch v2 scopes: parsing, granting, and what a scope permits. Pure.

A scope is ``<context>/<resource>.<permissions>[?<param>=<value>&...]``: context ``system``,
``user`` or ``patient``; resource a FHIR type or ``*``; permissions a subset of ``cruds`` in that
order (``rs`` = read and search). SMART v1 forms (``.read``, ``.write``, ``.*``) are accepted and
read as their v2 equivalents. A constrained scope (``system/Observation.rs?category=laboratory``)
permits only resources matching every parameter; the gateway can check that only where it sees
the resource (:func:`resource_matches`), so a request that only a constrained scope would allow
is refused on routes where the content is not known yet.

Raises :class:`ScopeError` for a malformed scope.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.auth.errors import AuthError

CONTEXTS = ("system", "user", "patient")
PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


class ScopeError(AuthError):
    """A scope string is not a SMART v2 (or v1) resource scope."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="invalid-scope")


@dataclass(frozen=True, slots=True)
class Scope:
    """One parsed SMART scope."""

    context: str
    resource: str
    permissions: frozenset[str]
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        perms = "".join(p for p in PERMISSIONS if p in self.permissions)
        query = "&".join(f"{k}={v}" for k, v in self.params)
        return f"{self.context}/{self.resource}.{perms}" + (f"?{query}" if query else "")

    def allows(self, resource_type: str, permission: str, *, context: str | None = None) -> bool:
        """True when this scope grants ``permission`` on ``resource_type`` (ignoring params)."""
        return (
            permission in self.permissions
            and self.resource in ("*", resource_type)
            and (context is None or self.context == context)
        )

    def covers(self, other: Scope) -> bool:
        """True when everything ``other`` permits, this scope permits too (so a client
        registered for this scope may be granted ``other``)."""
        return (
            self.context == other.context
            and self.resource in ("*", other.resource)
            and other.permissions <= self.permissions
            and set(self.params) <= set(other.params)
        )


def parse_scope(text: str) -> Scope:
    """Parse one scope. Raises ScopeError."""
    raw, _, query = text.partition("?")
    context, slash, rest = raw.partition("/")
    resource, dot, perms = rest.rpartition(".")
    if not slash or not dot or context not in CONTEXTS or not resource:
        raise ScopeError(f"{text!r} is not a SMART resource scope (context/Type.permissions)")
    if not (resource == "*" or (resource.isalnum() and resource[0].isupper())):
        raise ScopeError(f"{text!r}: {resource!r} is not a FHIR resource type or '*'")
    perms = _V1.get(perms, perms)
    order = [PERMISSIONS.find(p) for p in perms]
    if not perms or -1 in order or order != sorted(set(order)):
        raise ScopeError(f"{text!r}: permissions must be a subset of 'cruds', in that order")
    params: tuple[tuple[str, str], ...] = ()
    if query:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        if not pairs or any(not k or not v for k, v in pairs):
            raise ScopeError(f"{text!r}: malformed parameters")
        params = tuple(sorted(pairs))
    return Scope(context, resource, frozenset(perms), params)


def parse_scopes(text: str | Iterable[str]) -> tuple[Scope, ...]:
    """Parse a space-separated scope string (or strings); the non-resource scopes ``openid``,
    ``fhirUser``, ``launch``, ``offline_access``, ``online_access`` are ignored. Raises
    ScopeError for anything else that is not a resource scope."""
    items = text.split() if isinstance(text, str) else list(text)
    return tuple(parse_scope(s) for s in items if s not in _IGNORED)


_IGNORED = frozenset({"openid", "fhirUser", "launch", "offline_access", "online_access"})


def grant(requested: Iterable[Scope], registered: Iterable[Scope]) -> tuple[Scope, ...]:
    """The requested scopes that some registered scope covers, in the requested order (a scope
    is granted only where it is both requested and registered)."""
    reg = tuple(registered)
    out: list[Scope] = []
    for scope in requested:
        if scope not in out and any(r.covers(scope) for r in reg):
            out.append(scope)
    return tuple(out)


def format_scopes(scopes: Iterable[Scope]) -> str:
    """The space-separated scope string."""
    return " ".join(str(s) for s in scopes)


def resource_matches(scope: Scope, resource: dict[str, Any]) -> bool:
    """True when ``resource`` satisfies every parameter of ``scope``. Supported parameters:
    ``category``, ``code``, ``status`` (token: ``code`` or ``system|code``); any other
    parameter never matches (deny by default)."""
    for name, wanted in scope.params:
        if name == "status":
            if resource.get("status") != wanted:
                return False
            continue
        if name not in ("category", "code"):
            return False
        value = resource.get(name)
        concepts = value if isinstance(value, list) else [value] if value else []
        system, bar, code = wanted.rpartition("|")
        found = False
        for concept in concepts:
            for coding in concept.get("coding", []) if isinstance(concept, dict) else []:
                if coding.get("code") == code and (not bar or coding.get("system") == system):
                    found = True
        if not found:
            return False
    return True
