"""The four seams between the pipeline and the systems behind it.

Each is a small :class:`typing.Protocol`; the production profile implements them over Kubo, NATS
JetStream and Redis, the embedded profile over local files and process memory. The same contract
tests (``tests/gateway/backends/test_contract_*.py``) run against every implementation.

All methods raise :class:`gateway.errors.BackendError` (or a subclass) when the system behind
them fails; no third-party exception escapes an adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed store for ciphertexts. CIDs are CIDv1, raw codec, sha2-256, base32."""

    name: str

    async def put_many(self, blocks: Sequence[bytes]) -> list[str]:
        """Store and pin every block in one batched call; return their CIDs in order.

        Returns only once every block is durable. Raises BackendError.
        """
        ...

    async def get(self, cid: str) -> bytes:
        """Return the block's bytes. Raises BlobNotFoundError, BackendError."""
        ...

    async def ping(self) -> None:
        """Raise BackendError unless the store is reachable."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One message of the ordered log: its 1-based sequence and its bytes."""

    seq: int
    data: bytes


@runtime_checkable
class LogBackend(Protocol):
    """An ordered, durable, append-only log (a JetStream stream, or a local file)."""

    name: str

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Append ``data`` if the log's last sequence is ``expected_last_seq`` (0 = empty log).

        Returns the new message's sequence once it is durable. A retry with the same ``msg_id``
        of a message already appended returns the original sequence and appends nothing.
        Raises LogConflictError when another writer appended first, BackendError otherwise.
        """
        ...

    async def last_seq(self) -> int:
        """Sequence of the last message (0 when empty). Raises BackendError."""
        ...

    def read(self, start_seq: int = 1) -> AsyncIterator[LogEntry]:
        """Yield every message from ``start_seq`` to the current end, in order.

        Raises BackendError.
        """
        ...

    async def ping(self) -> None:
        """Raise BackendError unless the log is reachable and writable."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


#: (key, value, TTL in seconds or None) for the batched state operations.
StateItem = tuple[str, bytes, float | None]


@runtime_checkable
class StateStore(Protocol):
    """Shared hot state: dedup, caches, counters. Values are bytes; TTLs in seconds."""

    name: str

    async def get(self, key: str) -> bytes | None:
        """The value, or None. Raises BackendError."""
        ...

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Set unconditionally. Raises BackendError."""
        ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Set only if absent; True when this call set it. Raises BackendError."""
        ...

    async def claim_many(self, items: Sequence[StateItem]) -> list[bytes | None]:
        """For each (key, value, ttl): set it only if absent, all in one round trip. Per item,
        None when this call set it, else the value already there. Not retried after a
        connection error (it may have been applied). Raises BackendError."""
        ...

    async def set_many(self, items: Sequence[StateItem]) -> None:
        """Set each (key, value, ttl) unconditionally, in one round trip. Raises BackendError."""
        ...

    async def replace_if(
        self,
        key: str,
        expected: bytes,
        value: bytes,
        *,
        ttl: float | None = None,
        unless_exists: str | None = None,
    ) -> bool:
        """Atomically set ``key`` to ``value`` if it holds exactly ``expected`` and, when
        ``unless_exists`` is given, that key is absent (a compare-and-set guarded by another
        key, e.g. a liveness lock). True when this call set it. Not retried after a connection
        error. Raises BackendError."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the key if present. Raises BackendError."""
        ...

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add and return the new value. Raises BackendError."""
        ...

    async def ping(self) -> None:
        """Raise BackendError unless reachable."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A record's data key, wrapped (AES-256-GCM) by a key-encryption key."""

    record_id: str
    kek_id: str
    wrapped: bytes


@runtime_checkable
class KeyStore(Protocol):
    """Key-encryption keys (one per patient pseudonym) and wrapped per-record data keys.

    KEKs are stored wrapped by the gateway's master key; raw KEKs never leave the process.
    """

    name: str

    async def kek_for(self, pseudonym: str) -> tuple[str, bytes]:
        """Return (kek_id, kek) for the patient, creating it durably on first use, and anew
        (another id) once the patient's KEK was destroyed: records stored after an erasure
        get a key of their own. Raises BackendError.
        """
        ...

    async def kek_by_id(self, kek_id: str) -> bytes:
        """Return the KEK. Raises KeyDestroyedError, KeyNotFoundError, BackendError."""
        ...

    async def put_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        """Store wrapped data keys durably, in one batch. Raises BackendError."""
        ...

    async def get_wrapped_key(self, record_id: str) -> WrappedKey:
        """Raises KeyNotFoundError, BackendError."""
        ...

    async def destroy_kek(self, pseudonym: str) -> str:
        """Crypto-shred: destroy the patient's KEK durably; return its id. Raises
        KeyNotFoundError when the patient has no live KEK, BackendError."""
        ...

    async def destroy_wrapped_keys(self, record_ids: Sequence[str]) -> int:
        """Crypto-shred single records: destroy the wrapped data keys filed under these ids
        (the ciphertexts' SHA-256) durably, leaving no copy in the store; ids without a key
        are skipped. Returns how many were destroyed. Raises BackendError."""
        ...

    async def ping(self) -> None:
        """Raise BackendError unless reachable."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(slots=True)
class Backends:
    """The four adapters a gateway runs on."""

    blobs: BlobStore
    log: LogBackend
    state: StateStore
    keys: KeyStore

    async def close(self) -> None:
        """Close every adapter."""
        for b in (self.blobs, self.log, self.state, self.keys):
            await b.close()
