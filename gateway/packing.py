"""Packs: the ciphertexts of one storage batch as one block. Pure.

Every content-addressed block costs the blob store the same fixed work whatever its size (Kubo
writes, fsyncs and indexes each one: about 0.4 ms of its CPU per 9 KiB block here against 0.14 ms
per 9 KiB inside a 288 KiB block, `bench/bench_mllp.py`), so the record pipeline concatenates the
ciphertexts of a batch into packs of at most :data:`PACK_MAX_BYTES` and stores each pack as one
block. A record's ``record`` leaf names the pack's CID and the record's byte range in it; the
leaf's SHA-256 is still that of the record's own ciphertext, so a reader (and an auditor) fetches
the block, cuts the range out and checks it against the leaf: a damaged byte spoils only the
record whose range holds it. A ciphertext alone
in its pack is the whole block and its leaf has no range, exactly as before packs existed.

Each ciphertext keeps its own data key; a pack only shares a block, never a key. Packs mix
patients, which reveals nothing the ledger does not already show (CIDs, sizes and pseudonyms
are on it) and changes nothing for erasure: destroying a patient's key-encryption key makes
their ranges unreadable wherever the block is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Largest pack built from several ciphertexts. 1 MiB keeps every pack within what IPFS peers
#: exchange as one block (bitswap's limit is 2 MiB); a larger ciphertext is stored alone.
PACK_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Location:
    """Where one ciphertext is: a block, and its byte range there (None: the whole block)."""

    cid: str
    byte_range: tuple[int, int] | None = None


def plan_packs(sizes: Sequence[int], limit: int = PACK_MAX_BYTES) -> list[list[int]]:
    """Group item indices, in order, into packs whose sizes add up to at most ``limit``
    (an item larger than ``limit`` makes a pack of its own)."""
    packs: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            packs.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        packs.append(current)
    return packs


def build_packs(
    blobs: Sequence[bytes], limit: int = PACK_MAX_BYTES
) -> tuple[list[bytes], list[tuple[int, tuple[int, int] | None]]]:
    """The packs for ``blobs`` and, per blob, (its pack's position, its byte range in the pack;
    None when it is the pack's only content)."""
    packs: list[bytes] = []
    where: list[tuple[int, tuple[int, int] | None]] = [(0, None)] * len(blobs)
    for n, members in enumerate(plan_packs([len(b) for b in blobs], limit)):
        if len(members) == 1:
            where[members[0]] = (n, None)
            packs.append(blobs[members[0]])
            continue
        offset = 0
        for i in members:
            where[i] = (n, (offset, len(blobs[i])))
            offset += len(blobs[i])
        packs.append(b"".join(blobs[i] for i in members))
    return packs, where


def cut(block: bytes, byte_range: tuple[int, int] | None) -> bytes | None:
    """The ciphertext at ``byte_range`` of ``block`` (the block itself for None), or None when
    the range lies outside the block."""
    if byte_range is None:
        return block
    offset, length = byte_range
    if offset < 0 or length < 1 or offset + length > len(block):
        return None
    return block[offset : offset + length]
