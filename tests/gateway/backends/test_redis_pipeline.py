"""The lean Redis pipeline of the hot paths: RESP encoding, and an error reply mid-batch."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.backends.redis_common import connect, pack_commands, pipeline


def test_pack_commands_is_resp() -> None:
    assert pack_commands([(b"SET", b"k", b"v\r\n"), (b"GET", b"k")]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    )
    assert pack_commands([]) == b""


@pytest.mark.services
async def test_replies_in_order_and_an_error_reply_drops_the_connection(services: Any) -> None:
    client: aioredis.Redis = connect(services.redis_url, 5.0)
    key = f"test:pipe:{uuid.uuid4().hex}".encode()
    try:
        replies = await pipeline(
            client,
            [
                (b"SET", key, b"\x00binary\xff", b"NX", b"GET", b"PX", b"60000"),
                (b"SET", key, b"other", b"NX", b"GET", b"PX", b"60000"),
                (b"GET", key),
            ],
        )
        assert replies == [None, b"\x00binary\xff", b"\x00binary\xff"]
        with pytest.raises(ResponseError):
            await pipeline(client, [(b"GET", key), (b"INCR", key), (b"GET", key)])
        # The connection with unread replies was dropped: the next batch reads its own.
        assert await pipeline(client, [(b"GET", key), (b"DEL", key)]) == [b"\x00binary\xff", 1]
    finally:
        await client.aclose()
