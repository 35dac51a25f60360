"""What the two Redis adapters share: how they connect and how a command's errors are handled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import BackendError


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client for ``url`` (connections are made lazily)."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # PING a connection idle for over a second before using it, so that one left stale by
        # a Redis restart is replaced instead of failing a command.
        health_check_interval=1,
    )


async def call(
    client: aioredis.Redis,
    what: str,
    command: Callable[[], Awaitable[Any]],
    *,
    backend: str,
    retry: bool = True,
) -> Any:
    """Run one command. After a connection error the pool is reset and an idempotent command
    (``retry``) runs once more. Raises BackendError naming ``backend`` and ``what``."""
    try:
        try:
            return await command()
        except (RedisConnectionError, RedisTimeoutError):
            await client.connection_pool.disconnect()
            if not retry:  # not idempotent: the first attempt may have been applied
                raise
            return await command()
    except (RedisError, OSError) as exc:
        raise BackendError(f"{what}: {type(exc).__name__}: {exc}", backend=backend) from exc
