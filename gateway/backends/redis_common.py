"""What the two Redis adapters share: how they connect and how a command's errors are handled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
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


def pack_commands(commands: Sequence[Sequence[bytes]]) -> bytes:
    """The RESP encoding of ``commands`` (each a sequence of byte-string arguments)."""
    out = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


async def pipeline(client: aioredis.Redis, commands: Sequence[Sequence[bytes]]) -> list[Any]:
    """Send ``commands`` in one write on one pooled connection and return their raw replies
    (bytes, integers, None). The hot paths' batches go this way: redis-py's pipeline object
    costs about three times the CPU per command (36 against 11-14 µs measured here), which
    the HL7 path pays three times per message. Raises what redis-py raises (an error reply:
    ResponseError, after which the connection is dropped since later replies are unread)."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(pack_commands(commands))
        return [await conn.read_response(disable_decoding=True) for _ in commands]
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def eval_script(
    client: aioredis.Redis, script: str, keys: Sequence[str], args: Sequence[bytes]
) -> Any:
    """Run a Lua ``script`` (EVAL; used off the hot paths only) with ``keys`` and ``args``;
    its reply. Raises what redis-py raises."""
    return await client.eval(script, len(keys), *keys, *args)
