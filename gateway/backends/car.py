"""CARv1 archives of raw blocks (pure): the format ``ipfs dag import`` and ``ipfs dag export`` use.

A CARv1 file is a varint-length-prefixed DAG-CBOR header ``{"roots": [CID...], "version": 1}``
followed by one varint-length-prefixed section per block: the binary CID, then the block's
bytes. Only raw sha2-256 CIDv1 blocks (the gateway's ciphertexts) are written; every block is
also listed as a root so that an importer pins each one.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator

from gateway.backends.cid import cid_v1_raw, parse_cid

_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])


def varint(n: int) -> bytes:
    """Unsigned LEB128, as multiformats use it. Raises ValueError for a negative number."""
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError("CBOR length too large")


def cid_bytes(cid: str) -> bytes:
    """The binary form of a raw sha2-256 CIDv1. Raises InvalidInputError for anything else."""
    return _CID_PREFIX + parse_cid(cid)


def car_header(roots: Iterable[str]) -> bytes:
    """The length-prefixed DAG-CBOR header naming ``roots``. Raises InvalidInputError."""
    items = [cid_bytes(c) for c in roots]
    body = bytearray(b"\xa2")  # map of 2; DAG-CBOR key order: "roots" sorts before "version"
    body += _cbor_head(3, 5) + b"roots" + _cbor_head(4, len(items))
    for raw in items:
        link = b"\x00" + raw  # tag 42 carries the identity multibase prefix and the binary CID
        body += b"\xd8\x2a" + _cbor_head(2, len(link)) + link
    body += _cbor_head(3, 7) + b"version" + b"\x01"
    return varint(len(body)) + bytes(body)


def car_section(data: bytes) -> bytes:
    """One block's section: length, binary CID, bytes."""
    raw = cid_bytes(cid_v1_raw(data))
    return varint(len(raw) + len(data)) + raw + data


def iter_car(buf: bytes) -> Iterator[tuple[str, bytes]]:
    """(CID, bytes) of every block of a CARv1 written by this module.

    Raises ValueError when the archive is malformed or a block does not match its CID.
    """
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= len(buf):
                raise ValueError("truncated varint")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    header_len = read_varint()
    pos += header_len
    while pos < len(buf):
        size = read_varint()
        section = buf[pos : pos + size]
        if len(section) != size or not section.startswith(_CID_PREFIX):
            raise ValueError(f"bad block section at byte {pos}")
        pos += size
        cid = "b" + base64.b32encode(section[:36]).decode().lower().rstrip("=")
        data = section[36:]
        if cid_v1_raw(data) != cid:
            raise ValueError(f"block {cid} does not match its CID")
        yield cid, data
