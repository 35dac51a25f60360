"""Log batches: the unit appended to the replicated log (pure encoding, no I/O).

A batch is one log message carrying the leaves a writer appends together and the writer's
signed checkpoint of the tree after them::

    {"v": 1, "writer": "<institution>", "batch": "<hex id>", "nonce": "<hex>",
     "leaves": ["<base64 leaf>", ...], "checkpoint": "<base64 signed checkpoint>"}

encoded as RFC 8785 canonical JSON. ``batch`` is the message id used for the log's
de-duplication (``Nats-Msg-Id``): SHA-256 over the writer, the nonce and the leaf hashes. The
writer draws the nonce (16 random bytes) once per group of leaves and keeps it across retries,
so a retried batch carries the same id while a later batch that happens to hold byte-identical
leaves (two identical access events in the same second) gets another. Readers apply batches
in log order, re-derive the tree and check that the checkpoint names exactly that tree; a batch
whose id was already applied is skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ledger.canonical import canonical_json
from ledger.errors import LedgerError

BATCH_VERSION = 1


class BatchFormatError(LedgerError):
    """A log message is not a well-formed batch. Carries the log sequence when known."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        where = f"log message {seq}: " if seq is not None else ""
        super().__init__(where + message)
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded batch."""

    writer: str
    batch_id: str
    leaves: tuple[bytes, ...]
    checkpoint: bytes  # a signed checkpoint, as ledger.checkpoint.SignedCheckpoint.to_bytes()
    nonce: bytes = b""


MAX_NONCE = 32


def batch_id(writer: str, leaf_hashes: Sequence[bytes], nonce: bytes = b"") -> str:
    """The batch's de-duplication id: hex SHA-256(writer || 0x00 || nonce || leaf hashes).

    Raises nothing.
    """
    h = hashlib.sha256(writer.encode() + b"\x00" + nonce)
    for lh in leaf_hashes:
        h.update(lh)
    return h.hexdigest()


def encode_batch(batch: Batch) -> bytes:
    """Canonical bytes of a batch (RFC 8785, :func:`ledger.canonical.canonical_json`: every
    string but the writer's name is base64 or hex, so the fast path applies unless the name
    needs escaping). Raises nothing."""
    obj: dict[str, Any] = {
        "v": BATCH_VERSION,
        "writer": batch.writer,
        "batch": batch.batch_id,
        "nonce": batch.nonce.hex(),
        "leaves": [base64.b64encode(leaf).decode("ascii") for leaf in batch.leaves],
        "checkpoint": base64.b64encode(batch.checkpoint).decode("ascii"),
    }
    return canonical_json(obj)


def decode_batch(data: bytes, *, seq: int | None = None) -> Batch:
    """Parse a log message. Raises BatchFormatError naming ``seq``."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise BatchFormatError("not JSON", seq=seq) from exc
    if not isinstance(obj, dict) or obj.get("v") != BATCH_VERSION:
        raise BatchFormatError("not a version 1 batch", seq=seq)
    try:
        writer = obj["writer"]
        bid = obj["batch"]
        nonce = bytes.fromhex(obj["nonce"])
        if len(nonce) > MAX_NONCE or nonce.hex() != obj["nonce"]:
            raise ValueError("nonce must be at most 32 bytes of lowercase hex")
        leaves = tuple(base64.b64decode(x, validate=True) for x in obj["leaves"])
        checkpoint = base64.b64decode(obj["checkpoint"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise BatchFormatError(f"bad field: {exc}", seq=seq) from exc
    if not isinstance(writer, str) or not isinstance(bid, str) or not leaves:
        raise BatchFormatError("writer, batch id or leaves missing", seq=seq)
    return Batch(writer=writer, batch_id=bid, leaves=leaves, checkpoint=checkpoint, nonce=nonce)
