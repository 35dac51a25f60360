"""Each backend contract test runs against the embedded and the production implementation."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.backends.blobs_kubo import KuboBlobStore
from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.keys_file import FileKeyStore
from gateway.backends.keys_redis import RedisKeyStore
from gateway.backends.log_file import FileLog
from gateway.backends.log_jetstream import JetStreamLog
from gateway.backends.protocols import BlobStore, StateStore
from gateway.backends.state_memory import MemoryStateStore
from gateway.backends.state_redis import RedisStateStore

IMPLS = [pytest.param("embedded"), pytest.param("production", marks=pytest.mark.services)]
MASTER = secrets.token_bytes(32)


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _services(request: pytest.FixtureRequest, impl: str) -> Any:
    return request.getfixturevalue("services") if impl == "production" else None


@pytest.fixture
async def blobs(impl: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    s = _services(request, impl)
    store: BlobStore = (
        LocalBlobStore(directory=tmp_path / "blocks")
        if s is None
        else KuboBlobStore(base_url=s.kubo_url)
    )
    yield store
    await store.close()


def make_log(impl: str, tmp_path: Path, s: Any, name: str | None = None) -> Any:
    if s is None:
        return FileLog(path=tmp_path / "log.bin")
    return JetStreamLog(
        servers=s.nats_urls, stream=name or f"C{uuid.uuid4().hex[:10].upper()}", replicas=3
    )


@pytest.fixture
async def log(impl: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    backend = make_log(impl, tmp_path, _services(request, impl))
    yield backend
    await backend.close()


@pytest.fixture
async def state(impl: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    s = _services(request, impl)
    store: StateStore = (
        MemoryStateStore()
        if s is None
        else RedisStateStore(url=s.redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    )
    yield store
    await store.close()


def make_keys(impl: str, tmp_path: Path, s: Any, prefix: str) -> Any:
    if s is None:
        return FileKeyStore(path=tmp_path / "keys.jsonl", master_key=MASTER)
    return RedisKeyStore(url=s.redis_url, prefix=prefix, master_key=MASTER)


@pytest.fixture
async def keys(impl: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    store = make_keys(impl, tmp_path, _services(request, impl), f"t{uuid.uuid4().hex[:8]}:")
    yield store
    await store.close()
