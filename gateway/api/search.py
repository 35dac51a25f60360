"""FHIR search routes: ``GET /fhir/{type}``, ``POST /fhir/{type}/_search`` (form body) and
``GET /fhir/Patient/{id}/$everything``, answering ``searchset`` Bundles (see
:mod:`gateway.search`). Included in the app before the FHIR REST router.

Errors are raised as gateway errors (InvalidInputError: 400 OperationOutcome) and turned into
OperationOutcome by the app's single handler.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.convertors import Convertor, register_url_convertor

from gateway.api.common import fhir_response, read_body
from gateway.errors import InvalidInputError
from gateway.runtime import Gateway
from gateway.search import SearchService, open_index

_FORM = "application/x-www-form-urlencoded"


class ResourceTypeConvertor(Convertor[str]):
    """A path segment that can be a FHIR resource type (``Observation``), so the search
    routes never take ``/fhir/metadata``, ``/fhir/_history`` and the like from the FHIR
    router behind them."""

    regex = "[A-Z][A-Za-z]{1,63}"

    def convert(self, value: str) -> str:
        """The type as given."""
        return value

    def to_string(self, value: str) -> str:
        """The type as given."""
        return value


register_url_convertor("fhirtype", ResourceTypeConvertor())


def build_search_service(gw: Gateway) -> SearchService:
    """The search service of a gateway, with the index its profile uses. Raises nothing."""
    s = gw.settings
    return SearchService(
        records=gw.records,
        index=open_index(s.profile, data_dir=s.data_dir, postgres_url=s.postgres_url),
        policy=gw.records.policy,
        pseudonym_key=gw.pseudonym_key,
        institution=s.institution,
        default_tz=s.default_tz,
    )


def _lenient(request: Request) -> bool:
    prefer = request.headers.get("prefer", "").replace(",", ";")
    return any(p.strip().replace(" ", "") == "handling=lenient" for p in prefer.split(";"))


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _query_params(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


#: The search parameters the OpenAPI document names (any parameter of the type's table is
#: taken; these are the common ones, so that generated requests reach the parser).
_SEARCH_QUERY = [
    _query(name, text)
    for name, text in (
        ("_id", "resource ids, comma-separated"),
        ("_lastUpdated", "date with prefix (ge2024-01-01)"),
        ("identifier", "system|value"),
        ("patient", "Patient/id or id"),
        ("code", "system|code"),
        ("category", "system|code"),
        ("status", "token"),
        ("date", "date with prefix"),
        ("_count", "page size"),
        ("_sort", "date, -date, _lastUpdated, -_lastUpdated"),
        ("_summary", "count"),
        ("_include", "Type:param"),
        ("_revinclude", "Type:param"),
        ("_cursor", "the next link's cursor"),
    )
]
_SEARCH_FORM = {
    "requestBody": {
        "required": False,
        "content": {
            _FORM: {
                "schema": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "properties": {p["name"]: {"type": "string"} for p in _SEARCH_QUERY},
                }
            }
        },
    }
}


def build_router(gw: Gateway, app: FastAPI) -> APIRouter:
    """The search router; builds the gateway's :class:`SearchService` (``app.state.search``)
    and opens its index first thing at start."""
    if not gw.settings.search_index:
        return APIRouter()
    service = build_search_service(gw)
    app.state.search = service
    app.state.start_hooks.insert(0, service.start)
    app.state.stop_hooks.append(service.stop)
    router = APIRouter(prefix="/fhir", tags=["FHIR search"])

    @router.get(
        "/Patient/{pid}/$everything",
        openapi_extra={"parameters": [_query("_count", "page size"), _SEARCH_QUERY[-1]]},
    )
    async def everything(pid: str, request: Request) -> Response:
        bundle = await service.everything(
            pid, _query_params(request), caller=request.state.caller, base_url=_base(request)
        )
        return fhir_response(bundle)

    @router.get("/{rtype:fhirtype}", openapi_extra={"parameters": _SEARCH_QUERY})
    async def search_get(rtype: str, request: Request) -> Response:
        bundle = await service.search(
            rtype,
            _query_params(request),
            caller=request.state.caller,
            base_url=_base(request),
            lenient=_lenient(request),
        )
        return fhir_response(bundle)

    @router.post("/{rtype:fhirtype}/_search", openapi_extra=_SEARCH_FORM)
    async def search_post(rtype: str, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, gw.settings.max_body_bytes)
        if body.strip() and ctype != _FORM:
            raise InvalidInputError(
                f"POST _search takes a {_FORM} body", code="not-supported-media-type"
            )
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise InvalidInputError("the form body is not UTF-8") from exc
        bundle = await service.search(
            rtype,
            _query_params(request) + form,
            caller=request.state.caller,
            base_url=_base(request),
            lenient=_lenient(request),
        )
        return fhir_response(bundle)

    return router
