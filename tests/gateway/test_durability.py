"""SIGKILL the gateway while Bundles stream in; after restart nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import free_port
from tests.gateway.conftest import FHIR, demo_bundle, settings_for


def _env_for(settings: Any) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "profile",
        "data_dir",
        "institution",
        "kubo_url",
        "nats_urls",
        "redis_url",
        "postgres_url",
        "nats_stream",
        "redis_prefix",
    ):
        env[f"GATEWAY_{name.upper()}"] = str(getattr(settings, name))
    env["GATEWAY_MLLP_ENABLED"] = "false"
    env["GATEWAY_LOG_LEVEL"] = "WARNING"
    return env


def _start(settings: Any, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--http-port", str(port)],
            env=_env_for(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"gateway did not become ready: {log.read_text()[-3000:]}")


@pytest.mark.parametrize(
    "profile", ["embedded", pytest.param("production", marks=pytest.mark.services)]
)
async def test_sigkill_loses_nothing_acknowledged(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    services = request.getfixturevalue("services") if profile == "production" else None
    settings = settings_for(profile, tmp_path / "gw", services)
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = _start(settings, port, log)
    acked: list[tuple[str, dict[str, Any]]] = []
    base = f"http://127.0.0.1:{port}"

    async def poster(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            i = 0
            while True:
                bundle = demo_bundle()
                bundle["entry"][0]["resource"]["identifier"][0]["value"] = f"HC-{n}-{i}"
                i += 1
                try:
                    r = await c.post("/fhir", content=json.dumps(bundle), headers=FHIR)
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    for sent, entry in zip(bundle["entry"], r.json()["entry"], strict=True):
                        acked.append((entry["response"]["location"], sent["resource"]))

    tasks = [asyncio.create_task(poster(n)) for n in range(8)]
    # Under load for 2 s, or until enough is acknowledged on a slow (shared) machine.
    deadline = time.monotonic() + 30
    await asyncio.sleep(2.0)
    while len(acked) <= 40 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    await asyncio.gather(*tasks)
    assert len(acked) > 20, "too few Bundles acknowledged before the kill to test anything"

    proc = _start(settings, port, log)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            for location, sent in acked:
                rtype, rid, _, version = location.split("/")
                r = await c.get(f"/fhir/{rtype}/{rid}")
                assert r.status_code == 200, (location, r.text)
                assert r.json()["meta"]["versionId"] == version
                assert (
                    r.json()["status" if rtype == "Observation" else "gender"]
                    == sent["status" if rtype == "Observation" else "gender"]
                )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "verify", "--blobs"],
        env=_env_for(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify: OK" in out.stdout
