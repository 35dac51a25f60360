"""What the two Redis adapters share: how they connect and how a command's errors are handled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import BackendError


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client for ``url`` (connections are made lazily). Reads have no timeout of their own:
    :func:`call` bounds each whole command or pipeline instead (a per-reply timeout costs a
    timer per reply, a noticeable share of the gateway's CPU on the HL7 path)."""
    return aioredis.from_url(
        url,
        socket_timeout=None,
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
    timeout: float,
    retry: bool = True,
) -> Any:
    """Run one command (or pipeline), each attempt within ``timeout`` seconds. After a
    connection error or a timeout the pool is reset and an idempotent command (``retry``) runs
    once more. Raises BackendError naming ``backend`` and ``what``."""
    try:
        try:
            async with asyncio.timeout(timeout):
                return await command()
        except (RedisConnectionError, RedisTimeoutError, TimeoutError):
            await client.connection_pool.disconnect()
            if not retry:  # not idempotent: the first attempt may have been applied
                raise
            async with asyncio.timeout(timeout):
                return await command()
    except TimeoutError as exc:
        raise BackendError(f"{what}: no answer within {timeout:g} s", backend=backend) from exc
    except (RedisError, OSError) as exc:
        raise BackendError(f"{what}: {type(exc).__name__}: {exc}", backend=backend) from exc
