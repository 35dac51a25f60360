"""Pseudonyms and envelope encryption of records.

- Pseudonym: ``HMAC-SHA256(pseudonym key, system|value)`` of the patient's identifier, hex.
  It is what the ledger and the index hold instead of any identifier.
- Record id: ``HMAC-SHA256(pseudonym key, "record|" + custodian + "|" + type/id)``, so that the
  ledger can name a record (and a re-sent resource maps to the same record) without revealing
  its FHIR id, which for HL7-derived resources is computed from source identifiers. The
  custodian (the institution whose gateway stores it) is part of it: every member indexes every
  member's leaves, and ``Patient/p-1`` of two institutions are two records.
- Envelope: a fresh 256-bit data key per record version, AES-256-GCM with a 96-bit random
  nonce; the associated data binds record id, patient pseudonym, resource type and KEK id.
  The data key is wrapped (AES-256-GCM) by the patient's key-encryption key and filed under
  the SHA-256 of the ciphertext (which the record's leaf carries).

Pure functions; raises :class:`gateway.errors.IntegrityError` when authentication fails.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import IntegrityError
from ledger.canonical import canonical_json

NONCE_BYTES = 12
_CIPHERTEXT_MAGIC = b"AGW1"


def pseudonym(key: bytes, system: str, value: str) -> str:
    """The patient's pseudonym for one identifier (hex HMAC-SHA256 of ``system|value``)."""
    return hmac.digest(key, f"{system}|{value}".encode(), "sha256").hex()


def record_id(key: bytes, custodian: str, resource_type: str, resource_id: str) -> str:
    """Opaque, stable id of a FHIR resource of ``custodian`` for the ledger and the index
    (hex, 32 chars)."""
    data = f"record|{custodian}|{resource_type}/{resource_id}".encode()
    return hmac.digest(key, data, "sha256").hex()[:32]


def associated_data(rec_id: str, patient: str, resource_type: str, kek_id: str) -> bytes:
    """The AEAD associated data binding a ciphertext to its record, patient, type and key
    (RFC 8785 JSON). Not the version: a version is taken when the ledger appends the record's
    leaf, after sealing (the leaf's SHA-256 of the ciphertext binds the two).

    The values are hex ids, key ids and resource types, so the fast path of
    :func:`ledger.canonical.canonical_json` applies.
    """
    obj: dict[str, str | int] = {
        "kek": kek_id,
        "patient": patient,
        "record": rec_id,
        "type": resource_type,
    }
    return canonical_json(obj)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed record: the ciphertext (for the blob store) and the wrapped data key."""

    blob: bytes
    wrapped_key: bytes


def seal(plaintext: bytes, *, kek: bytes, aad: bytes) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key and wrap that key with ``kek``."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = wrap_nonce + AESGCM(kek).encrypt(wrap_nonce, data_key, aad)
    return Sealed(blob=_CIPHERTEXT_MAGIC + nonce + ciphertext, wrapped_key=wrapped)


def open_sealed(blob: bytes, wrapped_key: bytes, *, kek: bytes, aad: bytes, record: str) -> bytes:
    """Unwrap the data key and decrypt. Raises IntegrityError naming ``record`` on any failure."""
    if not blob.startswith(_CIPHERTEXT_MAGIC) or len(blob) < 4 + NONCE_BYTES + 16:
        raise IntegrityError("ciphertext has an unknown format", record=record)
    try:
        data_key = AESGCM(kek).decrypt(wrapped_key[:NONCE_BYTES], wrapped_key[NONCE_BYTES:], aad)
        nonce = blob[4 : 4 + NONCE_BYTES]
        return AESGCM(data_key).decrypt(nonce, blob[4 + NONCE_BYTES :], aad)
    except InvalidTag as exc:
        raise IntegrityError(
            "ciphertext or wrapped key failed authentication", record=record
        ) from exc


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()
