"""``POST /hl7v2``: one HL7 v2 message, or an FHS/BHS batch, answered with the ACK(s).

Same processing as the MLLP listener (gateway/hl7/ingest.py). The body is the ER7 message
(``Content-Type: x-application/hl7-v2+er7``); the answer has the same type: the ACK (in
enhanced mode the commit ACK followed by the application ACK), or for a batch the ACKs of its
messages wrapped in BHS/BTS, encoded in the batch's character set. HTTP status 200 whenever an
answer could be built (the ACK code says what happened), 204 when the message asked for no
acknowledgement, 503 (an OperationOutcome, by the app's handler) when nothing truthful can be
said because the de-duplication state is unreachable: the sender retries.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import read_body
from gateway.errors import BackendError, InvalidInputError
from gateway.hl7.ingest import HL7Ingest
from gateway.hl7.workers import HL7_MEDIA_TYPE
from mappings.errors import MappingError
from mappings.v2.parse import decode, detect_charset, split_batch

ACCEPTED_TYPES = (HL7_MEDIA_TYPE, "application/hl7-v2", "application/edi-hl7", "text/plain")


DEFAULT_ENCODING = "^~\\&"


def _batch_header(stripped: bytes, codec: str) -> str:
    """The BHS of the answer, with the separators of the batch's first header segment."""
    first = stripped.split(b"\r", 1)[0].decode(codec, errors="replace")
    fs = first[3] if len(first) > 3 else "|"
    enc = first[4:].split(fs, 1)[0] if len(first) > 4 else ""
    return "BHS" + fs + (enc or DEFAULT_ENCODING)


def build_router(ingest: HL7Ingest) -> APIRouter:
    """The /hl7v2 route. Raises InvalidInputError (415, 400), BackendError (503)."""
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
        peer = f"http:{request.client.host if request.client else '-'}"
        if stripped.startswith((b"FHS", b"BHS")):
            try:
                codec = detect_charset(stripped)[1]
                messages = split_batch(decode(stripped))
            except MappingError as exc:
                raise InvalidInputError(f"batch cannot be read: {exc}", location="BHS") from exc
            acks: list[bytes] = []
            for message in messages:
                answer = await ingest.handle(message.encode(codec, errors="replace"), peer=peer)
                if answer is None:
                    raise BackendError("de-duplication state unavailable", backend="state")
                acks += [a.rstrip(b"\r") for a in answer]
            head = _batch_header(stripped, codec).encode(codec, errors="replace")
            fs = head[3:4]
            body = b"\r".join([head, *acks, b"BTS" + fs + str(len(acks)).encode()]) + b"\r"
            return Response(body, media_type=HL7_MEDIA_TYPE)
        answer = await ingest.handle(stripped, peer=peer)
        if answer is None:
            raise BackendError("de-duplication state unavailable", backend="state")
        if not answer:
            return Response(status_code=204)
        return Response(b"".join(answer), media_type=HL7_MEDIA_TYPE)

    return router
