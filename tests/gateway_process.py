"""``gateway serve`` as a child process, for the tests that need a real one (SIGKILL and
restart, two processes of one gateway sharing Redis): its environment from a
:class:`gateway.config.Settings`, start and wait until it answers, stop.

Every wait is bounded. :func:`serve` raises AssertionError (the test fails, with the end of
the gateway's log) when the process exits or does not answer within ``timeout`` seconds.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from gateway.config import Settings

#: The Settings fields a test gateway differs by, passed as ``GATEWAY_<NAME>``.
SETTINGS_ENV = (
    "profile",
    "data_dir",
    "institution",
    "kubo_url",
    "nats_urls",
    "redis_url",
    "postgres_url",
    "nats_stream",
    "redis_prefix",
)


def gateway_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with the fields of ``settings`` that are set, MLLP off and
    warnings-only logs, then ``extra`` (``GATEWAY_...`` names). Raises nothing."""
    env = dict(os.environ)
    for name in SETTINGS_ENV:
        value = getattr(settings, name)
        if value is not None:
            env[f"GATEWAY_{name.upper()}"] = str(value)
    env["GATEWAY_MLLP_ENABLED"] = "false"
    env["GATEWAY_LOG_LEVEL"] = "WARNING"
    env.update(extra)
    return env


def serve(
    env: dict[str, str],
    port: int,
    log: Path,
    *,
    timeout: float = 60.0,
    base: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``gateway serve`` on ``port`` with ``env``, output appended to ``log``; return
    once ``{base}/healthz`` answers 200 (``base``: ``http://127.0.0.1:{port}`` unless given,
    such as an ``https://`` one checked with ``verify``). Raises AssertionError when the process
    exits first or does not answer within ``timeout`` seconds (it is killed then)."""
    url = f"{base or f'http://127.0.0.1:{port}'}/healthz"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--http-port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    raise AssertionError(
        f"gateway did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}"
    )


def stop(procs: Iterable[subprocess.Popen[bytes]], *, timeout: float = 30.0) -> None:
    """Terminate each process and wait for it; one that does not end within ``timeout``
    seconds is killed. Raises nothing."""
    running = list(procs)
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
