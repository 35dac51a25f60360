"""CIDs as Kubo makes them for raw blocks: CIDv1, raw codec, sha2-256, base32 lower multibase.

Pure. ``cid_v1_raw(data)`` equals what ``ipfs block put --cid-codec=raw --mhtype=sha2-256``
returns for the same bytes (a test checks this against a real Kubo).
"""

from __future__ import annotations

import base64
import hashlib

from gateway.errors import InvalidInputError

_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw (0x55), sha2-256 (0x12), 32 bytes


def cid_v1_raw(data: bytes) -> str:
    """The CIDv1 (raw, sha2-256) of ``data`` in base32 lower ('b' multibase prefix)."""
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_PREFIX + digest).decode("ascii").lower().rstrip("=")


def parse_cid(cid: str) -> bytes:
    """The sha2-256 digest inside a raw CIDv1. Raises InvalidInputError for anything else."""
    if not cid.startswith("b"):
        raise InvalidInputError(f"CID {cid[:80]!r} is not base32 (multibase 'b')", location="cid")
    body = cid[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise InvalidInputError(f"CID {cid[:80]!r} is not valid base32", location="cid") from exc
    if len(raw) != 36 or not raw.startswith(_PREFIX):
        raise InvalidInputError(f"CID {cid[:80]!r} is not a raw sha2-256 CIDv1", location="cid")
    return raw[4:]
