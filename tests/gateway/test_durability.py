"""SIGKILL the gateway while Bundles (or HL7 v2 messages over MLLP) stream in; after restart
nothing acknowledged is lost, and HL7 messages that were in flight are accepted at once when
re-sent, each stored exactly once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Settings
from gateway.crypto import record_id
from gateway.demo import free_port
from gateway.mllp.client import MLLPClient
from gateway.runtime import load_secrets
from ledger.leaves import decode_leaf
from mappings.v2.common import ConversionOptions, stable_id
from mappings.v2.parse import parse
from tests.gateway.conftest import FHIR, FIXTURES, bearer, demo_bundle, settings_for
from tests.gateway_process import gateway_env, serve, stop


def _start(
    settings: Settings, port: int, log: Path, *, mllp_port: int | None = None
) -> subprocess.Popen[bytes]:
    extra = {}
    if mllp_port is not None:
        extra = {"GATEWAY_MLLP_ENABLED": "true", "GATEWAY_MLLP_PORT": str(mllp_port)}
    return serve(gateway_env(settings, **extra), port, log)


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
    token = bearer(settings)

    async def poster(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=token) as c:
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
    # Kill once enough was acknowledged (more requests are in flight then), not after a fixed
    # time: on a loaded machine the first acknowledgement alone can take seconds.
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    await asyncio.gather(*tasks)
    assert len(acked) > 20, "too few Bundles acknowledged before the kill to test anything"

    proc = _start(settings, port, log)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=token) as c:
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
        stop([proc])
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "verify", "--blobs"],
        env=gateway_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify: OK" in out.stdout


HL7_BASE = (FIXTURES / "hl7v2" / "adt_a03.hl7").read_bytes()


def _hl7(control_id: str) -> bytes:
    return HL7_BASE.replace(b"|ADT0002|", f"|{control_id}|".encode(), 1)


@pytest.mark.services
@pytest.mark.slow
async def test_sigkill_under_mllp_load_inflight_messages_accepted_at_once_and_stored_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """16 MLLP connections send HL7 v2 messages; the gateway is SIGKILLed and restarted at
    once. Every message that had no ACK, re-sent, is accepted (AA) at once: the restarted
    gateway takes over the de-duplication claims of its dead predecessor instead of answering
    CE/AE until they expire, and a message it had stored but not acknowledged is recognised,
    not stored again. Every acknowledged message is readable; each is anchored exactly once."""
    services = request.getfixturevalue("services")
    settings = settings_for("production", tmp_path / "gw", services)
    port, mllp_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    proc = _start(settings, port, log, mllp_port=mllp_port)
    acked: dict[str, bytes] = {}
    inflight: dict[int, tuple[str, bytes]] = {}

    async def sender(n: int) -> None:
        try:
            async with MLLPClient("127.0.0.1", mllp_port, timeout=20) as c:
                for i in range(10_000):
                    control_id = f"K{n}-{i}"
                    raw = _hl7(control_id)
                    inflight[n] = (control_id, raw)
                    ack = await c.send(raw)
                    assert f"MSA|AA|{control_id}".encode() in ack, ack
                    acked[control_id] = raw
                    del inflight[n]
        except (ConnectionError, OSError, TimeoutError):
            return

    tasks = [asyncio.create_task(sender(n)) for n in range(16)]
    await asyncio.sleep(3.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert len(acked) > 20, "too few messages acknowledged before the kill to test anything"
    assert inflight, "no message was in flight at the kill"

    proc = _start(settings, port, log, mllp_port=mllp_port)
    try:
        started = time.monotonic()
        async with MLLPClient("127.0.0.1", mllp_port, timeout=30) as c:
            for control_id, raw in inflight.values():
                ack = await c.send(raw)
                assert f"MSA|AA|{control_id}".encode() in ack, (control_id, ack)
                acked[control_id] = raw
        # "At once": far below the 120 s lifetime of a claim.
        assert time.monotonic() - started < 30
        pseudonym_key, _ = load_secrets(settings)
        options = ConversionOptions(
            institution=settings.institution,
            id_secret=hmac.new(pseudonym_key, b"hl7-resource-ids", hashlib.sha256).digest(),
        )
        facility = parse(HL7_BASE).sending_facility_id or "unknown"
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=bearer(settings)
        ) as http:
            for control_id, raw in acked.items():
                binary_id = stable_id(options, "Binary", facility, control_id)
                r = await http.get(f"/fhir/Binary/{binary_id}")
                assert r.status_code == 200, (control_id, r.text)
                assert base64.b64decode(r.json()["data"]) == raw
            size = int(
                (await http.get("/ledger/checkpoint", params={"final": "false"})).json()[
                    "tree_size"
                ]
            )
            records: dict[str, int] = {}
            for start in range(0, size, 1000):
                page = await http.get("/ledger/leaves", params={"start": start, "end": size})
                for data in page.json()["leaves"]:
                    leaf = decode_leaf(base64.b64decode(data))
                    if leaf["kind"] == "record":
                        records[str(leaf["record"])] = records.get(str(leaf["record"]), 0) + 1
        for control_id in acked:
            container = stable_id(options, "Bundle", facility, control_id)
            rec = record_id(pseudonym_key, settings.institution, "Bundle", container)
            assert records.get(rec) == 1, (control_id, records.get(rec))
    finally:
        stop([proc])
