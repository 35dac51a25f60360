"""Embedded key store: KEKs and wrapped data keys in a JSON-lines file, loaded into memory.

KEKs (random 256-bit, one per patient pseudonym) are stored wrapped by the master key with
AES-256-GCM (associated data: the KEK id). Appends are fsynced once per batch (and the directory
when the file is created). Destroying a KEK or wrapped data keys (crypto-shredding) rewrites
the file without them (:func:`ledger.durable.write_durably`: a new file renamed over the old),
so no copy is left in the store; the old file's blocks are freed, not overwritten, by the
file system.

Raises BackendError (backend "file-keys"), KeyDestroyedError, KeyNotFoundError.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.backends.protocols import WrappedKey
from gateway.errors import BackendError, KeyDestroyedError, KeyNotFoundError
from ledger.durable import PRIVATE, fsync_directory, make_directory, write_durably

NAME = "file-keys"


def wrap_kek(master: bytes, kek_id: str, kek: bytes) -> bytes:
    """Wrap a KEK with the master key (nonce || ciphertext)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(master).encrypt(nonce, kek, kek_id.encode())


def unwrap_kek(master: bytes, kek_id: str, wrapped: bytes, *, backend: str) -> bytes:
    """Unwrap a KEK. Raises BackendError when the master key does not open it."""
    try:
        return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], kek_id.encode())
    except InvalidTag as exc:
        raise BackendError(
            f"KEK {kek_id} does not open with the master key", backend=backend
        ) from exc


class FileKeyStore:
    """KEKs and wrapped data keys in one append-only file."""

    name = NAME

    def __init__(self, *, path: Path, master_key: bytes) -> None:
        self.path = path
        self._master = master_key
        self._kek_of: dict[str, str] = {}  # pseudonym -> kek id
        self._wrapped_kek: dict[str, bytes] = {}  # kek id -> wrapped KEK
        self._destroyed: dict[str, str] = {}  # kek id -> pseudonym
        self._data_keys: dict[str, WrappedKey] = {}
        self._loaded = False
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        if self._loaded:
            return
        make_directory(self.path.parent)
        if self.path.exists():
            good = 0
            with open(self.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # torn last line (crash mid-append): never acknowledged
                    try:
                        self._apply(json.loads(line))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise BackendError(
                            f"{self.path} line {lineno} (byte {good}) is damaged", backend=NAME
                        ) from exc
                    good += len(line)
            if good < self.path.stat().st_size:
                # Cut the torn line away, or the next append would be glued onto it.
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        self._loaded = True

    def _apply(self, rec: dict[str, Any]) -> None:
        t = rec["t"]
        if t == "kek":
            self._kek_of[rec["owner"]] = rec["id"]
            self._wrapped_kek[rec["id"]] = base64.b64decode(rec["w"])
        elif t == "dk":
            self._data_keys[rec["rec"]] = WrappedKey(
                rec["rec"], rec["kek"], base64.b64decode(rec["w"])
            )
        elif t == "destroyed":
            self._destroyed[rec["id"]] = rec["owner"]
            self._wrapped_kek.pop(rec["id"], None)

    def _append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.path.parent)

    def _rewrite(self) -> None:
        # Tombstones first: a patient's new KEK (after an erasure) is read after them.
        lines: list[dict[str, Any]] = [
            {"t": "destroyed", "id": kid, "owner": owner} for kid, owner in self._destroyed.items()
        ]
        for owner, kid in self._kek_of.items():
            if kid not in self._destroyed:
                lines.append(
                    {
                        "t": "kek",
                        "id": kid,
                        "owner": owner,
                        "w": base64.b64encode(self._wrapped_kek[kid]).decode(),
                    }
                )
        for wk in self._data_keys.values():
            lines.append(
                {
                    "t": "dk",
                    "rec": wk.record_id,
                    "kek": wk.kek_id,
                    "w": base64.b64encode(wk.wrapped).decode(),
                }
            )
        data = b"".join(json.dumps(x, separators=(",", ":")).encode() + b"\n" for x in lines)
        write_durably(self.path, data, mode=PRIVATE)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise BackendError(f"key store {self.path}: {exc}", backend=NAME) from exc

    async def kek_for(self, pseudonym: str) -> tuple[str, bytes]:
        """(kek id, KEK) of the patient, created durably on first use and anew after its
        KEK was destroyed."""
        async with self._lock:
            await self._run(self._load)
            kid = self._kek_of.get(pseudonym)
            if kid is None or kid in self._destroyed:
                kid = secrets.token_hex(16)
                kek = secrets.token_bytes(32)
                wrapped = wrap_kek(self._master, kid, kek)
                await self._run(
                    self._append,
                    [
                        {
                            "t": "kek",
                            "id": kid,
                            "owner": pseudonym,
                            "w": base64.b64encode(wrapped).decode(),
                        }
                    ],
                )
                self._kek_of[pseudonym] = kid
                self._wrapped_kek[kid] = wrapped
                return kid, kek
        return kid, await self.kek_by_id(kid)

    async def kek_by_id(self, kek_id: str) -> bytes:
        """The KEK. Raises KeyDestroyedError, KeyNotFoundError."""
        await self._run(self._load)
        if kek_id in self._destroyed:
            raise KeyDestroyedError(kek_id)
        wrapped = self._wrapped_kek.get(kek_id)
        if wrapped is None:
            raise KeyNotFoundError(kek_id)
        return unwrap_kek(self._master, kek_id, wrapped, backend=NAME)

    async def put_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        """Store wrapped data keys durably (one fsync for the batch)."""
        async with self._lock:
            await self._run(self._load)
            await self._run(
                self._append,
                [
                    {
                        "t": "dk",
                        "rec": k.record_id,
                        "kek": k.kek_id,
                        "w": base64.b64encode(k.wrapped).decode(),
                    }
                    for k in keys
                ],
            )
            for k in keys:
                self._data_keys[k.record_id] = k

    async def get_wrapped_key(self, record_id: str) -> WrappedKey:
        """Raises KeyNotFoundError."""
        await self._run(self._load)
        wk = self._data_keys.get(record_id)
        if wk is None:
            raise KeyNotFoundError(record_id)
        return wk

    async def destroy_kek(self, pseudonym: str) -> str:
        """Crypto-shred the patient's KEK; the file is rewritten without it. Returns its id."""
        async with self._lock:
            await self._run(self._load)
            kid = self._kek_of.get(pseudonym)
            if kid is None or kid in self._destroyed:
                raise KeyNotFoundError(f"patient key of {pseudonym[:12]}")
            self._destroyed[kid] = pseudonym
            self._wrapped_kek.pop(kid, None)
            await self._run(self._rewrite)
            return kid

    async def destroy_wrapped_keys(self, record_ids: Sequence[str]) -> int:
        """Crypto-shred records: the file is rewritten without their wrapped data keys.
        Returns how many were there."""
        async with self._lock:
            await self._run(self._load)
            ids = dict.fromkeys(record_ids)
            gone = [self._data_keys.pop(r) for r in ids if r in self._data_keys]
            if gone:
                try:
                    await self._run(self._rewrite)
                except BackendError:
                    for wk in gone:  # not destroyed after all: the file still holds them
                        self._data_keys[wk.record_id] = wk
                    raise
            return len(gone)

    async def ping(self) -> None:
        """Raise BackendError unless the file can be loaded."""
        await self._run(self._load)

    async def close(self) -> None:
        """Nothing held open."""
