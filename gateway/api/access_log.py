"""The access history: ``GET /fhir/AuditEvent?patient=`` and the break-glass review queue
(``GET /consent/break-glass``, ``POST /consent/break-glass/{event}/reviewed``).

Each AuditEvent is answered as anchored (the exact resource whose RFC 8785 bytes were hashed),
with its salt and the ledger receipt of its ``access`` leaf as extensions of its Bundle entry,
so that anyone holding the answer can recompute ``SHA-256(salt || RFC 8785(AuditEvent))``,
compare it with the leaf and check the leaf's inclusion in the signed checkpoint
(docs/api.md, "Access history"). A patient token sees only its own patient (every pseudonym
linked to it); the privacy officer (gateway/auth/policy.py) sees any patient and the queue.
Included in the app before the search router.

Raises :class:`gateway.errors.InvalidInputError` (400), :class:`gateway.auth.errors.ForbiddenError`
(403), :class:`gateway.errors.NotFoundError` (404), and what reading the log raises.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.access_log import FoundAccess, salt_extension
from gateway.api.common import fhir_response
from gateway.auth.caller import Caller
from gateway.auth.errors import ForbiddenError
from gateway.errors import InvalidInputError, NotFoundError
from gateway.fhir import operation_outcome, receipt_extension
from gateway.identity import patient_identity
from gateway.runtime import Gateway

#: Most AuditEvents one page answers.
MAX_PAGE = 1000
_PARAMS = frozenset({"patient", "_count", "_cursor"})


def _entry(gw: Gateway, base: str, found: FoundAccess) -> dict[str, Any]:
    """A searchset entry: the AuditEvent as anchored, its salt and its leaf's receipt."""
    logged = found.logged
    receipt = gw.records.receipt_of_anchor(logged.container._replace(leaf_index=logged.leaf_index))
    return {
        "fullUrl": f"{base}/AuditEvent/{found.resource['id']}",
        "extension": [
            salt_extension(found.salt),
            receipt_extension(
                leaf_index=receipt.leaf_index,
                tree_size=receipt.tree_size,
                root=receipt.root,
                proof=receipt.proof,
                checkpoint=receipt.checkpoint,
                cid=receipt.cid,
                byte_range=receipt.byte_range,
            ),
        ],
        "resource": found.resource,
        "search": {"mode": "match"},
    }


def _pseudonym_of(gw: Gateway, value: str) -> str | None:
    """The pseudonym a ``patient`` parameter names: ``Patient/{id}`` or ``{id}`` of a
    Patient stored here, or ``system|value`` of an identifier. None: unknown here."""
    if "|" in value:
        system, _, ident = value.partition("|")
        if not ident:
            raise InvalidInputError("patient identifier has no value", location="patient")
        return patient_identity(
            gw.pseudonym_key,
            [(system or None, ident)],
            master_system=gw.settings.master_id_system,
            facility=gw.settings.institution,
        ).pseudonym
    rid = value.removeprefix("Patient/")
    if not rid or "/" in rid:
        raise InvalidInputError(
            "patient must be Patient/{id}, {id} or system|value", location="patient"
        )
    return gw.records.patient_of("Patient", rid)


def _page(request: Request) -> tuple[int, int | None]:
    unknown = set(request.query_params) - _PARAMS
    if unknown:
        raise InvalidInputError(
            f"unknown AuditEvent search parameter {sorted(unknown)[0]!r}", location="query"
        )
    raw_count = request.query_params.get("_count", "50")
    raw_cursor = request.query_params.get("_cursor")
    if not raw_count.isdigit() or not 1 <= int(raw_count) <= MAX_PAGE:
        raise InvalidInputError(f"_count must be 1-{MAX_PAGE}", location="_count")
    if raw_cursor is not None and not raw_cursor.isdigit():
        raise InvalidInputError("_cursor is not a cursor this gateway gave", location="_cursor")
    return int(raw_count), int(raw_cursor) if raw_cursor is not None else None


def build_router(gw: Gateway) -> APIRouter:
    """The access-history routes."""
    router = APIRouter()

    def _patients(caller: Caller, value: str | None) -> frozenset[str]:
        links = gw.index.links
        if caller.kind == "patient":
            assert caller.patient is not None  # the route's rule
            own = links.all_of(caller.patient)
            if value is None:
                return own
            named = _pseudonym_of(gw, value)
            if named is None or named not in own:
                raise ForbiddenError(
                    "a patient token reaches only that patient's own access history",
                    reason="patient",
                )
            return own
        if value is None:
            raise InvalidInputError("patient is required", location="patient")
        named = _pseudonym_of(gw, value)
        return frozenset() if named is None else links.all_of(named)

    def _bundle(
        request: Request, found: list[FoundAccess], total: int, next_url: str | None = None
    ) -> Response:
        base = f"{str(request.base_url).rstrip('/')}/fhir"
        links = [{"relation": "self", "url": str(request.url)}]
        if next_url is not None:
            links.append({"relation": "next", "url": next_url})
        return fhir_response(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": total,
                "link": links,
                "entry": [_entry(gw, base, f) for f in found],
            }
        )

    @router.get("/fhir/AuditEvent")
    async def access_history(request: Request) -> Response:
        caller: Caller = request.state.caller
        count, cursor = _page(request)
        patients = _patients(caller, request.query_params.get("patient"))
        found = await gw.access_log.history(patients, before=cursor, count=count)
        total = len(gw.access_log.view.of_patients(patients))
        next_url = None
        if len(found) == count:
            next_url = str(request.url.include_query_params(_cursor=found[-1].logged.leaf_index))
        return _bundle(request, found, total, next_url)

    @router.get("/consent/break-glass")
    async def break_glass_queue(request: Request) -> Response:
        found = []
        for queued in gw.access_log.queue.pending():
            item = await gw.access_log.find(queued.event)
            if item is not None:  # None: its batch never reached the ledger
                found.append(item)
        return _bundle(request, found, len(found))

    @router.post("/consent/break-glass/{event}/reviewed")
    async def break_glass_reviewed(event: str, request: Request) -> Response:
        caller: Caller = request.state.caller
        if not await gw.access_log.queue.review(event, by=f"{caller.client_id}/{caller.user}"):
            raise NotFoundError(f"no break-glass access {event[:64]!r} awaits review")
        return fhir_response(operation_outcome("information", "informational", f"{event} reviewed"))

    return router
