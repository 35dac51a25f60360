"""Helpers shared by the routers: FHIR JSON responses, bounded body reading, the access seam."""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from fastapi import Request
from fastapi.responses import Response

from gateway.errors import InvalidInputError

FHIR_JSON = "application/fhir+json"


class PayloadTooLargeError(InvalidInputError):
    """The request body is over the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes", code="too-costly")
        self.limit = limit


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A FHIR JSON response."""
    return Response(
        content=orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers
    )


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than ``limit`` bytes. Raises PayloadTooLargeError."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Parse JSON. Raises InvalidInputError with the position of the problem."""
    if not body.strip():
        raise InvalidInputError("the request body is empty", code="invalid")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: {exc}", code="invalid") from exc


def require_json_content_type(request: Request) -> None:
    """Raise InvalidInputError (415) unless the body is declared FHIR JSON or JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (FHIR_JSON, "application/json"):
        raise InvalidInputError(
            f"content type {ctype or '(none)'} is not supported; send {FHIR_JSON}",
            code="not-supported-media-type",
        )


class AccessPolicy(Protocol):
    """The seam where authentication and consent plug in. Raises to deny."""

    async def check_write(self, request: Request, resource_type: str) -> None: ...

    async def check_read(self, request: Request, resource_type: str, patient: str) -> None: ...


class AllowAll:
    """Until authentication and consent land, every local request is allowed."""

    async def check_write(self, request: Request, resource_type: str) -> None:
        """Allow."""

    async def check_read(self, request: Request, resource_type: str, patient: str) -> None:
        """Allow."""
