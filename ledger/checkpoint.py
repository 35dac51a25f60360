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

Raises :class:`ledger.errors.CheckpointError` for malformed checkpoints,
:class:`ledger.errors.CheckpointSignatureError` for signatures that do not verify, and
:class:`ledger.errors.KeyFileError` for unreadable key or trust files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from ledger.errors import CheckpointError, CheckpointSignatureError, KeyFileError

ED25519 = "ed25519"
MLDSA65 = "ml-dsa-65"
ALGORITHMS = (ED25519, MLDSA65)
SIGNATURE_CONTEXT = b"alliance-ledger/checkpoint/v1\n"
ZERO_HASH = bytes(32)
FORMAT_VERSION = 1

_ORIGIN_RE = re.compile(r"[\x21-\x7e]{1,255}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,19}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, exc: type[Exception] = CheckpointError) -> bytes:
    """Strict standard base64: re-encoding must give the same text. Raises ``exc``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as err:
        raise exc(f"{what} is not valid base64") from err
    if _b64(data) != text:
        raise exc(f"{what} is not canonical base64")
    return data


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CheckpointSignatureError(f"invalid institution name {name!r}")


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
            f"{self.origin}\n{self.size}\n{_b64(self.root)}\n"
            f"prev {_b64(self.prev)}\ntime {self.time}\n"
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
            root=_unb64(root_s, "root"),
            prev=_unb64(prev_line[5:], "prev"),
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
            "body": _b64(self.body()),
            "signatures": [
                {"name": s.key_name, "alg": s.alg, "sig": _b64(s.sig)} for s in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        """RFC 8785 canonical JSON bytes. Raises nothing."""
        return rfc8785.dumps(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> SignedCheckpoint:
        """Parse the JSON object form strictly. Raises CheckpointError."""
        if not isinstance(obj, dict) or set(obj) != {"v", "body", "signatures"}:
            raise CheckpointError("signed checkpoint must have exactly v, body, signatures")
        if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
            raise CheckpointError(f"unsupported signed checkpoint version {obj['v']!r}")
        if not isinstance(obj["body"], str) or not isinstance(obj["signatures"], list):
            raise CheckpointError("body must be a string and signatures a list")
        checkpoint = Checkpoint.from_body(_unb64(obj["body"], "body"))
        sigs = []
        for i, item in enumerate(obj["signatures"]):
            if not isinstance(item, dict) or set(item) != {"name", "alg", "sig"}:
                raise CheckpointError(f"signature {i} must have exactly name, alg, sig")
            name, alg, sig = item["name"], item["alg"], item["sig"]
            if not (isinstance(name, str) and isinstance(alg, str) and isinstance(sig, str)):
                raise CheckpointError(f"signature {i} fields must be strings")
            sigs.append(Signature(name, alg, _unb64(sig, f"signature {i}")))
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


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """An institution's two raw public keys."""

    ed25519: bytes
    mldsa65: bytes

    def __post_init__(self) -> None:
        if len(self.ed25519) != 32:
            raise CheckpointSignatureError("Ed25519 public key must be 32 bytes")
        if len(self.mldsa65) != 1952:
            raise CheckpointSignatureError("ML-DSA-65 public key must be 1952 bytes")


def _message(body: bytes) -> bytes:
    return SIGNATURE_CONTEXT + body


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Signer:
    """An institution's signing identity: a name, an Ed25519 key and an ML-DSA-65 key."""

    def __init__(self, name: str, ed25519: Ed25519PrivateKey, mldsa65: MLDSA65PrivateKey) -> None:
        """Raises CheckpointSignatureError for an invalid institution name."""
        _check_name(name)
        self.name = name
        self._ed = ed25519
        self._ml = mldsa65

    @classmethod
    def generate(cls, name: str) -> Signer:
        """Fresh keys for institution ``name``. Raises CheckpointSignatureError for a bad name."""
        return cls(name, Ed25519PrivateKey.generate(), MLDSA65PrivateKey.generate())

    def public_keys(self) -> PublicKeys:
        """The raw public keys. Raises nothing."""
        return PublicKeys(
            ed25519=self._ed.public_key().public_bytes_raw(),
            mldsa65=self._ml.public_key().public_bytes_raw(),
        )

    def save(self, path: Path) -> None:
        """Write the private key file (JSON, mode 0600, atomic). Raises KeyFileError."""
        data = rfc8785.dumps(
            {
                "v": FORMAT_VERSION,
                "name": self.name,
                ED25519: _b64(self._ed.private_bytes_raw()),
                MLDSA65: _b64(self._ml.private_bytes_raw()),
            }
        )
        try:
            _write_private(Path(path), data)
        except OSError as err:
            raise KeyFileError(f"cannot write key file: {err.strerror}", path=path) from err

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read a key file written by :meth:`save`. It must not be readable by group or others.

        Raises KeyFileError.
        """
        path = Path(path)
        try:
            st = path.stat()
            if st.st_mode & 0o077:
                raise KeyFileError("key file must not be accessible by group or others", path=path)
            obj = json.loads(path.read_bytes())
        except OSError as err:
            raise KeyFileError(f"cannot read key file: {err.strerror}", path=path) from err
        except ValueError as err:
            raise KeyFileError("key file is not valid JSON", path=path) from err
        if not isinstance(obj, dict) or set(obj) != {"v", "name", ED25519, MLDSA65}:
            raise KeyFileError("key file must have exactly v, name, ed25519, ml-dsa-65", path=path)
        if obj["v"] != FORMAT_VERSION or not isinstance(obj["name"], str):
            raise KeyFileError("unsupported key file version or bad name", path=path)
        try:
            ed = _unb64(str(obj[ED25519]), ED25519, KeyFileError)
            ml = _unb64(str(obj[MLDSA65]), MLDSA65, KeyFileError)
            return cls(
                obj["name"],
                Ed25519PrivateKey.from_private_bytes(ed),
                MLDSA65PrivateKey.from_seed_bytes(ml),
            )
        except (ValueError, CheckpointSignatureError, KeyFileError) as err:
            raise KeyFileError(f"invalid key material: {err}", path=path) from err

    def signatures(self, body: bytes) -> tuple[Signature, Signature]:
        """This institution's Ed25519 and ML-DSA-65 signatures over a body. Raises nothing."""
        msg = _message(body)
        return (
            Signature(self.name, ED25519, self._ed.sign(msg)),
            Signature(self.name, MLDSA65, self._ml.sign(msg)),
        )

    def sign(self, checkpoint: Checkpoint) -> SignedCheckpoint:
        """Sign a checkpoint as its writer. Raises nothing."""
        return SignedCheckpoint(checkpoint, self.signatures(checkpoint.body()))

    def cosign(self, signed: SignedCheckpoint) -> SignedCheckpoint:
        """Add this institution's cosignature (no-op if it already signed). Raises nothing.

        Verifying the checkpoint and its consistency first is the caller's (the witness's) job.
        """
        if self.name in signed.signers():
            return signed
        return SignedCheckpoint(
            signed.checkpoint, signed.signatures + self.signatures(signed.body())
        )


def cosign(signed: SignedCheckpoint, witness_signer: Signer) -> SignedCheckpoint:
    """``signed`` with ``witness_signer``'s cosignature added. Raises nothing."""
    return witness_signer.cosign(signed)


class TrustedKeys(Mapping[str, PublicKeys]):
    """Trust configuration: institution name -> public keys.

    The trust file is RFC 8785 canonical JSON::

        {"institutions": {"<name>": {"ed25519": "<base64>", "ml-dsa-65": "<base64>"}}, "v": 1}

    Its SHA-256 (:meth:`digest`) is what a ``key`` leaf of action ``trust`` anchors.
    """

    def __init__(self, keys: Mapping[str, PublicKeys] | None = None) -> None:
        """Raises CheckpointSignatureError for an invalid institution name."""
        self._keys: dict[str, PublicKeys] = {}
        self._ed: dict[str, Ed25519PublicKey] = {}
        self._ml: dict[str, MLDSA65PublicKey] = {}
        for name, pk in (keys or {}).items():
            self.add(name, pk)

    def add(self, name: str, keys: PublicKeys) -> None:
        """Trust (or replace) an institution's keys. Raises CheckpointSignatureError."""
        _check_name(name)
        try:
            ed = Ed25519PublicKey.from_public_bytes(keys.ed25519)
            ml = MLDSA65PublicKey.from_public_bytes(keys.mldsa65)
        except ValueError as err:
            raise CheckpointSignatureError(f"invalid public key: {err}", key_name=name) from err
        self._keys[name], self._ed[name], self._ml[name] = keys, ed, ml

    @classmethod
    def of(cls, signers: Iterable[Signer]) -> TrustedKeys:
        """Trust the public keys of some signers. Raises nothing."""
        return cls({s.name: s.public_keys() for s in signers})

    def __getitem__(self, name: str) -> PublicKeys:
        return self._keys[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, key_name: str, alg: str, sig: bytes, body: bytes) -> None:
        """Check one signature over a checkpoint body. Raises CheckpointSignatureError."""
        if key_name not in self._keys:
            raise CheckpointSignatureError("key name is not trusted", key_name=key_name, alg=alg)
        msg = _message(body)
        try:
            if alg == ED25519:
                self._ed[key_name].verify(sig, msg)
            elif alg == MLDSA65:
                self._ml[key_name].verify(sig, msg)
            else:
                raise CheckpointSignatureError("unknown algorithm", key_name=key_name, alg=alg)
        except InvalidSignature as err:
            raise CheckpointSignatureError(
                "signature does not verify", key_name=key_name, alg=alg
            ) from err

    def to_bytes(self) -> bytes:
        """Canonical trust-file bytes. Raises nothing."""
        return rfc8785.dumps(
            {
                "v": FORMAT_VERSION,
                "institutions": {
                    name: {ED25519: _b64(pk.ed25519), MLDSA65: _b64(pk.mldsa65)}
                    for name, pk in self._keys.items()
                },
            }
        )

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes` (anchored by a ``key`` leaf). Raises nothing."""
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustedKeys:
        """Parse trust-file bytes. Raises KeyFileError."""
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or set(obj) != {"v", "institutions"}:
                raise KeyFileError("trust file must have exactly v and institutions")
            if obj["v"] != FORMAT_VERSION or not isinstance(obj["institutions"], dict):
                raise KeyFileError("unsupported trust file version")
            out = cls()
            for name, entry in obj["institutions"].items():
                if not isinstance(entry, dict) or set(entry) != {ED25519, MLDSA65}:
                    raise KeyFileError(f"institution {name!r} needs exactly ed25519, ml-dsa-65")
                out.add(
                    name,
                    PublicKeys(
                        _unb64(str(entry[ED25519]), ED25519, KeyFileError),
                        _unb64(str(entry[MLDSA65]), MLDSA65, KeyFileError),
                    ),
                )
            return out
        except (ValueError, CheckpointSignatureError) as err:
            raise KeyFileError(f"invalid trust file: {err}") from err

    def save(self, path: Path) -> None:
        """Write the trust file atomically. Raises KeyFileError."""
        try:
            _write_private(Path(path), self.to_bytes())
            os.chmod(path, 0o644)
        except OSError as err:
            raise KeyFileError(f"cannot write trust file: {err.strerror}", path=path) from err

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        """Read a trust file. Raises KeyFileError naming the file."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise KeyFileError(f"cannot read trust file: {err.strerror}", path=path) from err
        try:
            return cls.from_bytes(data)
        except KeyFileError as err:
            raise KeyFileError(str(err), path=path) from err


def verify_signatures(signed: SignedCheckpoint, trusted: TrustedKeys) -> list[str]:
    """Check every signature of ``signed``; return the institutions that signed, writer first.

    Every signature must be by a trusted institution, with a known algorithm, not repeated, and
    valid; every institution present must have both an Ed25519 and an ML-DSA-65 signature.
    Raises CheckpointSignatureError.
    """
    if not signed.signatures:
        raise CheckpointSignatureError("checkpoint carries no signature")
    body = signed.body()
    seen: dict[str, set[str]] = {}
    for s in signed.signatures:
        algs = seen.setdefault(s.key_name, set())
        if s.alg in algs:
            raise CheckpointSignatureError("duplicate signature", key_name=s.key_name, alg=s.alg)
        algs.add(s.alg)
        trusted.verify(s.key_name, s.alg, s.sig, body)
    for name, algs in seen.items():
        missing = sorted(set(ALGORITHMS) - algs)
        if missing:
            raise CheckpointSignatureError(
                f"missing {', '.join(missing)} signature (both are required)",
                key_name=name,
                alg=missing[0],
            )
    return list(seen)


def valid_cosigners(signed: SignedCheckpoint, trusted: TrustedKeys) -> set[str]:
    """Institutions, other than the writer, with both signatures present and valid.

    Invalid or untrusted signatures are ignored here (use :func:`verify_signatures` to reject
    them). Raises nothing.
    """
    if not signed.signatures:
        return set()
    body = signed.body()
    good: dict[str, set[str]] = {}
    for s in signed.signatures:
        try:
            trusted.verify(s.key_name, s.alg, s.sig, body)
        except CheckpointSignatureError:
            continue
        good.setdefault(s.key_name, set()).add(s.alg)
    return {n for n, algs in good.items() if algs >= set(ALGORITHMS) and n != signed.writer}
