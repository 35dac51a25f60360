"""HL7 v2 over MLLP on both profiles: a message is searchable as soon as it is acknowledged
(its index rows come from the conversion workers and are written before the ACK), and a local
code the unified dictionary does not map follows the sender profile's ``unmapped_codes``:
``accept`` stores it with the original coding only, tags the records carrying it and queues
it for curation (source: the sending facility); ``reject`` answers AE with an ERR naming the
code, the segment and the field. ``gateway dictionary remap`` then maps such records, stored
inside a message's container, with a newer dictionary."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import SenderProfile, Settings
from gateway.mllp.client import MLLPClient
from gateway.runtime import Gateway
from gateway.terminology_service import is_tagged_unmapped
from ledger.leaves import decode_leaf
from mappings.dictionary_apply import UNMAPPED_TAG
from mappings.terminology import DEFAULT_DIR
from tests.gateway.conftest import auth_headers, settings_for

LOINC = "http://loinc.org"
HOSP_T_LIS = "urn:alliance:facility:HOSP-T:cs:LIS"

#: An ORU^R01 of one glucose result (a code HOSP-T's LIS map has) and one result of a local
#: code ``{code}`` that no map has, from sending application ``{app}`` of HOSP-T.
ORU = (
    "MSH|^~\\&|{app}|HOSP-T|GATEWAY|ALLIANCE|20261201080000||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
    "PID|1||MRN-{cid}^^^HOSP-T^MR~H3301-{cid}^^^HCN^HC||Li^Si||19700101|M\r"
    "OBR|1||LAB-{cid}|GLU^Glucose^LIS|||20261201075000\r"
    "OBX|1|NM|GLU^Glucose^LIS||6.4|mmol/l|3.9-6.1|H|||F\r"
    "OBX|2|ST|{code}^Local test^LIS||positive||||||F\r"
)


def oru(cid: str, code: str, app: str = "LIS") -> bytes:
    """The test message with control id ``cid`` and local code ``code``."""
    return ORU.format(cid=cid, code=code, app=app).encode()


class App:
    """A started gateway app: its HTTP client (with a token) and its MLLP port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.gw: Gateway = app.state.gateway
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        )

    async def send(self, raw: bytes) -> str:
        async with MLLPClient("127.0.0.1", self.app.state.mllp.port, timeout=60) as c:
            return (await c.send(raw)).decode()

    async def search(self, rtype: str, **params: str) -> dict[str, Any]:
        r = await self.http.get(f"/fhir/{rtype}", params=params)
        assert r.status_code == 200, r.text
        bundle: dict[str, Any] = r.json()
        return bundle


def _settings(profile: str, tmp: Path, request: pytest.FixtureRequest, **extra: Any) -> Settings:
    services = request.getfixturevalue("services") if profile == "production" else None
    values: dict[str, Any] = {"mllp_enabled": True, "mllp_port": 0}  # a fresh institution
    values.update(extra)
    return settings_for(profile, tmp / f"gw-{uuid.uuid4().hex[:6]}", services, **values)


async def _started(settings: Settings) -> AsyncIterator[App]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        a = App(app)
        try:
            yield a
        finally:
            await a.http.aclose()


@pytest.fixture
async def hgw(profile: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    """A gateway of HOSP-T: application ``STRICT`` of HOSP-T rejects unmapped codes, every
    other sender's are accepted (the default profile)."""
    s = _settings(
        profile,
        tmp_path,
        request,
        sender_profiles={"STRICT^HOSP-T": SenderProfile(unmapped_codes="reject")},
    )
    async for a in _started(s):
        yield a


def _ack_code(ack: str) -> str:
    msa = next(s for s in ack.split("\r") if s.startswith("MSA"))
    return msa.split("|")[1]


# ---------------------------------------------------------------- searchable at the ACK


async def test_searchable_as_soon_as_acknowledged(hgw: App) -> None:
    """Twelve messages at once over their own connections; each sender searches for its own
    Observation the moment its ACK arrives (no sleep, no drain): always found, with its
    lastUpdated, patient and tag indexed as stored."""
    run = uuid.uuid4().hex[:6].upper()

    async def one(n: int) -> None:
        code = f"Z{run}{n}"
        ack = await hgw.send(oru(f"S{run}-{n}", code))
        assert _ack_code(ack) == "AA", ack
        found = await hgw.search("Observation", code=code)
        assert found["total"] == 1, (n, found)
        obs = found["entry"][0]["resource"]
        assert obs["code"]["coding"][0]["code"] == code
        assert is_tagged_unmapped(obs)
        # The mapped result of the same message, through the patient it names.
        patient = obs["subject"]["reference"]
        glucose = await hgw.search(
            "Observation", code=f"{LOINC}|14749-6", subject=patient, _lastUpdated="ge2020-01-01"
        )
        assert glucose["total"] == 1, (n, glucose)
        assert not is_tagged_unmapped(glucose["entry"][0]["resource"])
        report = await hgw.search("DiagnosticReport", subject=patient)
        assert report["total"] == 1

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(12))), timeout=120)


async def test_reindex_from_the_ledger_answers_as_the_rows_from_the_workers(hgw: App) -> None:
    """What the conversion workers indexed answers every search as the index rebuilt from
    the ledger and the blobs does (``extract`` over the stored resources: one rule)."""
    run = uuid.uuid4().hex[:6].upper()
    ack = await hgw.send(oru(f"R{run}", f"Y{run}"))
    assert _ack_code(ack) == "AA", ack
    searches: list[tuple[str, dict[str, str]]] = [
        ("Observation", {"code": f"Y{run}"}),
        ("Observation", {"code": f"{LOINC}|14749-6", "date": "ge2026-12-01"}),
        ("Observation", {"status": "final", "code": f"{HOSP_T_LIS}|GLU"}),
        ("Observation", {"_lastUpdated": "ge2020-01-01", "_count": "100"}),
        ("DiagnosticReport", {"code": f"{LOINC}|2345-7,{HOSP_T_LIS}|GLU"}),
        ("Patient", {"identifier": f"MRN-R{run}"}),
        ("Specimen", {"_count": "100"}),
        ("Encounter", {"_count": "100"}),
    ]

    async def answers() -> list[list[tuple[str, str]]]:
        out = []
        for rtype, params in searches:
            bundle = await hgw.search(rtype, **params)
            out.append(
                sorted(
                    (e["resource"]["id"], e["resource"]["meta"]["versionId"])
                    for e in bundle.get("entry", [])
                )
            )
        return out

    before = await answers()
    assert all(before[:4]) and before[5], before
    await hgw.app.state.search.reindex()
    assert await answers() == before


# ---------------------------------------------------------------- unmapped codes


async def test_accept_stores_original_coding_tags_and_queues_by_facility(hgw: App) -> None:
    run = uuid.uuid4().hex[:6].upper()
    code = f"X{run}"
    for n in range(3):
        ack = await hgw.send(oru(f"A{run}-{n}", code))
        assert _ack_code(ack) == "AA", ack
    found = await hgw.search("Observation", code=code)
    assert found["total"] == 3
    for entry in found["entry"]:
        obs = entry["resource"]
        # The original coding only: nothing was added beside it.
        assert obs["code"]["coding"] == [
            {"system": HOSP_T_LIS, "code": code, "display": "Local test"}
        ]
        assert obs["meta"]["tag"] == [UNMAPPED_TAG]
        assert obs["meta"]["versionId"] == "1" and obs["meta"]["lastUpdated"]
    # Resources without an unmapped code are not tagged.
    patient = found["entry"][0]["resource"]["subject"]["reference"]
    glucose = await hgw.search("Observation", code=f"{LOINC}|14749-6", subject=patient)
    assert "tag" not in glucose["entry"][0]["resource"]["meta"]
    r = await hgw.http.get(f"/fhir/{patient}")
    assert r.status_code == 200 and not is_tagged_unmapped(r.json())
    # Queued for curation, counted once per message, under the sending facility.
    entries = (await hgw.http.get("/dictionary/unmapped")).json()["entries"]
    mine = [e for e in entries if e["code"] == code]
    assert len(mine) == 1, entries
    assert mine[0]["system"] == HOSP_T_LIS
    assert mine[0]["source"] == "HOSP-T"
    assert mine[0]["count"] == 3
    assert mine[0]["firstSeen"] <= mine[0]["lastSeen"]


async def test_reject_answers_ae_naming_code_segment_and_field(hgw: App) -> None:
    run = uuid.uuid4().hex[:6].upper()
    code = f"W{run}"
    ack = await hgw.send(oru(f"J{run}", code, app="STRICT"))
    assert _ack_code(ack) == "AE", ack
    err = next(s for s in ack.split("\r") if s.startswith("ERR")).split("|")
    # ERR-2 (ERL): segment OBX, its second occurrence, field 3 (its first repetition).
    assert err[2] == "OBX^2^3^1", err
    assert err[3].startswith("103^"), err  # table 0357: table value not found
    assert code in err[8] and HOSP_T_LIS in err[8], err  # ERR-8 names the code and system
    # Nothing was stored or queued; the same code from another application is accepted.
    assert (await hgw.search("Observation", code=code))["total"] == 0
    entries = (await hgw.http.get("/dictionary/unmapped")).json()["entries"]
    assert not [e for e in entries if e["code"] == code]
    ok = await hgw.send(oru(f"K{run}", code, app="LIS"))
    assert _ack_code(ok) == "AA", ok
    # A mapped message from the strict sender is accepted.
    mapped = ORU.format(cid=f"M{run}", code="GLU", app="STRICT").encode()
    assert _ack_code(await hgw.send(mapped)) == "AA"


# ---------------------------------------------------------------- remap


async def test_remap_maps_hl7_records_stored_in_a_container(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An older dictionary without HOSP-T's glucose map: the HL7 Observation is stored with
    its local code only and tagged; after the curator's new version, ``remap`` stores it as
    version 2 with the LOINC coding, untagged, and searchable by it."""
    from gateway.remap import remap

    old = tmp_path / "dict-old"
    shutil.copytree(DEFAULT_DIR, old, ignore=shutil.ignore_patterns("sources"))
    path = old / "ConceptMap-hosp-t-lis-to-loinc.json"
    cmap = json.loads(path.read_text("utf-8"))
    cmap["group"][0]["element"] = [e for e in cmap["group"][0]["element"] if e["code"] != "GLU"]
    path.write_text(json.dumps(cmap), "utf-8")
    settings = _settings(profile, tmp_path, request, dictionary_dir=old)
    run = uuid.uuid4().hex[:6].upper()
    async for a in _started(settings):
        ack = await a.send(oru(f"G{run}", f"N{run}"))  # both results now unmapped
        assert _ack_code(ack) == "AA", ack
        before = await a.search("Observation", code=f"{HOSP_T_LIS}|GLU")
        assert before["total"] == 1
        obs = before["entry"][0]["resource"]
        assert is_tagged_unmapped(obs) and len(obs["code"]["coding"]) == 1
        obs_id = obs["id"]
        assert (await a.search("Observation", code=f"{LOINC}|14749-6"))["total"] == 0
    # The curator's new version: the shipped dictionary, which maps GLU.
    new_settings = settings.model_copy(update={"dictionary_dir": DEFAULT_DIR, "mllp_port": 0})
    gw = Gateway(new_settings)
    await gw.start()
    try:
        summary = await remap(gw)
        # The glucose Observation (and its DiagnosticReport, coded GLU by OBR-4) now map; the
        # other local code does not.
        assert summary.remapped >= 1, summary
        read = await gw.records.read("Observation", obs_id)
        glucose = read.resource
        assert glucose["meta"]["versionId"] == "2"
        assert not is_tagged_unmapped(glucose)
        codings = glucose["code"]["coding"]
        assert codings[0] == obs["code"]["coding"][0]  # the original is kept, first
        assert any(c["system"] == LOINC and c["code"] == "14749-6" for c in codings)
        leaves = [decode_leaf(x) for x in await gw.ledger.leaves(0, gw.ledger.size)]
        assert leaves[-1]["kind"] == "record"
        assert leaves[-1]["dictionary"] == gw.terminology.version
        again = await remap(gw)
        assert again.remapped == 0
    finally:
        await gw.stop()
    async for a in _started(new_settings):
        # Indexed at start (caught up from the ledger): searchable by its new coding.
        found = await a.search("Observation", code=f"{LOINC}|14749-6")
        assert [e["resource"]["id"] for e in found["entry"]] == [obs_id]
        assert found["entry"][0]["resource"]["meta"]["versionId"] == "2"
