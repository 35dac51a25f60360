"""``POST /hl7v2``: one HL7 v2 message, or an FHS/BHS batch, answered with the ACK(s).

Same processing as the MLLP listener (gateway/hl7.py). The body is the ER7 message
(``Content-Type: x-application/hl7-v2+er7``); the answer has the same type: the ACK, or for a
batch the ACKs wrapped in BHS/BTS. HTTP status 200 whenever an ACK could be built (the ACK
code says what happened), 503 when none could.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import read_body
from gateway.errors import BackendError, InvalidInputError
from gateway.hl7 import HL7_MEDIA_TYPE, HL7Ingest
from mappings.errors import MappingError
from mappings.v2.parse import decode, split_batch

ACCEPTED_TYPES = (HL7_MEDIA_TYPE, "application/hl7-v2", "application/edi-hl7", "text/plain")


def build_router(ingest: HL7Ingest) -> APIRouter:
    """The /hl7v2 route."""
    router = APIRouter()
    settings = ingest.gw.settings

    @router.post("/hl7v2")
    async def post_hl7v2(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise InvalidInputError(
                f"content type {ctype or '(none)'} is not supported; send {HL7_MEDIA_TYPE}",
                code="not-supported-media-type",
            )
        raw = await read_body(request, settings.max_mllp_message_bytes)
        stripped = raw.lstrip(b"\r\n ")
        if stripped.startswith((b"FHS", b"BHS")):
            try:
                text = decode(stripped)
                messages = split_batch(text)
                codec = "utf-8"
                from mappings.v2.parse import detect_charset

                codec = detect_charset(stripped)[1]
            except MappingError as exc:
                raise InvalidInputError(f"batch cannot be read: {exc}", location="BHS") from exc
            acks = []
            for message in messages:
                ack = await ingest.handle(message.encode(codec, errors="replace"))
                if ack is None:
                    raise BackendError("de-duplication state unavailable", backend="state")
                acks.append(ack.rstrip(b"\r"))
            body = b"BHS|^~\\&\r" + b"\r".join(acks) + f"\rBTS|{len(acks)}\r".encode()
            return Response(body, media_type=HL7_MEDIA_TYPE)
        ack = await ingest.handle(stripped)
        if ack is None:
            raise BackendError("de-duplication state unavailable", backend="state")
        return Response(ack, media_type=HL7_MEDIA_TYPE)

    return router
