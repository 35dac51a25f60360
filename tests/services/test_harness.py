"""The services harness itself: health, node control, failing loudly, and no orphan left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.backends.log_jetstream import JetStreamLog
from tests.services.harness import NODES, ServiceError, Services

pytestmark = pytest.mark.services


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this process still answers kill(0): reap it first
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited != pid
    except ChildProcessError:
        return True


def _listening(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, int(port))) == 0


def test_env_file_round_trips(services: Services, tmp_path: Path) -> None:
    copy = Services(directory=tmp_path, port_offset=7)
    path = copy.write_env()
    again = Services.from_env_file(path)
    assert again == copy
    assert again.kubo_url.endswith(":15008") and again.redis_url.endswith(":16386/0")
    assert [u.rsplit(":", 1)[1] for u in again.nats_urls] == ["14229", "14230", "14231"]


def _eventually(check: Callable[[], object], timeout: float = 10.0) -> object:
    """The first truthy result of ``check`` within ``timeout`` (elections take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


async def test_running_services_are_healthy_and_report_stream_leaders(services: Services) -> None:
    assert await asyncio.to_thread(_eventually, services.jetstream_ready)
    log = JetStreamLog(servers=services.nats_urls, stream="HARNESSLEADER", replicas=3)
    try:
        await log.append(b"x", expected_last_seq=await log.last_seq(), msg_id=os.urandom(8).hex())
    finally:
        await log.close()

    def leader() -> str | None:
        return services.nats_stream_leader("HARNESSLEADER")

    assert await asyncio.to_thread(_eventually, leader) in NODES
    assert services.nats_stream_leader("NO_SUCH_STREAM") is None


def test_start_then_stop_leaves_no_process(tmp_path: Path) -> None:
    own = Services(directory=tmp_path / "svc", port_offset=300)
    try:
        own.start()
    except ServiceError as exc:
        pytest.fail(f"harness could not start a second set of services: {exc}")
    names = ["kubo", "redis", "postgres", *(f"nats-{n}" for n in NODES)]
    try:
        pids = {n: own.pid(n) for n in names}
        assert all(pids.values()), pids
        assert (tmp_path / "svc" / "env").read_text().count("GATEWAY_") == 6
        own.stop_node("n2", signal.SIGKILL)
        assert own.pid("nats-n2") is None
        own.start_node("n2")
        assert own.pid("nats-n2") is not None
        pids["nats-n2"] = own.pid("nats-n2")
        with pytest.raises(ServiceError, match="ports already in use"):
            Services(directory=tmp_path / "other", port_offset=300).start()
    finally:
        own.stop()
    assert not any(_alive(pid) for pid in pids.values() if pid)
    assert not _listening(own.kubo_url) and not _listening(own.redis_url)
    assert not _listening(own.postgres_url.replace("gateway@", ""))
    assert not any(_listening(u) for u in own.nats_urls)
    assert not list((tmp_path / "svc" / "pids").iterdir())


def test_a_service_that_does_not_come_up_fails_with_its_log(tmp_path: Path) -> None:
    broken = Services(directory=tmp_path / "svc", port_offset=310)
    (tmp_path / "svc" / "kubo").mkdir(parents=True)
    (tmp_path / "svc" / "kubo" / "config").write_text("{not json")
    try:
        with pytest.raises(ServiceError) as err:
            broken.start_kubo()
    finally:
        broken.stop()
    assert "kubo exited while starting" in str(err.value)
    assert "invalid character" in str(err.value).split("\n", 1)[1]  # the tail of its own log
