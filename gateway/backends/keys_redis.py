"""Production key store in Redis, shared by every gateway worker of an institution.

KEKs are stored only wrapped by the master key (AES-256-GCM, associated data: KEK id); Redis is
run with ``appendonly yes`` and ``appendfsync always`` so a reply means the write is on disk.
Two workers creating a patient's KEK at once agree through ``SET NX`` on the owner key.
Destroying a KEK deletes its wrapped copy (crypto-shredding), leaves a tombstone and frees the
patient's owner key, so the patient's next record gets a new KEK; destroying wrapped data keys
deletes them. (Redis's append-only file keeps a deleted value until its next rewrite: the
gateway asks for one, ``BGREWRITEAOF``, after each destruction.)
Raises BackendError (backend "redis-keys"), KeyDestroyedError, KeyNotFoundError.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.backends.keys_file import unwrap_kek, wrap_kek
from gateway.backends.protocols import WrappedKey
from gateway.backends.redis_common import call, connect, pipeline
from gateway.errors import BackendError, KeyDestroyedError, KeyNotFoundError

NAME = "redis-keys"


class RedisKeyStore:
    """KEKs and wrapped data keys in Redis."""

    name = NAME

    def __init__(self, *, url: str, prefix: str, master_key: bytes, timeout: float = 5.0) -> None:
        self.prefix = prefix + "keys:"
        self._master = master_key
        self._timeout = timeout
        self._r: aioredis.Redis = connect(url, timeout)

    async def _call(
        self, what: str, command: Callable[[], Awaitable[Any]], *, retry: bool = True
    ) -> Any:
        return await call(self._r, what, command, backend=NAME, timeout=self._timeout, retry=retry)

    async def kek_for(self, pseudonym: str) -> tuple[str, bytes]:
        """(kek id, KEK) of the patient, created durably on first use."""
        owner_key = f"{self.prefix}owner:{pseudonym}"
        existing = await self._call("get", lambda: self._r.get(owner_key))
        if existing is not None:
            kid = existing.decode()
            return kid, await self.kek_by_id(kid)
        kid = secrets.token_hex(16)
        kek = secrets.token_bytes(32)
        await self._call(
            "set", lambda: self._r.set(f"{self.prefix}kek:{kid}", wrap_kek(self._master, kid, kek))
        )
        won = await self._call("setnx", lambda: self._r.set(owner_key, kid, nx=True))
        # Read the owner back rather than trust the reply: a retried SET NX whose first attempt
        # was applied answers "not set" although this call set it.
        winner = kid if won else (await self._call("get", lambda: self._r.get(owner_key))).decode()
        if winner == kid:
            return kid, kek
        await self._call("del", lambda: self._r.delete(f"{self.prefix}kek:{kid}"))
        return winner, await self.kek_by_id(winner)

    async def kek_by_id(self, kek_id: str) -> bytes:
        """The KEK. Raises KeyDestroyedError, KeyNotFoundError."""
        wrapped, destroyed = await self._call(
            "mget",
            lambda: self._r.mget(f"{self.prefix}kek:{kek_id}", f"{self.prefix}destroyed:{kek_id}"),
        )
        if destroyed is not None:
            raise KeyDestroyedError(kek_id)
        if wrapped is None:
            raise KeyNotFoundError(kek_id)
        return unwrap_kek(self._master, kek_id, bytes(wrapped), backend=NAME)

    async def put_wrapped_keys(self, keys: Sequence[WrappedKey]) -> None:
        """Store wrapped data keys in one MSET."""
        if not keys:
            return
        mset = [b"MSET"]
        for k in keys:
            mset += [
                f"{self.prefix}dk:{k.record_id}".encode(),
                orjson.dumps({"kek": k.kek_id, "w": k.wrapped.hex()}),
            ]
        await self._call("mset", lambda: pipeline(self._r, [mset]))

    async def get_wrapped_key(self, record_id: str) -> WrappedKey:
        """Raises KeyNotFoundError."""
        raw = await self._call("get", lambda: self._r.get(f"{self.prefix}dk:{record_id}"))
        if raw is None:
            raise KeyNotFoundError(record_id)
        try:
            obj = json.loads(raw)
            return WrappedKey(record_id, str(obj["kek"]), bytes.fromhex(obj["w"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"wrapped key of {record_id} is damaged", backend=NAME) from exc

    async def destroy_kek(self, pseudonym: str) -> str:
        """Crypto-shred the patient's KEK; returns its id."""
        kid_raw = await self._call("get", lambda: self._r.get(f"{self.prefix}owner:{pseudonym}"))
        if kid_raw is None:
            raise KeyNotFoundError(f"patient key of {pseudonym[:12]}")
        kid = kid_raw.decode()
        pipe = self._r.pipeline(transaction=True)
        pipe.set(f"{self.prefix}destroyed:{kid}", b"1")
        pipe.delete(f"{self.prefix}kek:{kid}")
        pipe.delete(f"{self.prefix}owner:{pseudonym}")
        await self._call("destroy", pipe.execute)
        await self._rewrite_aof()
        return str(kid)

    async def destroy_wrapped_keys(self, record_ids: Sequence[str]) -> int:
        """Crypto-shred records: DEL their wrapped data keys (in chunks). Returns how many
        existed."""
        ids = list(dict.fromkeys(record_ids))
        gone = 0
        for n in range(0, len(ids), 500):
            keys = [f"{self.prefix}dk:{r}" for r in ids[n : n + 500]]

            async def delete(keys: list[str] = keys) -> Any:
                return await self._r.delete(*keys)

            gone += int(await self._call("del", delete))
        if gone:
            await self._rewrite_aof()
        return gone

    async def _rewrite_aof(self) -> None:
        """Ask Redis to rewrite its append-only file, so deleted keys leave the disk too.
        Best effort: one already running (or scheduled) does it as well."""
        # A rewrite in progress: Redis schedules or finishes one anyway.
        with contextlib.suppress(BackendError):
            await self._call("bgrewriteaof", lambda: self._r.bgrewriteaof(), retry=False)

    async def ping(self) -> None:
        """PING."""
        await self._call("ping", lambda: self._r.ping())

    async def close(self) -> None:
        """Close the pool."""
        await self._r.aclose()
