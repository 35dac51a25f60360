"""Search cursors: what the ``next`` link of a page carries, opaque to clients.

A cursor holds the search (type, parameters), the snapshot it runs at, the keyset position of
the last entry returned (sort key and row id), the total, and the key of the caller it was made
for; it is signed with HMAC-SHA256 under a key derived from the gateway's pseudonym key. A
cursor that was altered, or presented by another caller, is refused.

Raises :class:`gateway.errors.InvalidInputError`.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any

import orjson

from gateway.errors import InvalidInputError

_TAG = 16


def cursor_key(secret: bytes) -> bytes:
    """The signing key of search cursors, derived from a gateway secret."""
    return hmac.digest(secret, b"alliance-gateway search cursor v1", "sha256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(key: bytes, state: dict[str, Any]) -> str:
    """The signed, opaque cursor of ``state`` (which must hold the caller under ``c``)."""
    body = orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
    tag = hmac.digest(key, body, "sha256")[:_TAG]
    return f"{_b64(body)}.{_b64(tag)}"


def decode_cursor(key: bytes, token: str, caller: str) -> dict[str, Any]:
    """The state of a cursor made by :func:`encode_cursor` for ``caller``. Raises
    InvalidInputError when it is malformed, its signature does not verify, or it was made for
    another caller."""
    try:
        body_b64, tag_b64 = token.split(".")
        body, tag = _unb64(body_b64), _unb64(tag_b64)
    except ValueError as exc:
        raise InvalidInputError("malformed search cursor", location="_cursor") from exc
    if not hmac.compare_digest(hmac.digest(key, body, "sha256")[:_TAG], tag):
        raise InvalidInputError("search cursor signature does not verify", location="_cursor")
    try:
        state = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError("malformed search cursor", location="_cursor") from exc
    if not isinstance(state, dict) or state.get("c") != caller:
        raise InvalidInputError(
            "search cursor was issued to another caller", location="_cursor", code="forbidden"
        )
    return state
