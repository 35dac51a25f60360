"""``gateway verify`` as a user runs it (a subprocess) on an embedded data directory.

A gateway is run in-process once to fill a data directory (records, blobs, the trust anchor);
each test works on its own copy, tampers with one thing the way an attacker or a failing disk
would, and checks that ``gateway verify`` exits non-zero naming what and where.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest
import rfc8785

from gateway.app import create_app
from gateway.backends.log_file import FileLog, iter_records
from gateway.datadir import DataDir
from ledger.batch import decode_batch
from ledger.checkpoint import Checkpoint
from ledger.keys import Signer, TrustedKeys
from ledger.leaves import encode_leaf
from ledger.sequencer import Ledger
from ledger.stored_tree import TreeStore
from ledger.witness import Evidence, WitnessState
from tests.gateway.conftest import FHIR, auth_headers, demo_bundle, settings_for

HEADER = struct.Struct(">II")


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded data dir with three Bundles anchored and a checkpoint saved after two, and
    reads of the stored Observations (access leaves and the access log's sealed AuditEvents)."""
    root = tmp_path_factory.mktemp("verify")
    data = root / "gw"

    async def fill() -> None:
        app = create_app(settings_for("embedded", data))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gw", headers=auth_headers(app)
            ) as c:
                for i in range(3):
                    r = await c.post("/fhir", json=demo_bundle(), headers=FHIR)
                    assert r.status_code == 200, r.text
                    if i == 1:
                        saved = await c.get("/ledger/checkpoint")
                        (root / "saved.json").write_text(saved.text)
                    where = r.json()["entry"][1]["response"]["location"].split("/_history")[0]
                    assert (await c.get(f"/fhir/{where}")).status_code == 200

    import asyncio

    asyncio.run(fill())
    return root


@pytest.fixture
def work(filled: Path, tmp_path: Path) -> Path:
    shutil.copytree(filled, tmp_path / "copy")
    return tmp_path / "copy"


def verify(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "verify", "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def gw_dir(work: Path) -> DataDir:
    """The data directory of the test's gateway (embedded profile)."""
    return DataDir(work / "gw", "embedded")


def log_path(work: Path) -> Path:
    return gw_dir(work).log


def rewrite_record(path: Path, offset: int, payload: bytes, msg_id: str) -> None:
    """Replace the payload of the record at ``offset`` (same length), recomputing its CRC."""
    raw = bytearray(path.read_bytes())
    length, _crc = HEADER.unpack_from(raw, offset)
    mid = msg_id.encode()
    body = struct.pack(">H", len(mid)) + mid + payload
    assert len(body) == length
    raw[offset : offset + HEADER.size + length] = HEADER.pack(length, zlib.crc32(body)) + body
    path.write_bytes(bytes(raw))


def test_clean_ledger_verifies_with_progress_and_blobs(work: Path) -> None:
    res = verify(work / "gw", "--blobs", "--from-checkpoint", str(work / "saved.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify: OK" in res.stdout
    assert "trust file anchored: yes" in res.stdout
    assert "ciphertexts re-hashed" in res.stdout and "blobs: 0" not in res.stdout
    # three reads, and the writes of the three Bundles (five resources of one patient each: one
    # event per patient and interaction): every decision about an authenticated caller is logged
    assert "access leaves: 6," in res.stdout
    assert "is a prefix of the current tree" in res.stdout
    assert "log [" in res.stderr and "messages" in res.stderr


def test_plain_byte_flip_in_a_leaf_is_caught_by_the_record_crc(work: Path) -> None:
    path = log_path(work)
    offset, payload, mid = list(iter_records(path))[1]
    raw = bytearray(path.read_bytes())
    pos = offset + HEADER.size + 2 + len(mid) + payload.index(b'"leaves"')
    raw[pos + 20] ^= 0x01
    path.write_bytes(bytes(raw))
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    assert f"log.bin at byte {offset}" in res.stdout and "checksum" in res.stdout


def test_leaf_flip_with_recomputed_crc_is_caught_by_the_ledger(work: Path) -> None:
    path = log_path(work)
    records = list(iter_records(path))
    offset, payload, mid = records[2]
    start = payload.index(b'"leaves":["') + len(b'"leaves":["') + 40
    ch = payload[start : start + 1]
    swapped = b"B" if ch != b"B" else b"C"
    rewrite_record(path, offset, payload[:start] + swapped + payload[start + 1 :], mid)
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    first = sum(len(decode_batch(p).leaves) for _o, p, _m in records[:2])
    last = first + len(decode_batch(payload).leaves) - 1
    assert f"log message 3 (leaves {first}..{last})" in res.stdout
    assert "root does not match the tree derived from the log" in res.stdout
    assert f"log.bin at byte offset {offset}" in res.stdout


def test_checkpoint_signature_flip_is_named(work: Path) -> None:
    path = log_path(work)
    offset, payload, mid = list(iter_records(path))[1]
    batch = json.loads(payload)
    signed = json.loads(base64.b64decode(batch["checkpoint"]))
    sig = bytearray(base64.b64decode(signed["signatures"][1]["sig"]))
    sig[100] ^= 0x80
    signed["signatures"][1]["sig"] = base64.b64encode(bytes(sig)).decode()
    batch["checkpoint"] = base64.b64encode(rfc8785.dumps(signed)).decode()
    rewrite_record(path, offset, rfc8785.dumps(batch), mid)
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    assert "log message 2" in res.stdout
    assert "ml-dsa-65" in res.stdout and "does not verify" in res.stdout


def test_flip_in_stored_tree_files_is_named_with_file_and_offset(work: Path) -> None:
    level0 = gw_dir(work).tree / "level-00.bin"
    raw = bytearray(level0.read_bytes())
    raw[32 * 3 + 7] ^= 0x10
    level0.write_bytes(bytes(raw))
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    assert "level-00.bin at byte offset 96" in res.stdout


def test_tree_flip_with_recomputed_crc_is_found_by_rehashing(work: Path) -> None:
    tree = gw_dir(work).tree
    level1, crc1 = tree / "level-01.bin", tree / "level-01.crc"
    raw = bytearray(level1.read_bytes())
    raw[32 * 2] ^= 0x01
    level1.write_bytes(bytes(raw))
    entry = bytes(raw[64:96])
    crc = struct.pack(">I", zlib.crc32(entry, zlib.crc32(struct.pack(">BQ", 1, 2))))
    crcs = bytearray(crc1.read_bytes())
    crcs[8:12] = crc
    crc1.write_bytes(bytes(crcs))
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    assert "level-01.bin at byte offset 64" in res.stdout
    assert "not the hash of its two children" in res.stdout


def _rewrite_history(work: Path, keep: int) -> None:
    """Keep the first ``keep`` log records and append a different batch, validly signed with
    the institution's own key (an insider with access to the log)."""
    path = log_path(work)
    records = list(iter_records(path))
    raw = path.read_bytes()
    cut = records[keep][0] if keep < len(records) else len(raw)
    path.write_bytes(raw[:cut])
    shutil.rmtree(gw_dir(work).tree)
    signer = Signer.load(gw_dir(work).signer)
    trusted = TrustedKeys.load(gw_dir(work).trust)

    async def append() -> None:
        ledger = Ledger(
            log=FileLog(path=path),
            tree=TreeStore.memory(),
            signer=signer,
            trusted=trusted,
            origin="alliance.example/ledger",
        )
        await ledger.start(follow_interval=None)
        leaf = encode_leaf(
            "dictionary",
            {
                "version": "forged",
                "sha256": "0" * 64,
                "files": [{"name": "ConceptMap-x.json", "sha256": "0" * 64}],
                "source": signer.name,
                "time": "2026-01-01T00:00:00Z",
            },
        )
        # longer than the history it replaces (every write and read of it logged), so that
        # the node's final checkpoint falls inside the forged history
        await ledger.append([leaf] * 1 + [leaf.replace(b"forged", b"forgeD")] * 120)
        await ledger.stop()

    import asyncio

    asyncio.run(append())


def test_from_checkpoint_detects_rewritten_history(work: Path) -> None:
    _rewrite_history(work, keep=1)
    final = gw_dir(work).final_checkpoint
    assert final.exists()
    own = verify(work / "gw")
    assert own.returncode == 1, own.stdout
    assert f"final checkpoint {final}" in own.stdout and "history was rewritten" in own.stdout
    final.unlink()  # an insider would remove the node's own record too
    plain = verify(work / "gw")
    assert plain.returncode == 0, "the rewritten log is self-consistent: " + plain.stdout
    res = verify(work / "gw", "--from-checkpoint", str(work / "saved.json"))
    assert res.returncode == 1, res.stdout
    assert "history was rewritten" in res.stdout


def test_from_checkpoint_detects_truncated_history(work: Path) -> None:
    path = log_path(work)
    records = list(iter_records(path))
    path.write_bytes(path.read_bytes()[: records[1][0]])
    shutil.rmtree(gw_dir(work).tree)
    gw_dir(work).final_checkpoint.unlink()
    res = verify(work / "gw", "--from-checkpoint", str(work / "saved.json"))
    assert res.returncode == 1, res.stdout
    assert "history was truncated" in res.stdout


def test_tampered_saved_checkpoint_is_reported(work: Path) -> None:
    saved = json.loads((work / "saved.json").read_text())
    signed = json.loads(base64.b64decode(saved["checkpoint"]))
    sig = bytearray(base64.b64decode(signed["signatures"][0]["sig"]))
    sig[0] ^= 1
    signed["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (work / "bad.json").write_bytes(rfc8785.dumps(signed))
    res = verify(work / "gw", "--from-checkpoint", str(work / "bad.json"))
    assert res.returncode == 1, res.stdout
    assert "saved checkpoint" in res.stdout and "ed25519" in res.stdout


def test_split_view_evidence_held_by_the_witness_is_reported(work: Path) -> None:
    data = work / "gw"
    signer = Signer.load(gw_dir(work).signer)
    one = signer.sign(Checkpoint("alliance.example/ledger", 3, b"\x01" * 32, b"\x00" * 32, 1))
    two = signer.sign(Checkpoint("alliance.example/ledger", 3, b"\x02" * 32, b"\x00" * 32, 2))
    state = WitnessState(evidence=[Evidence("same tree size, different root", one, two)])
    gw_dir(work).witness_state.write_bytes(state.to_bytes())
    res = verify(data)
    assert res.returncode == 1, res.stdout
    assert "holds split-view evidence: same tree size, different root" in res.stdout


def test_access_log_container_away_from_its_access_leaves_is_named(work: Path) -> None:
    """An access-log container (a record leaf of type AuditEvent) must come right after its
    access leaves: one appended alone, validly signed by the institution (an insider), is
    reported with its log message and leaf index."""
    path = log_path(work)
    signer = Signer.load(gw_dir(work).signer)
    trusted = TrustedKeys.load(gw_dir(work).trust)
    records = list(iter_records(path))
    first = sum(len(decode_batch(p).leaves) for _o, p, _m in records)
    dictionary = next(
        json.loads(leaf)["version"]
        for _o, p, _m in records
        for leaf in decode_batch(p).leaves
        if b'"kind":"dictionary"' in leaf
    )

    async def append() -> None:
        ledger = Ledger(
            log=FileLog(path=path),
            tree=TreeStore.memory(),
            signer=signer,
            trusted=trusted,
            origin="alliance.example/ledger",
        )
        await ledger.start(follow_interval=None)
        member = {"record": "ab" * 16, "type": "AuditEvent", "version": 1}
        await ledger.append(
            [
                encode_leaf(
                    "record",
                    {
                        "record": "cd" * 16,
                        "version": 1,
                        "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
                        "sha256": "0" * 64,
                        "patient": "1" * 64,
                        "type": "AuditEvent",
                        "source": signer.name,
                        "dictionary": dictionary,
                        "time": "2026-01-01T00:00:00Z",
                        "contains": [member],
                    },
                )
            ]
        )
        await ledger.stop()

    import asyncio

    asyncio.run(append())
    res = verify(work / "gw")
    assert res.returncode == 1, res.stdout
    assert f"log message {len(records) + 1}, leaf {first}: access-log container" in res.stdout
    assert "is not right after its 1 access leaves" in res.stdout
