"""The unified dictionary as a FHIR terminology service, and its curation queue.

- ``GET|POST /fhir/ConceptMap/$translate`` (R4: ``system``, ``code``, ``coding``,
  ``codeableConcept``, ``url``, ``target``, ``targetsystem``, ``reverse``);
- ``GET|POST /fhir/CodeSystem/$lookup``; ``GET|POST /fhir/ValueSet/$validate-code``;
- ``GET /fhir/ConceptMap``, ``GET /fhir/CodeSystem``, ``GET /fhir/ValueSet`` (search by
  ``url`` and ``version``): the dictionary's own resources;
- ``GET /dictionary/unmapped``: the curation queue (code, system, source institution, first
  and last seen, count), most frequent first.

Included before the FHIR router, whose ``GET /fhir/{type}/{id}`` would otherwise take
``/fhir/ConceptMap/$translate``. The operations are the pure functions of
:mod:`mappings.terminology_ops`; their errors become OperationOutcomes (400, 404) through
InvalidInputError/NotFoundError. Raises BackendError (503) when the queue cannot be read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import fhir_response, parse_json, read_body
from gateway.errors import InvalidInputError, NotFoundError
from gateway.runtime import Gateway
from mappings import terminology_ops as ops
from mappings.terminology import Terminology


def _query(request: Request) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for key, value in request.query_params.multi_items():
        out.setdefault(key, []).append(value)
    return out


def _run(fn: Callable[[], dict[str, Any]]) -> Response:
    try:
        return fhir_response(fn())
    except ops.OperationError as exc:
        if exc.status == 404:
            raise NotFoundError(str(exc)) from exc
        raise InvalidInputError(str(exc), code=exc.issue) from exc


def build_router(gw: Gateway) -> APIRouter:
    """The terminology routes over ``gw.terminology``."""
    router = APIRouter()
    limit = gw.settings.max_body_bytes

    def term() -> Terminology:
        return gw.terminology.terminology

    async def posted(request: Request) -> dict[str, list[Any]]:
        try:
            return ops.params_from_resource(parse_json(await read_body(request, limit)))
        except ops.OperationError as exc:
            raise InvalidInputError(str(exc), code=exc.issue) from exc

    @router.get("/fhir/ConceptMap/$translate")
    async def translate_get(request: Request) -> Response:
        params = _query(request)
        return _run(lambda: ops.translate(term(), params))

    @router.post("/fhir/ConceptMap/$translate")
    async def translate_post(request: Request) -> Response:
        params = await posted(request)
        return _run(lambda: ops.translate(term(), params))

    @router.get("/fhir/CodeSystem/$lookup")
    async def lookup_get(request: Request) -> Response:
        params = _query(request)
        return _run(lambda: ops.lookup(term(), params))

    @router.post("/fhir/CodeSystem/$lookup")
    async def lookup_post(request: Request) -> Response:
        params = await posted(request)
        return _run(lambda: ops.lookup(term(), params))

    @router.get("/fhir/ValueSet/$validate-code")
    async def validate_get(request: Request) -> Response:
        params = _query(request)
        return _run(lambda: ops.validate_code(term(), params))

    @router.post("/fhir/ValueSet/$validate-code")
    async def validate_post(request: Request) -> Response:
        params = await posted(request)
        return _run(lambda: ops.validate_code(term(), params))

    def search_route(rtype: str) -> None:
        async def search(request: Request) -> Response:
            params = _query(request)
            return _run(lambda: ops.search(term(), rtype, params))

        router.add_api_route(f"/fhir/{rtype}", search, methods=["GET"], name=f"search_{rtype}")

    for rtype in ("ConceptMap", "CodeSystem", "ValueSet"):
        search_route(rtype)

    @router.get("/dictionary/unmapped")
    async def unmapped() -> Response:
        entries = await gw.terminology.queue.entries()
        body = {
            "dictionaryVersion": gw.terminology.version,
            "total": len(entries),
            "entries": [e.to_json() for e in entries],
        }
        return Response(content=orjson.dumps(body), media_type="application/json")

    return router
