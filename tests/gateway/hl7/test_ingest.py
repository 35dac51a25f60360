"""HL7 v2 over MLLP (and POST /hl7v2) into a running gateway: ACKs, records, dedup, failures.

Runs on both profiles; the production one with real Kubo, JetStream and Redis (dedup state in
Redis, shared by workers).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.protocols import Backends
from gateway.datadir import DataDir
from gateway.errors import IntegrityError
from gateway.hl7.dedup import _key as _dedup_key
from gateway.mllp.client import MLLPClient
from gateway.mllp.framing import END, START
from gateway.runtime import build_backends, load_secrets
from mappings.v2.convert import convert
from mappings.v2.parse import parse
from tests.fakes import FailingBlobs, FailingLog
from tests.gateway.conftest import auth_headers, settings_for

HL7 = Path(__file__).resolve().parents[3] / "fixtures" / "hl7v2"
OPTIONS = json.loads((HL7 / "options.json").read_text())
FIXTURES = sorted(p for p in HL7.glob("*.hl7") if not p.name.startswith("batch"))


def _settings(profile: str, tmp: Path, services: Any) -> Any:
    return settings_for(
        profile,
        tmp / "gw",
        services,
        mllp_enabled=True,
        mllp_port=0,
        institution=OPTIONS["institution"],
        master_id_system=OPTIONS["master_id_system"],
        hl7_authority_systems=OPTIONS["authority_systems"],
        default_tz=OPTIONS["default_tz"],
    )


class App:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.gw = app.state.gateway
        self.port = app.state.mllp.port
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        )

    async def send(self, raw: bytes) -> bytes:
        async with MLLPClient("127.0.0.1", self.port, timeout=30) as c:
            return await c.send(raw)


@pytest.fixture
async def hl7gw(profile: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    services = request.getfixturevalue("services") if profile == "production" else None
    app = create_app(_settings(profile, tmp_path, services))
    async with app.router.lifespan_context(app):
        a = App(app)
        yield a
        await a.http.aclose()


def msa(ack: bytes, codec: str = "utf-8") -> list[str]:
    seg = next(s for s in ack.decode(codec).split("\r") if s.startswith("MSA"))
    return seg.split("|")


def err(ack: bytes) -> list[str]:
    seg = next(s for s in ack.decode().split("\r") if s.startswith("ERR"))
    return seg.split("|")


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
async def test_every_fixture_is_acknowledged_and_readable(hl7gw: App, path: Path) -> None:
    raw = path.read_bytes()
    msg = parse(raw)
    ack = await hl7gw.send(raw)
    codec = (
        "gb18030"
        if b"GB 18030" in raw or b"GB18030" in raw
        else ("latin-1" if b"8859" in raw else "utf-8")
    )
    code = msa(ack, codec)
    assert code[1] in ("AA", "CA") and code[2] == msg.control_id
    expected = convert(msg, options=hl7gw.app.state.hl7.options).resources
    for resource in expected:
        r = await hl7gw.http.get(f"/fhir/{resource['resourceType']}/{resource['id']}")
        assert r.status_code == 200, (resource["resourceType"], r.text)
        got = {k: v for k, v in r.json().items() if k != "meta"}
        assert got == {k: v for k, v in resource.items() if k != "meta"}
    # One ciphertext and one leaf for the whole message; the original message is stored too,
    # encrypted, as a Binary linked by a Provenance to everything produced from it.
    assert hl7gw.gw.index.leaf_kinds["record"] == 1
    anchors = hl7gw.gw.index.all_versions()
    assert len(anchors) == len(expected) + 2
    assert len({(a.cid, a.leaf_index, a.container) for a in anchors}) == 1
    by_type = {a.resource_type: a for a in anchors}
    binary = await hl7gw.gw.pipeline.read_anchor(by_type["Binary"])
    assert base64.b64decode(binary["data"]) == raw
    provenance = await hl7gw.gw.pipeline.read_anchor(by_type["Provenance"])
    targets = {t["reference"] for t in provenance["target"]}
    assert targets == {f"{r['resourceType']}/{r['id']}" for r in expected}
    assert provenance["entity"][0]["what"]["reference"] == f"Binary/{binary['id']}"


async def test_chinese_name_survives_gb18030_round_trip(hl7gw: App) -> None:
    raw = (HL7 / "adt_a01_gb18030.hl7").read_bytes()
    assert "张^三".encode("gb18030") in raw
    await hl7gw.send(raw)
    patient = next(
        r
        for r in convert(parse(raw), options=hl7gw.app.state.hl7.options).resources
        if r["resourceType"] == "Patient"
    )
    back = (await hl7gw.http.get(f"/fhir/Patient/{patient['id']}")).json()
    assert back["name"][0]["family"] + back["name"][0]["given"][0] == "张三"


async def test_duplicate_is_replayed_and_conflict_rejected(hl7gw: App) -> None:
    raw = (HL7 / "adt_a04_escapes.hl7").read_bytes()
    first = await hl7gw.send(raw)
    size = hl7gw.gw.ledger.size
    assert await hl7gw.send(raw) == first
    assert hl7gw.gw.ledger.size == size, "a duplicate was stored again"
    changed = raw.replace(b"PID|1|", b"PID|1|X", 1)
    ack = await hl7gw.send(changed)
    assert msa(ack)[1] in ("AE", "CE") and err(ack)[3].startswith("205^")
    assert hl7gw.gw.ledger.size == size


async def test_reject_and_error_acks(hl7gw: App) -> None:
    unsupported = b"MSH|^~\\&|A|F|G|H|20260101||XYZ^Q99|U-1|P|2.5.1\rPID|1||1^^^A\r"
    ack = await hl7gw.send(unsupported)
    assert msa(ack)[1:3] == ["AR", "U-1"] and err(ack)[3].split("^")[0] in ("200", "201")
    garbage = await hl7gw.send(b"this is not HL7 at all")
    assert msa(garbage)[1] == "AR"
    no_patient_id = (
        b"MSH|^~\\&|A|F|G|H|20260101||ADT^A04|N-1|P|2.5.1\r"
        b"EVN|A04|20260101\rPID|1||||Doe^Jane\rPV1|1|O\r"
    )
    ack = await hl7gw.send(no_patient_id)
    assert msa(ack)[1:3] == ["AE", "N-1"] and err(ack)[2].startswith("PID")
    assert "Doe" not in ack.decode() and "Jane" not in ack.decode()
    # Still serving.
    assert msa(await hl7gw.send((HL7 / "siu_s12.hl7").read_bytes()))[1] in ("AA", "CA")


async def test_http_endpoint_single_and_batch(hl7gw: App) -> None:
    headers = {"content-type": "x-application/hl7-v2+er7"}
    r = await hl7gw.http.post("/hl7v2", content=(HL7 / "adt_a03.hl7").read_bytes(), headers=headers)
    assert r.status_code == 200 and msa(r.content)[1] in ("AA", "CA")
    batch = (HL7 / "batch_adt_a04.hl7").read_bytes()
    r = await hl7gw.http.post("/hl7v2", content=batch, headers=headers)
    assert r.status_code == 200
    codes = [s.split("|")[1] for s in r.content.decode().split("\r") if s.startswith("MSA")]
    assert len(codes) >= 2 and set(codes) <= {"AA", "CA"}
    bad = await hl7gw.http.post("/hl7v2", content=b"x", headers={"content-type": "text/xml"})
    assert bad.status_code == 415


async def test_order_on_one_connection_and_many_connections(hl7gw: App) -> None:
    base = (HL7 / "adt_a08.hl7").read_bytes()
    original = parse(base).control_id.encode()

    async def conn(n: int) -> list[str]:
        out = []
        async with MLLPClient("127.0.0.1", hl7gw.port, timeout=60) as c:
            for i in range(3):
                ack = await c.send(base.replace(original, f"C{n}-{i}".encode(), 1))
                out.append(msa(ack)[2])
        return out

    results = await asyncio.gather(*(conn(n) for n in range(50)))
    assert results == [[f"C{n}-{i}" for i in range(3)] for n in range(50)]


async def test_framing_errors_over_a_real_socket(hl7gw: App) -> None:
    raw = (HL7 / "adt_a03.hl7").read_bytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", hl7gw.port)
    writer.write(b"junk before the frame" + START + raw + END)
    await writer.drain()
    ack = await asyncio.wait_for(reader.readuntil(END), 30)
    assert msa(ack[1:-2])[1] in ("AA", "CA")
    # Oversize message: AR, connection kept.
    limit = hl7gw.gw.settings.max_mllp_message_bytes
    writer.write(START + raw[:200] + b"X" * (limit + 10) + END)
    await writer.drain()
    ack = await asyncio.wait_for(reader.readuntil(END), 30)
    assert msa(ack[1:-2])[1] in ("AR", "CR") and b"exceeds" in ack
    # Peer goes away mid-frame: server copes, next connection works.
    writer.write(START + raw[:50])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert msa(await hl7gw.send((HL7 / "adt_a31.hl7").read_bytes()))[1] in ("AA", "CA")


async def test_mllp_send_program_of_the_hl7_package(hl7gw: App, tmp_path: Path) -> None:
    path = tmp_path / "msg.hl7"
    # mllp_send reads MLLP-framed messages from its file and prints each ACK.
    path.write_bytes(START + (HL7 / "oru_r01_radiology.hl7").read_bytes() + END)
    mllp_send = Path(sys.executable).with_name("mllp_send")
    proc = await asyncio.create_subprocess_exec(
        str(mllp_send),
        "--file",
        str(path),
        "--port",
        str(hl7gw.port),
        "127.0.0.1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    out, errout = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errout
    assert b"MSA|AA|" in out or b"MSA|CA|" in out


@pytest.mark.parametrize("failing", ["blobs", "log"])
async def test_backend_outage_gives_ae_then_retry_succeeds(
    profile: str, failing: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    services = request.getfixturevalue("services") if profile == "production" else None
    settings = _settings(profile, tmp_path, services)
    _, master = load_secrets(settings)
    real = build_backends(settings, master_key=master)
    blobs, log = FailingBlobs(real.blobs), FailingLog(real.log)
    blobs.down = failing == "blobs"
    backends = Backends(blobs=blobs, log=log, state=real.state, keys=real.keys)
    app = create_app(settings, backends=backends)
    raw = (HL7 / "oru_r01_lab.hl7").read_bytes()
    async with app.router.lifespan_context(app):
        a = App(app)
        log.down = failing == "log"  # after start: the gateway came up, then the log failed
        size = a.gw.ledger.size
        try:
            ack: bytes | None = await a.send(raw)
        except ConnectionError:
            ack = None  # closed without an answer: also allowed, nothing was acknowledged
        if ack is not None:
            assert msa(ack)[1] in ("AE", "CE") and err(ack)[3].startswith("207^")
            assert b"MSA|AA" not in ack and b"MSA|CA" not in ack
        assert a.gw.ledger.size == size, "something was anchored although nothing was ACKed"
        blobs.down = log.down = False
        ack = None
        for _ in range(20):  # the sender's retries, until the gateway has recovered
            try:
                ack = await a.send(raw)
            except ConnectionError:
                await asyncio.sleep(0.5)
                continue
            if msa(ack)[1] in ("AA", "CA"):
                break
            await asyncio.sleep(0.5)
        assert ack is not None and msa(ack)[1] in ("AA", "CA")
        assert a.gw.ledger.size > size
        # The accepted message is now a duplicate: replayed, not stored again.
        size = a.gw.ledger.size
        assert await a.send(raw) == ack and a.gw.ledger.size == size
        await a.http.aclose()


@pytest.mark.services
async def test_kubo_stopped_mid_run_then_back(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With IPFS (Kubo) down the message is not acknowledged AA (AE 207, or a close) and
    nothing is anchored; after Kubo restarts the sender's retry is accepted and readable."""
    services = request.getfixturevalue("services")
    settings = _settings("production", tmp_path, services)
    app = create_app(settings)
    raw = (HL7 / "orm_o01_lab.hl7").read_bytes()
    async with app.router.lifespan_context(app):
        a = App(app)
        size = a.gw.ledger.size
        services.stop_kubo()
        try:
            try:
                ack: bytes | None = await a.send(raw)
            except ConnectionError:
                ack = None
            if ack is not None:
                assert msa(ack)[1] == "AE" and err(ack)[3].startswith("207^")
            assert a.gw.ledger.size == size
        finally:
            services.start_kubo()
        first = await a.send(raw)
        assert msa(first)[1] == "AA"
        assert a.gw.ledger.size > size
        expected = convert(parse(raw), options=a.app.state.hl7.options).resources
        for resource in expected:
            r = await a.http.get(f"/fhir/{resource['resourceType']}/{resource['id']}")
            assert r.status_code == 200
        await a.http.aclose()


ENHANCED = (
    b"MSH|^~\\&|LIS|HOSPA|GW|ALLIANCE|20260315113000+0800||ADT^A04|E-1|P|2.5.1|||AL|AL\r"
    b"EVN|A04|20260315113000+0800\rPID|1||E100^^^HOSPA^MR||Wu^Li\rPV1|1|O\r"
)


async def test_enhanced_mode_commit_then_application_ack(hl7gw: App) -> None:
    async with MLLPClient("127.0.0.1", hl7gw.port, timeout=30) as c:
        commit = await c.send(ENHANCED)
        application = await c.receive()
        assert msa(commit)[1:3] == ["CA", "E-1"] and msa(application)[1:3] == ["AA", "E-1"]
        # A duplicate replays both, each in its own frame.
        assert await c.send(ENHANCED) == commit
        assert await c.receive() == application
    silent = ENHANCED.replace(b"|AL|AL\r", b"|NE|NE\r").replace(b"|E-1|", b"|E-2|")
    r = await hl7gw.http.post(
        "/hl7v2", content=silent, headers={"content-type": "x-application/hl7-v2+er7"}
    )
    assert r.status_code == 204 and r.content == b""


@pytest.mark.services
async def test_redis_stopped_mid_run_then_back(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With the de-duplication state unreachable nothing is acknowledged (the connection is
    closed without an ACK); once Redis is back the sender's retry is accepted, and a repeat
    of it is recognised as a duplicate."""
    services = request.getfixturevalue("services")
    settings = _settings("production", tmp_path, services)
    app = create_app(settings)
    raw = (HL7 / "siu_s12.hl7").read_bytes()
    async with app.router.lifespan_context(app):
        a = App(app)
        size = a.gw.ledger.size
        services.stop_redis()
        try:
            with pytest.raises(ConnectionError):
                await a.send(raw)
            assert a.gw.ledger.size == size
        finally:
            services.start_redis()
        first = await a.send(raw)
        assert msa(first)[1] in ("AA", "CA")
        assert await a.send(raw) == first
        await a.http.aclose()


async def test_hl7_containers_pass_the_audit_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    """`gateway verify --blobs` re-hashes each message's container against its leaf; a flipped
    byte in one container is reported with its record and CID, and its resources no longer
    read (IntegrityError, not silently wrong data)."""
    settings = _settings("embedded", tmp_path, None)
    app = create_app(settings)
    raws = [(HL7 / name).read_bytes() for name in ("oru_r01_lab.hl7", "adt_a04_escapes.hl7")]
    async with app.router.lifespan_context(app):
        a = App(app)
        for raw in raws:
            assert msa(await a.send(raw))[1] in ("AA", "CA")
        anchors = a.gw.index.all_versions()
        await a.http.aclose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_INSTITUTION"] = settings.institution

    data_dir = str(settings.data_dir)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "verify", "--blobs", "--data-dir", data_dir],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    ok = verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "blobs: 2 ciphertexts re-hashed" in ok.stdout
    victim = anchors[0]
    path = LocalBlobStore(directory=DataDir.of(settings).blocks).path_of(victim.cid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = verify()
    assert bad.returncode != 0
    assert victim.cid in bad.stdout and victim.container is not None
    assert victim.container in bad.stdout
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        with pytest.raises(IntegrityError, match=victim.cid):
            await app.state.gateway.pipeline.read_anchor(victim)


async def test_stored_but_unacknowledged_message_is_recognised_when_resent(hl7gw: App) -> None:
    """The gateway stored a message and died before its acceptance was recorded (here: the
    de-duplication state forgets it). The re-sent copy is answered AA with the stored
    container's receipt and not stored again; other content under that control id is AE 205."""
    raw = (HL7 / "oru_r01_lab.hl7").read_bytes()
    first = await hl7gw.send(raw)
    assert msa(first)[1] in ("AA", "CA")
    size = hl7gw.gw.ledger.size
    header = parse(raw)
    dedup_key = _dedup_key(header.sending_facility_id or "", header.control_id)
    await hl7gw.app.state.hl7.dedup.stop()  # let the acceptance land, then forget it
    await hl7gw.gw.backends.state.delete(dedup_key)
    await hl7gw.app.state.hl7.dedup.start()
    again = await hl7gw.send(raw)
    assert msa(again)[1] in ("AA", "CA")
    zrc_first = next(s for s in first.split(b"\r") if s.startswith(b"ZRC")).split(b"|")
    zrc_again = next(s for s in again.split(b"\r") if s.startswith(b"ZRC")).split(b"|")
    assert zrc_again[1] == zrc_first[1] and zrc_again[4] == zrc_first[4]  # same leaf, same CID
    assert hl7gw.gw.ledger.size == size, "a message already stored was stored again"
    assert await hl7gw.send(raw) == again  # now recorded: replayed
    await hl7gw.gw.backends.state.delete(dedup_key)
    changed = raw.replace(b"OBX|1|", b"OBX|1|", 1).replace(b"|F|", b"|C|", 1)
    assert changed != raw
    ack = await hl7gw.send(changed)
    assert msa(ack)[1] in ("AE", "CE") and err(ack)[3].startswith("205^")
    assert hl7gw.gw.ledger.size == size
