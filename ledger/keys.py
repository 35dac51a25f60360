"""Institutions' checkpoint keys: signing, verifying, and the key and trust files.

An institution signs every checkpoint body with two keys, Ed25519 and ML-DSA-65 (FIPS 204),
and both signatures are required (the signed-checkpoint format is in :mod:`ledger.checkpoint`).
:class:`Signer` holds the private keys and writes them to a private key file (RFC 8785 JSON,
mode 0600)::

    {"ed25519": "<base64 private key>", "ml-dsa-65": "<base64 seed>", "name": "<institution>",
     "v": 1}

:class:`TrustedKeys` maps institution names to their :class:`PublicKeys`; it is read from and
written to the trust file (RFC 8785 JSON, see :class:`TrustedKeys`). :func:`verify_signatures`
and :func:`valid_cosigners` check a signed checkpoint's signatures against them. Files are
written with :func:`ledger.durable.write_durably`.

Raises :class:`ledger.errors.CheckpointSignatureError` for signatures that do not verify and
invalid names or keys, and :class:`ledger.errors.KeyFileError` for unreadable key or trust files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from ledger.checkpoint import (
    ALGORITHMS,
    ED25519,
    FORMAT_VERSION,
    MLDSA65,
    Checkpoint,
    Signature,
    SignedCheckpoint,
    b64,
    signed_message,
    unb64,
)
from ledger.durable import PRIVATE, PUBLIC, write_durably
from ledger.errors import CheckpointSignatureError, KeyFileError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CheckpointSignatureError(f"invalid institution name {name!r}")


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
        """Write the private key file (JSON, mode 0600, atomically and durably).

        Raises KeyFileError.
        """
        data = rfc8785.dumps(
            {
                "v": FORMAT_VERSION,
                "name": self.name,
                ED25519: b64(self._ed.private_bytes_raw()),
                MLDSA65: b64(self._ml.private_bytes_raw()),
            }
        )
        try:
            write_durably(Path(path), data, mode=PRIVATE)
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
            ed = unb64(str(obj[ED25519]), ED25519, KeyFileError)
            ml = unb64(str(obj[MLDSA65]), MLDSA65, KeyFileError)
            return cls(
                obj["name"],
                Ed25519PrivateKey.from_private_bytes(ed),
                MLDSA65PrivateKey.from_seed_bytes(ml),
            )
        except (ValueError, CheckpointSignatureError, KeyFileError) as err:
            raise KeyFileError(f"invalid key material: {err}", path=path) from err

    def signatures(self, body: bytes) -> tuple[Signature, Signature]:
        """This institution's Ed25519 and ML-DSA-65 signatures over a body. Raises nothing."""
        msg = signed_message(body)
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
        msg = signed_message(body)
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
                    name: {ED25519: b64(pk.ed25519), MLDSA65: b64(pk.mldsa65)}
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
                        unb64(str(entry[ED25519]), ED25519, KeyFileError),
                        unb64(str(entry[MLDSA65]), MLDSA65, KeyFileError),
                    ),
                )
            return out
        except (ValueError, CheckpointSignatureError) as err:
            raise KeyFileError(f"invalid trust file: {err}") from err

    def save(self, path: Path) -> None:
        """Write the trust file atomically and durably (mode 0644). Raises KeyFileError."""
        try:
            write_durably(Path(path), self.to_bytes(), mode=PUBLIC)
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
