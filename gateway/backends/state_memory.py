"""Embedded state store: process memory with TTLs (one gateway process, nothing shared)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.backends.protocols import StateItem


class MemoryStateStore:
    """A dict with expiry times."""

    name = "memory-state"

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float | None]] = {}

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    @staticmethod
    def _expiry(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    async def get(self, key: str) -> bytes | None:
        """The value, or None."""
        return self._live(key)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Set unconditionally."""
        self._data[key] = (value, self._expiry(ttl))

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Set only if absent; True when this call set it."""
        if self._live(key) is not None:
            return False
        self._data[key] = (value, self._expiry(ttl))
        return True

    async def claim_many(self, items: Sequence[StateItem]) -> list[bytes | None]:
        """Per item: set if absent (None), else the value present."""
        out: list[bytes | None] = []
        for key, value, ttl in items:
            current = self._live(key)
            if current is None:
                self._data[key] = (value, self._expiry(ttl))
            out.append(current)
        return out

    async def set_many(self, items: Sequence[StateItem]) -> None:
        """Set each unconditionally."""
        for key, value, ttl in items:
            self._data[key] = (value, self._expiry(ttl))

    async def replace_if(
        self,
        key: str,
        expected: bytes,
        value: bytes,
        *,
        ttl: float | None = None,
        unless_exists: str | None = None,
    ) -> bool:
        """Compare-and-set, unless ``unless_exists`` is present; True when this call set it."""
        if self._live(key) != expected:
            return False
        if unless_exists is not None and self._live(unless_exists) is not None:
            return False
        self._data[key] = (value, self._expiry(ttl))
        return True

    async def delete(self, key: str) -> None:
        """Remove the key."""
        self._data.pop(key, None)

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add and return the new value (TTL set when the key is created)."""
        current = self._live(key)
        value = int(current or b"0") + amount
        expires = self._data[key][1] if current is not None else self._expiry(ttl)
        self._data[key] = (str(value).encode(), expires)
        return value

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""
