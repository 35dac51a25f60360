"""CARv1 archives (pure): the format ``ipfs dag import`` and ``ipfs dag export`` use.

A CARv1 file is a varint-length-prefixed DAG-CBOR header ``{"roots": [CID...], "version": 1}``
followed by one varint-length-prefixed section per block: the binary CID, then the block's
bytes. The gateway's ciphertexts are raw sha2-256 CIDv1 blocks. An export lists every block as
a root (an importer pins each one); a write batch (:func:`batch_car`) adds one DAG-CBOR node
``{"blocks": [link...]}`` linking the batch's blocks and names only it as root, so that one
recursive pin keeps the whole batch.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator, Sequence

from gateway.backends.cid import cid_v1_raw, parse_cid

_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])
_DAG_CBOR_PREFIX = bytes([0x01, 0x71, 0x12, 0x20])  # CIDv1, dag-cbor (0x71), sha2-256


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


def _links(binary_cids: Sequence[bytes]) -> bytes:
    """A DAG-CBOR array of links (tag 42: the identity multibase prefix, then the binary CID)."""
    out = bytearray(_cbor_head(4, len(binary_cids)))
    for raw in binary_cids:
        link = b"\x00" + raw
        out += b"\xd8\x2a" + _cbor_head(2, len(link)) + link
    return bytes(out)


def _header(binary_roots: Sequence[bytes]) -> bytes:
    # map of 2; DAG-CBOR key order: "roots" sorts before "version"
    body = b"\xa2" + _cbor_head(3, 5) + b"roots" + _links(binary_roots)
    body += _cbor_head(3, 7) + b"version" + b"\x01"
    return varint(len(body)) + body


def car_header(roots: Iterable[str]) -> bytes:
    """The length-prefixed DAG-CBOR header naming raw-block ``roots``. Raises InvalidInputError."""
    return _header([cid_bytes(c) for c in roots])


def dag_cbor_cid(node: bytes) -> str:
    """The CIDv1 (dag-cbor, sha2-256, base32) of an encoded DAG-CBOR node."""
    raw = _DAG_CBOR_PREFIX + hashlib.sha256(node).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def batch_car(cids: Sequence[str], blocks: Sequence[bytes]) -> tuple[str, bytes]:
    """A CAR of raw ``blocks`` (with their ``cids``) under one new DAG-CBOR root linking them
    all, listed in order; returns (root CID, archive). Duplicates are written once.
    Raises InvalidInputError for a CID that is not raw sha2-256.
    """
    binary = [cid_bytes(c) for c in cids]
    node = b"\xa1" + _cbor_head(3, 6) + b"blocks" + _links(binary)  # {"blocks": [link...]}
    root = _DAG_CBOR_PREFIX + hashlib.sha256(node).digest()
    parts = [_header([root]), varint(len(root) + len(node)), root, node]
    seen: set[bytes] = set()
    for raw, data in zip(binary, blocks, strict=True):
        if raw in seen:
            continue
        seen.add(raw)
        parts += [varint(len(raw) + len(data)), raw, data]
    return dag_cbor_cid(node), b"".join(parts)


def car_section(data: bytes) -> bytes:
    """One block's section: length, binary CID, bytes."""
    raw = cid_bytes(cid_v1_raw(data))
    return varint(len(raw) + len(data)) + raw + data


def iter_car(buf: bytes) -> Iterator[tuple[str, bytes]]:
    """(CID, bytes) of every raw block of a CARv1 written by this module (a batch root, which
    only links, is skipped; its hash is not checked).

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
        if len(section) == size and section.startswith(_DAG_CBOR_PREFIX):
            pos += size  # a batch root: links only, no data of its own
            continue
        if len(section) != size or not section.startswith(_CID_PREFIX):
            raise ValueError(f"bad block section at byte {pos}")
        pos += size
        cid = "b" + base64.b32encode(section[:36]).decode().lower().rstrip("=")
        data = section[36:]
        if cid_v1_raw(data) != cid:
            raise ValueError(f"block {cid} does not match its CID")
        yield cid, data
