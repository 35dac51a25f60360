"""Checkpoints (signed tree heads), their canonical body, hybrid signatures and cosignatures.

A :class:`Checkpoint` commits to the tree of the first ``size`` leaves (``root``), to the
previous signed checkpoint (``prev`` = SHA-256 of its body, 32 zero bytes for the first one) and
to a time (unix milliseconds). Its canonical body is UTF-8 text in the style of a C2SP signed
note, one field per line, every line ending in ``\\n``::

    <origin>
    <size, decimal, no leading zeros>
    <root, standard base64 with padding>
    prev <previous body hash, standard base64 with padding>
    time <unix milliseconds, decimal>

The origin is 1 to 255 printable ASCII characters without spaces. Parsing is strict: a body is
accepted only if re-encoding its fields gives the same bytes.

Every signature is over ``SIGNATURE_CONTEXT + body``. An institution signs with two keys and
both signatures are required: Ed25519 (``ed25519``, 64 bytes) and ML-DSA-65 (``ml-dsa-65``,
FIPS 204, 3309 bytes). The writer's two signatures come first; a witness's cosignature is the
same pair by another institution over the same body. A :class:`SignedCheckpoint` serialises as
RFC 8785 canonical JSON::

    {"body": "<base64 body>", "signatures": [{"alg": "ed25519", "name": "<institution>",
     "sig": "<base64>"}, ...], "v": 1}

The keys that make and check the signatures, and their files, are in :mod:`ledger.keys`.

Raises :class:`ledger.errors.CheckpointError` for malformed checkpoints and
:class:`ledger.errors.CheckpointSignatureError` for a checkpoint without signatures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ledger.canonical import canonical_json
from ledger.errors import CheckpointError, CheckpointSignatureError

ED25519 = "ed25519"
MLDSA65 = "ml-dsa-65"
ALGORITHMS = (ED25519, MLDSA65)
SIGNATURE_CONTEXT = b"alliance-ledger/checkpoint/v1\n"
ZERO_HASH = bytes(32)
FORMAT_VERSION = 1

_ORIGIN_RE = re.compile(r"[\x21-\x7e]{1,255}")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,19}")


def b64(data: bytes) -> str:
    """Standard base64 with padding, as text. Raises nothing."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str, exc: type[Exception] = CheckpointError) -> bytes:
    """Strict standard base64: re-encoding must give the same text. Raises ``exc``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as err:
        raise exc(f"{what} is not valid base64") from err
    if b64(data) != text:
        raise exc(f"{what} is not canonical base64")
    return data


def signed_message(body: bytes) -> bytes:
    """What a signature of a checkpoint body is over: ``SIGNATURE_CONTEXT + body``.

    Raises nothing.
    """
    return SIGNATURE_CONTEXT + body


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: ``origin``, ``size``, ``root``, ``prev`` (previous body hash), ``time`` (ms).

    Raises CheckpointError on construction when a field is out of range.
    """

    origin: str
    size: int
    root: bytes
    prev: bytes
    time: int

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not _ORIGIN_RE.fullmatch(self.origin):
            raise CheckpointError("origin must be 1-255 printable ASCII characters, no spaces")
        for name in ("size", "time"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise CheckpointError(f"{name} must be an integer in [0, 2^63)", size=None)
        for name in ("root", "prev"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise CheckpointError(f"{name} must be 32 bytes", size=self.size)

    def body(self) -> bytes:
        """The canonical body bytes (see the module docstring). Raises nothing."""
        return (
            f"{self.origin}\n{self.size}\n{b64(self.root)}\n"
            f"prev {b64(self.prev)}\ntime {self.time}\n"
        ).encode("ascii")

    def body_hash(self) -> bytes:
        """SHA-256 of :meth:`body`: what the next checkpoint's ``prev`` holds. Raises nothing."""
        return hashlib.sha256(self.body()).digest()

    @classmethod
    def from_body(cls, body: bytes) -> Checkpoint:
        """Parse a canonical body. Raises CheckpointError when it is not exactly canonical."""
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError as err:
            raise CheckpointError("checkpoint body is not ASCII") from err
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint body must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) != 5:
            raise CheckpointError(f"checkpoint body has {len(lines)} lines, expected 5")
        origin, size_s, root_s, prev_line, time_line = lines
        if not _DECIMAL_RE.fullmatch(size_s):
            raise CheckpointError("tree size is not a canonical decimal")
        if not prev_line.startswith("prev "):
            raise CheckpointError("fourth line must be 'prev <base64>'")
        if not time_line.startswith("time ") or not _DECIMAL_RE.fullmatch(time_line[5:]):
            raise CheckpointError("fifth line must be 'time <decimal>'")
        cp = cls(
            origin=origin,
            size=int(size_s),
            root=unb64(root_s, "root"),
            prev=unb64(prev_line[5:], "prev"),
            time=int(time_line[5:]),
        )
        if cp.body() != body:
            raise CheckpointError("checkpoint body is not canonical", size=cp.size)
        return cp


class Signature(NamedTuple):
    """One signature line: institution ``key_name``, algorithm ``alg``, signature bytes."""

    key_name: str
    alg: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint with its signatures: the writer's pair first, then cosignatures."""

    checkpoint: Checkpoint
    signatures: tuple[Signature, ...] = field(default=())

    @property
    def writer(self) -> str:
        """The writing institution (first signature's key name). Raises CheckpointSignatureError
        when there is no signature."""
        if not self.signatures:
            raise CheckpointSignatureError("checkpoint carries no signature")
        return self.signatures[0].key_name

    def signers(self) -> list[str]:
        """Distinct institutions that signed, in order of first appearance. Raises nothing."""
        return list(dict.fromkeys(s.key_name for s in self.signatures))

    def body(self) -> bytes:
        """The checkpoint's canonical body. Raises nothing."""
        return self.checkpoint.body()

    def body_hash(self) -> bytes:
        """SHA-256 of the checkpoint body (the next checkpoint's ``prev``). Raises nothing."""
        return self.checkpoint.body_hash()

    def merge(self, other: SignedCheckpoint) -> SignedCheckpoint:
        """This checkpoint with ``other``'s signatures added (same body required; duplicates of
        the same key name and algorithm dropped). Raises CheckpointError for another body."""
        if other.checkpoint != self.checkpoint:
            raise CheckpointError("cannot merge signatures of different checkpoints")
        seen = {(s.key_name, s.alg) for s in self.signatures}
        extra = tuple(s for s in other.signatures if (s.key_name, s.alg) not in seen)
        return SignedCheckpoint(self.checkpoint, self.signatures + extra)

    def to_json(self) -> dict[str, Any]:
        """The JSON object form (see the module docstring). Raises nothing."""
        return {
            "v": FORMAT_VERSION,
            "body": b64(self.body()),
            "signatures": [
                {"name": s.key_name, "alg": s.alg, "sig": b64(s.sig)} for s in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        """RFC 8785 canonical JSON bytes. Raises nothing."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> SignedCheckpoint:
        """Parse the JSON object form strictly. Raises CheckpointError."""
        if not isinstance(obj, dict) or set(obj) != {"v", "body", "signatures"}:
            raise CheckpointError("signed checkpoint must have exactly v, body, signatures")
        if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
            raise CheckpointError(f"unsupported signed checkpoint version {obj['v']!r}")
        if not isinstance(obj["body"], str) or not isinstance(obj["signatures"], list):
            raise CheckpointError("body must be a string and signatures a list")
        checkpoint = Checkpoint.from_body(unb64(obj["body"], "body"))
        sigs = []
        for i, item in enumerate(obj["signatures"]):
            if not isinstance(item, dict) or set(item) != {"name", "alg", "sig"}:
                raise CheckpointError(f"signature {i} must have exactly name, alg, sig")
            name, alg, sig = item["name"], item["alg"], item["sig"]
            if not (isinstance(name, str) and isinstance(alg, str) and isinstance(sig, str)):
                raise CheckpointError(f"signature {i} fields must be strings")
            sigs.append(Signature(name, alg, unb64(sig, f"signature {i}")))
        return cls(checkpoint, tuple(sigs))

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedCheckpoint:
        """Parse canonical JSON bytes; non-canonical input is rejected. Raises CheckpointError."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError("signed checkpoint is not valid JSON") from err
        signed = cls.from_json(obj)
        if signed.to_bytes() != data:
            raise CheckpointError("signed checkpoint is not in canonical form")
        return signed
