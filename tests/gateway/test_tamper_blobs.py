"""A changed byte in a stored ciphertext is caught on read (500 naming the record) and by verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.backends.blobs_local import LocalBlobStore
from tests.gateway.conftest import FHIR, auth_headers, demo_bundle, settings_for


@pytest.mark.parametrize("mode", ["flip-byte", "delete"])
async def test_tampered_ciphertext_is_named_never_served(tmp_path: Path, mode: str) -> None:
    settings = settings_for("embedded", tmp_path / "gw")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        )
        r = await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
        assert r.status_code == 200
        location = r.json()["entry"][0]["response"]["location"]
        rtype, rid = location.split("/")[:2]
        gw = app.state.gateway
        anchor = gw.index.latest(gw.pipeline.record_of(rtype, rid))
        store = gw.backends.blobs
        assert isinstance(store, LocalBlobStore)
        path = store.path_of(anchor.cid)
        if mode == "flip-byte":
            # A byte of this record's own ciphertext (its range, when its block is a pack).
            offset, length = anchor.byte_range or (0, path.stat().st_size)
            data = bytearray(path.read_bytes())
            data[offset + length // 2] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        bad = await client.get(f"/fhir/{rtype}/{rid}")
        outcome = bad.json()
        assert bad.status_code == 500
        assert outcome["resourceType"] == "OperationOutcome"
        assert anchor.record in outcome["issue"][0]["diagnostics"]
        assert anchor.cid in outcome["issue"][0]["diagnostics"]
        assert "王" not in bad.text and "HC-3301" not in bad.text
        # The bundle's records were stored in one pack: a flipped byte spoils one record only,
        # a deleted block every record in it, each named.
        other = r.json()["entry"][1]["response"]["location"].rsplit("/_history", 1)[0]
        other_anchor = gw.index.latest(gw.pipeline.record_of(*other.split("/")))
        assert other_anchor.cid == anchor.cid and anchor.byte_range is not None
        other_read = await client.get(f"/fhir/{other}")
        if mode == "flip-byte":
            assert other_read.status_code == 200
        else:
            assert other_read.status_code == 500
            assert other_anchor.record in other_read.json()["issue"][0]["diagnostics"]
        await client.aclose()
    env = {
        "GATEWAY_DATA_DIR": str(settings.data_dir),
        "GATEWAY_PROFILE": "embedded",
        "GATEWAY_INSTITUTION": settings.institution,
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "verify", "--blobs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert anchor.cid in out.stdout
    assert f"leaf {anchor.leaf_index}" in out.stdout
