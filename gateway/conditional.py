"""Conditional writes: ``If-None-Exist`` (create, and ``request.ifNoneExist`` in a Bundle),
conditional update (``PUT /fhir/{type}?identifier=...``) and ``If-Match`` version checks,
with HAPI FHIR's semantics, made atomic.

A condition is a FHIR search (``identifier=sys|123``) run through the search service
(:meth:`gateway.search.SearchService.find`) as an internal call: the existence of a record is
part of the write, whoever may read it. Checking and writing are serialised on a key derived
from (custodian, type, normalised condition), or (custodian, type, id) for ``If-Match``, by
:class:`WriteLocks`: an asyncio lock per key inside one process and, on the production
profile, a lease in the shared state store (Redis ``SET NX PX``) across the processes of one
gateway. Under the lock the index is searched again; a FHIR REST write is indexed before its
store returns, so the next holder sees it. Ten concurrent conditional creates of one
identifier therefore make one resource.

Raises :class:`gateway.errors.InvalidInputError` (400: a malformed condition or ``If-Match``),
:class:`gateway.errors.PreconditionFailedError` (412), :class:`gateway.errors.ConflictError`
(409), :class:`gateway.errors.BackendError` (503: the state store unreachable, or a lock not
obtained in time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol
from urllib.parse import parse_qsl, urlencode

from gateway.backends.protocols import StateStore
from gateway.errors import BackendError, InvalidInputError, PreconditionFailedError

#: How long a lease in the state store lives if its holder dies (a write takes milliseconds).
LEASE_TTL_S = 30.0
#: How long a writer waits for a key another one holds before answering 503 (retry).
LOCK_WAIT_S = 20.0
#: Parameters that shape a search's answer (or a response's format), not what it matches: not
#: part of a condition.
SHAPING = frozenset(
    {"_count", "_sort", "_summary", "_include", "_revinclude", "_total", "_format", "_pretty"}
)
_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,18})"?\s*$')


class Finder(Protocol):
    """What conditional writes need of the search service."""

    async def find(
        self, resource_type: str, params: Sequence[tuple[str, str]], *, caller: object | None = None
    ) -> list[str]:
        """Ids of current resources matching ``params``. Raises InvalidInputError."""
        ...


def parse_condition(resource_type: str, raw: str, *, where: str) -> list[tuple[str, str]]:
    """The search parameters of a condition: an ``If-None-Exist`` value or the query of a
    conditional update (``identifier=a|b``, optionally as ``Type?identifier=a|b`` or
    ``?identifier=a|b``). Shaping parameters (``_count`` ...) are dropped. Raises
    InvalidInputError (400) when it names no parameter or another type."""
    text = raw.strip()
    head, sep, tail = text.partition("?")
    if sep:
        if head.strip("/") not in ("", resource_type):
            raise InvalidInputError(
                f"the condition names {head[:64]!r}, not {resource_type}", location=where
            )
        text = tail
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = []
    params = [(k, v) for k, v in pairs if k not in SHAPING]
    if not params or any(not k or not v for k, v in params):
        raise InvalidInputError(
            "a condition needs search parameters with values (e.g. identifier=system|value)",
            location=where,
        )
    return params


def condition_key(custodian: str, resource_type: str, params: Sequence[tuple[str, str]]) -> str:
    """The lock key of a condition: the same search in any parameter order is the same key.
    Hashed, so that no identifier appears in the state store. Raises nothing."""
    canon = urlencode(sorted(params))
    digest = hashlib.sha256(f"{custodian}\0{resource_type}\0{canon}".encode()).hexdigest()
    return f"cond:{digest[:40]}"


def version_key(record: str) -> str:
    """The lock key of an ``If-Match`` write of one record (its opaque ledger id)."""
    return f"ver:{record}"


def parse_if_match(raw: str) -> int:
    """The version an ``If-Match`` header asks for: ``W/"3"`` (what ETags say), ``"3"`` or
    ``3``. Raises InvalidInputError (400) for anything else."""
    m = _ETAG.match(raw)
    if m is None or int(m[1]) < 1:
        raise InvalidInputError(
            'If-Match must name a version as the ETag does, e.g. W/"1"', location="If-Match"
        )
    return int(m[1])


def check_version(expected: int, current: int | None, *, what: str) -> None:
    """Refuse a write whose ``If-Match`` is not the current version (None: nothing stored).
    Raises PreconditionFailedError (412)."""
    if current is None:
        raise PreconditionFailedError(f"If-Match: {what} has no current version")
    if current != expected:
        raise PreconditionFailedError(
            f'If-Match: {what} is at version {current}, not W/"{expected}"'
        )


def one_match(found: Sequence[str], *, what: str) -> str | None:
    """The single match of a condition, None for none. Raises PreconditionFailedError (412)
    when several resources match (HAPI's answer: the condition is not selective enough)."""
    if len(found) > 1:
        raise PreconditionFailedError(
            f"{len(found)} {what} resources match the condition; it must match at most one"
        )
    return found[0] if found else None


class WriteLocks:
    """Serialises conditional writes on keys (see the module docstring). ``state``: the
    shared state store whose leases hold across processes (None: this process only, as on
    the embedded profile, whose data directory one process owns)."""

    def __init__(
        self,
        state: StateStore | None,
        *,
        lease_ttl: float = LEASE_TTL_S,
        wait: float = LOCK_WAIT_S,
    ) -> None:
        self._state = state
        self._ttl = lease_ttl
        self._wait = wait
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold every key (taken in sorted order, so two writers never wait for each other)
        until the block ends. Raises BackendError when a key is not obtained within the wait
        or the state store fails."""
        ordered = sorted(set(keys))
        taken: list[str] = []
        leased: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + self._wait
        try:
            for key in ordered:
                lock = self._acquire_ref(key)
                taken.append(key)
                try:
                    await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    taken.pop()
                    self._release_ref(key, locked=False)
                    raise BackendError(
                        "a conditional write of the same condition is still running; retry",
                        backend="write-lock",
                    ) from None
                if self._state is not None:
                    leased.append((key, await self._lease(key, deadline)))
            yield
        finally:
            for key, token in reversed(leased):
                await self._unlease(key, token)
            for key in reversed(taken):
                self._release_ref(key, locked=True)

    def _acquire_ref(self, key: str) -> asyncio.Lock:
        lock, refs = self._local.get(key) or (asyncio.Lock(), 0)
        self._local[key] = (lock, refs + 1)
        return lock

    def _release_ref(self, key: str, *, locked: bool) -> None:
        lock, refs = self._local[key]
        if locked:
            lock.release()
        if refs <= 1:
            del self._local[key]
        else:
            self._local[key] = (lock, refs - 1)

    async def _lease(self, key: str, deadline: float) -> bytes:
        assert self._state is not None
        token = os.urandom(12).hex().encode()
        delay = 0.002
        while not await self._state.set_if_absent(f"lock:{key}", token, ttl=self._ttl):
            if time.monotonic() + delay > deadline:
                raise BackendError(
                    "a conditional write of the same condition is still running; retry",
                    backend="write-lock",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return token

    async def _unlease(self, key: str, token: bytes) -> None:
        """Give a lease back only while it is still ours (it may have lapsed and been taken
        by another writer): a compare-and-set to an empty value that expires at once."""
        assert self._state is not None
        with contextlib.suppress(BackendError):  # else it lapses after the lease TTL
            await self._state.replace_if(f"lock:{key}", token, b"", ttl=0.001)
