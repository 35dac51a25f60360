"""Production state store: Redis, shared by every gateway worker of an institution.

Keys are prefixed (``gw:<institution>:``). Raises BackendError (backend "redis").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from gateway.backends.protocols import StateItem
from gateway.backends.redis_common import call, connect, eval_script, pipeline

NAME = "redis"

#: KEYS[1] the key, KEYS[2] (optional) the guard; ARGV expected value, new value, PX or "".
REPLACE_IF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


class RedisStateStore:
    """Hot state in Redis."""

    name = NAME

    def __init__(self, *, url: str, prefix: str = "gw:", timeout: float = 5.0) -> None:
        self.prefix = prefix
        self._timeout = timeout
        self._r: aioredis.Redis = connect(url, timeout)

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def _call(
        self, what: str, command: Callable[[], Awaitable[Any]], *, retry: bool = True
    ) -> Any:
        return await call(self._r, what, command, backend=NAME, timeout=self._timeout, retry=retry)

    async def get(self, key: str) -> bytes | None:
        """The value or None."""
        value = await self._call("get", lambda: self._r.get(self._k(key)))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Set unconditionally."""
        await self._call("set", lambda: self._r.set(self._k(key), value, px=_px(ttl)))

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """SET NX; True when this call set it."""
        return bool(
            await self._call(
                "set", lambda: self._r.set(self._k(key), value, px=_px(ttl), nx=True), retry=False
            )
        )

    async def claim_many(self, items: Sequence[StateItem]) -> list[bytes | None]:
        """``SET key value NX GET PX ttl`` for each item in one pipeline (Redis 7: returns the
        value already there, or nil when this command set it). Not retried."""
        if not items:
            return []
        commands = [
            (b"SET", self._k(key).encode(), value, b"NX", b"GET", *_px_args(ttl))
            for key, value, ttl in items
        ]
        results = await self._call("claim", lambda: pipeline(self._r, commands), retry=False)
        return [None if r is None else bytes(r) for r in results]

    async def set_many(self, items: Sequence[StateItem]) -> None:
        """SET of each item in one pipeline (idempotent: retried once after a lost link)."""
        commands = [
            (b"SET", self._k(key).encode(), value, *_px_args(ttl)) for key, value, ttl in items
        ]
        if commands:
            await self._call("set", lambda: pipeline(self._r, commands))

    async def replace_if(
        self,
        key: str,
        expected: bytes,
        value: bytes,
        *,
        ttl: float | None = None,
        unless_exists: str | None = None,
    ) -> bool:
        """Compare-and-set in one Lua script (atomic on the server), guarded by the absence of
        ``unless_exists``. Not retried (a second attempt would see its own first one)."""
        keys = [self._k(key)] + ([] if unless_exists is None else [self._k(unless_exists)])
        px = _px(ttl)
        args = [expected, value, b"" if px is None else b"%d" % px]
        done = await self._call(
            "replace", lambda: eval_script(self._r, REPLACE_IF, keys, args), retry=False
        )
        return bool(done)

    async def delete(self, key: str) -> None:
        """DEL."""
        await self._call("delete", lambda: self._r.delete(self._k(key)))

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """INCRBY (the TTL is set when the key is created)."""
        k = self._k(key)
        value = int(await self._call("incr", lambda: self._r.incrby(k, amount), retry=False))
        px = _px(ttl)
        if px is not None and value == amount:
            await self._call("expire", lambda: self._r.pexpire(k, px))
        return value

    async def ping(self) -> None:
        """PING."""
        await self._call("ping", lambda: self._r.ping())

    async def close(self) -> None:
        """Close the connection pool."""
        await self._r.aclose()


def _px_args(ttl: float | None) -> tuple[bytes, ...]:
    """``PX <ms>`` for a TTL, nothing for no expiry."""
    px = _px(ttl)
    return () if px is None else (b"PX", b"%d" % px)


def _px(ttl: float | None) -> int | None:
    """A TTL in whole milliseconds for Redis (at least 1), or None for no expiry."""
    return None if ttl is None else max(1, int(ttl * 1000))
