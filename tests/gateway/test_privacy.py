"""No patient identifier, name, birth date or address from the fixtures reaches the ledger."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx

from ledger.batch import decode_batch
from tests.gateway.conftest import FHIR, demo_bundle


def _needles() -> list[str]:
    patient = demo_bundle()["entry"][0]["resource"]
    out = [i["value"] for i in patient["identifier"]]
    for name in patient["name"]:
        out += [name.get("text", ""), name["family"], *name["given"]]
    out += [patient["birthDate"], patient["telecom"][0]["value"], patient["address"][0]["text"]]
    out += ["310012", "文三路"]
    return [n for n in out if n]


async def test_ledger_bytes_hold_no_patient_data(
    client: httpx.AsyncClient, gw_settings: object, tmp_path: Path
) -> None:
    r = await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
    assert r.status_code == 200
    gw = client.app.state.gateway  # type: ignore[attr-defined]
    # Every stored log message, decoded down to the leaf and checkpoint bytes.
    haystack: list[bytes] = []
    async for entry in gw.backends.log.read(1):
        haystack.append(entry.data)
        batch = decode_batch(entry.data, seq=entry.seq)
        haystack.extend(batch.leaves)
        haystack.append(batch.checkpoint)
    assert len(haystack) >= 4
    # And every file the ledger keeps on disk (log file, tree tiles).
    for path in gw.paths.ledger.rglob("*"):
        if path.is_file():
            haystack.append(path.read_bytes())
    blob = b"\n".join(haystack)
    for needle in _needles():
        for form in (needle.encode(), base64.b64encode(needle.encode())):
            assert form not in blob, f"patient data {needle!r} found in the ledger"
    # The leaves are readable JSON with a pseudonym, so the scan above looked at real content.
    leaves = []
    async for entry in gw.backends.log.read(1):
        leaves += [json.loads(x) for x in decode_batch(entry.data, seq=entry.seq).leaves]
    # (the access log's sealed AuditEvents are anchored by record leaves of their own type)
    records = [x for x in leaves if x["kind"] == "record" and x["type"] != "AuditEvent"]
    # five records and the Provenance of the request
    assert len(records) == 6 and all(len(x["patient"]) == 64 for x in records)
