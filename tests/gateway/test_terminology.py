"""The dictionary in a running gateway, on both profiles: the terminology routes (reached
before the FHIR catch-all), the sender's unmapped-code policy and the curation queue (in the
StateStore: memory, Redis), the DICOM path, dictionary versions on the ledger (anchored before
any record; ``gateway verify`` reports a record whose version has none), ``gateway dictionary
remap``, and end to end: the same glucose result from two institutions with different local
codes, over MLLP and as a FHIR Bundle, reads back with the same LOINC coding and unit."""

from __future__ import annotations

import copy
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
from gateway.audit import audit
from gateway.config import SenderProfile, Settings
from gateway.errors import InvalidInputError
from gateway.mllp.client import MLLPClient
from gateway.runtime import Gateway
from gateway.terminology_service import is_tagged_unmapped
from ledger.leaves import decode_leaf, encode_leaf
from mappings.terminology import DEFAULT_DIR, Terminology
from tests.gateway.conftest import FHIR, auth_headers, settings_for

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
HOSP_T_LIS = "urn:alliance:facility:HOSP-T:cs:LIS"
CLINIC_E_LIS = "urn:alliance:facility:CLINIC-E:cs:LIS"
DICOM = Path(__file__).resolve().parents[2] / "fixtures" / "dicom" / "ct-chest-instances.json"


class App:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.gw: Gateway = app.state.gateway
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        )

    async def send(self, raw: bytes) -> bytes:
        async with MLLPClient("127.0.0.1", self.app.state.mllp.port, timeout=30) as c:
            return await c.send(raw)

    async def leaves(self) -> list[dict[str, Any]]:
        raw = await self.gw.ledger.leaves(0, self.gw.ledger.size)
        return [decode_leaf(leaf) for leaf in raw]


def _settings(profile: str, tmp: Path, request: pytest.FixtureRequest, **extra: Any) -> Settings:
    services = request.getfixturevalue("services") if profile == "production" else None
    values: dict[str, Any] = {"institution": "HOSP-T", "mllp_enabled": True, "mllp_port": 0}
    values.update(extra)
    return settings_for(profile, tmp / f"gw-{uuid.uuid4().hex[:6]}", services, **values)


async def _started(settings: Settings) -> AsyncIterator[App]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        a = App(app)
        yield a
        await a.http.aclose()


@pytest.fixture
async def tgw(profile: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    """A started gateway of institution HOSP-T, unmapped codes accepted."""
    async for a in _started(_settings(profile, tmp_path, request)):
        yield a


@pytest.fixture
async def strict(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[App]:
    """A started gateway of institution HOSP-T whose senders' unmapped codes are rejected."""
    s = _settings(
        profile, tmp_path, request, default_sender_profile=SenderProfile(unmapped_codes="reject")
    )
    async for a in _started(s):
        yield a


def _values(params: dict[str, Any], name: str) -> list[Any]:
    out = []
    for p in params["parameter"]:
        if p["name"] == name:
            out.append(p.get("part") or next(v for k, v in p.items() if k.startswith("value")))
    return out


# ---------------------------------------------------------------- terminology routes


async def test_translate_reaches_the_terminology_router(tgw: App) -> None:
    r = await tgw.http.get(
        "/fhir/ConceptMap/$translate", params={"system": HOSP_T_LIS, "code": "GLU"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "Parameters" and _values(body, "result") == [True]
    (match,) = _values(body, "match")
    concept = next(p["valueCoding"] for p in match if p["name"] == "concept")
    assert (concept["system"], concept["code"]) == (LOINC, "14749-6")
    posted = await tgw.http.post(
        "/fhir/ConceptMap/$translate",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "system", "valueUri": LOINC},
                {"name": "code", "valueCode": "14749-6"},
                {"name": "reverse", "valueBoolean": True},
                {"name": "targetsystem", "valueUri": CLINIC_E_LIS},
            ],
        },
        headers=FHIR,
    )
    assert posted.status_code == 200, posted.text
    codes = [
        next(p["valueCoding"]["code"] for p in m if p["name"] == "concept")
        for m in _values(posted.json(), "match")
    ]
    assert sorted(codes) == ["1001", "1090"]


async def test_lookup_validate_and_search_routes(tgw: App) -> None:
    r = await tgw.http.get("/fhir/CodeSystem/$lookup", params={"system": HOSP_T_LIS, "code": "K"})
    assert r.status_code == 200 and _values(r.json(), "display") == ["Potassium"]
    r = await tgw.http.get(
        "/fhir/ValueSet/$validate-code",
        params={
            "url": "urn:alliance:valueset:sensitive-hiv",
            "system": "http://hl7.org/fhir/sid/icd-10",
            "code": "B24",
        },
    )
    assert r.status_code == 200 and _values(r.json(), "result") == [True]
    url = "urn:alliance:conceptmap:hosp-t-lis-to-loinc"
    r = await tgw.http.get("/fhir/ConceptMap", params={"url": url, "version": "2026.2"})
    assert r.status_code == 200 and r.json()["total"] == 1
    assert r.json()["entry"][0]["resource"]["url"] == url
    r = await tgw.http.get("/fhir/CodeSystem", params={"url": HOSP_T_LIS})
    assert r.json()["total"] == 1 and r.json()["entry"][0]["resource"]["count"] >= 60


async def test_terminology_errors_are_operation_outcomes(tgw: App) -> None:
    r = await tgw.http.get("/fhir/ConceptMap/$translate", params={"code": "GLU"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert "system is required" in r.json()["issue"][0]["diagnostics"]
    r = await tgw.http.get("/fhir/CodeSystem/$lookup", params={"system": LOINC, "code": "0-0"})
    assert r.status_code == 404 and r.json()["issue"][0]["code"] == "not-found"
    r = await tgw.http.post("/fhir/ConceptMap/$translate", content=b"{", headers=FHIR)
    assert r.status_code == 400
    r = await tgw.http.get("/fhir/CodeSystem", params={"name": "x"})
    assert r.status_code == 400 and r.json()["issue"][0]["code"] == "not-supported"
    assert (await tgw.http.get("/healthz")).status_code == 200, "the service stays up"


# ---------------------------------------------------------------- policy and curation queue


def _obs(system: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": uuid.uuid4().hex,
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "valueQuantity": {"value": 5.1, "unit": "mmol/l"},
    }


async def test_reject_policy_names_code_and_element(tgw: App) -> None:
    svc = tgw.gw.terminology
    reject = SenderProfile(unmapped_codes="reject")
    with pytest.raises(InvalidInputError) as err:
        await svc.apply(_obs(CLINIC_E_LIS, "7777"), source="clinic-e", profile=reject)
    assert err.value.code == "processing"
    assert err.value.location == "Observation.code.coding"
    assert "'7777'" in str(err.value) and CLINIC_E_LIS in str(err.value)
    assert await svc.queue.entries() == [], "a rejected code is not queued"
    ok = await svc.apply(_obs(CLINIC_E_LIS, "1001"), source="clinic-e", profile=reject)
    assert ok["code"]["coding"][1]["code"] == "14749-6" and not is_tagged_unmapped(ok)


async def test_accept_policy_tags_and_queues_ranked_by_count(tgw: App) -> None:
    svc = tgw.gw.terminology
    accept = SenderProfile(unmapped_codes="accept")
    sent = _obs(CLINIC_E_LIS, "7777")
    stored = await svc.apply(sent, source="clinic-e", profile=accept)
    assert stored["code"] == sent["code"], "original coding only"
    assert is_tagged_unmapped(stored) and not is_tagged_unmapped(sent)
    for _ in range(2):
        await svc.apply(_obs(HOSP_T_LIS, "ZZZ"), source="HOSP-T", profile=accept)
    r = await tgw.http.get("/dictionary/unmapped")
    assert r.status_code == 200
    entries = r.json()["entries"]
    assert [(e["code"], e["source"], e["count"]) for e in entries] == [
        ("ZZZ", "HOSP-T", 2),
        ("7777", "clinic-e", 1),
    ]
    first = entries[0]
    assert first["system"] == HOSP_T_LIS and first["firstSeen"] <= first["lastSeen"]
    assert r.json()["dictionaryVersion"] == svc.version


# ---------------------------------------------------------------- DICOM path


def _dicom(code: str) -> bytes:
    items = json.loads(DICOM.read_text("utf-8"))
    for item in items:
        item["00081032"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00080100": {"vr": "SH", "Value": [code]},
                    "00080102": {"vr": "SH", "Value": ["RIS"]},
                    "00080104": {"vr": "LO", "Value": ["procedure"]},
                }
            ],
        }
    return json.dumps(items).encode()


async def test_dicom_study_gets_the_unified_procedure_code(tgw: App) -> None:
    headers = {"content-type": "application/dicom+json"}
    r = await tgw.http.post("/imaging/studies", content=_dicom("CT-CHEST"), headers=headers)
    assert r.status_code == 201, r.text
    back = (await tgw.http.get(f"/fhir/ImagingStudy/{r.json()['id']}")).json()
    codings = back["procedureCode"][0]["coding"]
    assert [(c["system"], c["code"]) for c in codings] == [
        ("urn:alliance:facility:HOSP-T:cs:RIS", "CT-CHEST"),
        (LOINC, "24627-2"),
    ]


async def test_dicom_unmapped_code_rejected_or_queued(strict: App, tgw: App) -> None:
    headers = {"content-type": "application/dicom+json"}
    r = await strict.http.post("/imaging/studies", content=_dicom("PET-X"), headers=headers)
    assert r.status_code == 422 and r.json()["resourceType"] == "OperationOutcome"
    issue = r.json()["issue"][0]
    assert "'PET-X'" in issue["diagnostics"]
    assert issue["expression"] == ["ImagingStudy.procedureCode[0].coding"]
    r = await tgw.http.post("/imaging/studies", content=_dicom("PET-X"), headers=headers)
    assert r.status_code == 201
    assert is_tagged_unmapped(r.json())
    entries = (await tgw.http.get("/dictionary/unmapped")).json()["entries"]
    assert [e["code"] for e in entries] == ["PET-X"]


# ---------------------------------------------------------------- versions on the ledger


async def test_dictionary_leaf_precedes_the_records_that_name_it(tgw: App) -> None:
    version = tgw.gw.terminology.version
    assert version == Terminology.load_default().version
    r = await tgw.http.post(
        "/imaging/studies",
        content=_dicom("CT-HEAD"),
        headers={"content-type": "application/dicom+json"},
    )
    assert r.status_code == 201
    leaves = await tgw.leaves()
    dictionary = [i for i, leaf in enumerate(leaves) if leaf["kind"] == "dictionary"]
    records = [i for i, leaf in enumerate(leaves) if leaf["kind"] == "record"]
    assert len(dictionary) == 1 and records and dictionary[0] < records[0]
    leaf = leaves[dictionary[0]]
    assert leaf["version"] == version
    assert [f["name"] for f in leaf["files"]] == sorted(p.name for p in DEFAULT_DIR.glob("*.json"))
    assert all(leaves[i]["dictionary"] == version for i in records)


async def test_restart_does_not_anchor_the_same_version_twice(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = _settings(profile, tmp_path, request, mllp_enabled=False)
    for _ in range(2):
        async for a in _started(settings):
            kinds = [leaf["kind"] for leaf in await a.leaves()]
    assert kinds.count("dictionary") == 1


async def test_verify_reports_a_record_whose_dictionary_was_never_anchored(tgw: App) -> None:
    gw = tgw.gw
    bogus = encode_leaf(
        "record",
        {
            "record": "r1",
            "version": 1,
            "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
            "sha256": "ab" * 32,
            "patient": "cd" * 32,
            "type": "Observation",
            "source": "HOSP-T",
            "dictionary": "0123456789abcdef",
            "time": "2026-12-01T00:00:00Z",
        },
    )
    (result,) = await gw.ledger.append([bogus])
    report = await audit(
        gw.backends, trusted=gw.trusted, origin=gw.settings.ledger_origin, signer=gw.signer
    )
    assert any(
        "dictionary version '0123456789abcdef' with no earlier dictionary leaf" in p
        and f"leaf {result.index}" in p
        for p in report.problems
    ), report.problems


# ---------------------------------------------------------------- remap


async def test_remap_maps_records_tagged_unmapped_after_a_new_version(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from gateway.remap import remap

    old = tmp_path / "dict-old"
    shutil.copytree(DEFAULT_DIR, old, ignore=shutil.ignore_patterns("sources"))
    settings = _settings(profile, tmp_path, request, mllp_enabled=False, dictionary_dir=old)
    headers = {"content-type": "application/dicom+json"}
    async for a in _started(settings):
        r = await a.http.post("/imaging/studies", content=_dicom("XR-CHEST-PA"), headers=headers)
        assert r.status_code == 201 and is_tagged_unmapped(r.json())
        study_id = r.json()["id"]
        old_version = a.gw.terminology.version
    # The curator maps PET-CT: a new dictionary version.
    new = tmp_path / "dict-new"
    shutil.copytree(old, new)
    path = new / "ConceptMap-hosp-t-ris-to-loinc.json"
    cmap = json.loads(path.read_text("utf-8"))
    cmap["group"][0]["element"].append(
        {"code": "XR-CHEST-PA", "target": [{"code": "36643-5", "equivalence": "relatedto"}]}
    )
    path.write_text(json.dumps(cmap), "utf-8")
    settings = settings.model_copy(update={"dictionary_dir": new})
    gw = Gateway(settings)
    await gw.start()
    try:
        progress: list[tuple[int, int]] = []
        summary = await remap(gw, progress=lambda done, total: progress.append((done, total)))
        assert summary.remapped == 1 and summary.still_unmapped == 0
        assert progress and progress[-1][0] == progress[-1][1]
        study = (await gw.pipeline.read("ImagingStudy", study_id)).resource
        assert not is_tagged_unmapped(study)
        added = study["procedureCode"][0]["coding"][1]
        assert added["code"] == "36643-5"
        assert added["extension"][0]["valueCode"] == "relatedto"
        assert study["meta"]["versionId"] == "2"
        leaves = [decode_leaf(x) for x in await gw.ledger.leaves(0, gw.ledger.size)]
        versions = [leaf["version"] for leaf in leaves if leaf["kind"] == "dictionary"]
        assert versions == [old_version, gw.terminology.version]
        assert leaves[-1]["kind"] == "record" and leaves[-1]["dictionary"] == gw.terminology.version
        again = await remap(gw)
        assert again.remapped == 0, "nothing tagged is left"
    finally:
        await gw.stop()


# ---------------------------------------------------------------- end to end

ORU = (
    "MSH|^~\\&|LIS|HOSP-T|GATEWAY|ALLIANCE|20261201080000||ORU^R01^ORU_R01|GLU-{n}|P|2.5.1\r"
    "PID|1||MRN-77^^^HOSP-T^MR~H3301-0042^^^HCN^HC||Li^Si||19700101|M\r"
    "OBR|1||LAB-{n}|GLU^Glucose^LIS|||20261201075000\r"
    "OBX|1|NM|GLU^Glucose^LIS||6.4|mmol/l|3.9-6.1|H|||F\r"
)


async def test_same_glucose_from_two_institutions_reads_back_alike(
    tgw: App, profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gw = tgw.gw
    # Institution 1 (HOSP-T, its LIS code GLU) over MLLP as HL7 v2 ORU^R01.
    ack = await tgw.send(ORU.format(n=1).encode())
    assert b"MSA|AA" in ack or b"MSA|CA" in ack, ack
    hl7_obs = [a for a in gw.index.all_versions() if a.resource_type == "Observation"]
    assert len(hl7_obs) == 1
    stored = await gw.pipeline.read_anchor(hl7_obs[0])
    # Read back as a member institution reads it: through the FHIR API.
    r = await tgw.http.get(f"/fhir/Observation/{stored['id']}")
    assert r.status_code == 200, r.text
    via_hl7 = r.json()
    # Institution 2 (CLINIC-E, its LIS code 1001) as a FHIR transaction Bundle from its HIS to
    # its own gateway: the gateway maps it, keyed by the authenticated client's institution.
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": CLINIC_E_LIS, "code": "1001", "display": "血糖"}]},
        "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
        "effectiveDateTime": "2026-12-01T08:10:00+08:00",
        "valueQuantity": {"value": 6.4, "unit": "mmol/l"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": gw.settings.master_id_system, "value": "H3302-0001"}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": copy.deepcopy(obs),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    clinic_settings = _settings(profile, tmp_path, request, institution="clinic-e")
    async for clinic in _started(clinic_settings):
        r = await clinic.http.post("/fhir", json=bundle, headers=FHIR)
        assert r.status_code == 200, r.text
        location = r.json()["entry"][1]["response"]["location"]
        via_fhir = (await clinic.http.get("/fhir/" + "/".join(location.split("/")[:2]))).json()
        clinic_leaves = await clinic.leaves()

    def unified(o: dict[str, Any]) -> tuple[Any, ...]:
        loinc = [c for c in o["code"]["coding"] if c["system"] == LOINC]
        q = o["valueQuantity"]
        return tuple((c["code"], c.get("display")) for c in loinc), q["system"], q["code"]

    assert (
        unified(via_hl7)
        == unified(via_fhir)
        == (
            (("14749-6", "Glucose [Moles/volume] in Serum or Plasma"),),
            UCUM,
            "mmol/L",
        )
    )
    assert via_hl7["valueQuantity"]["value"] == via_fhir["valueQuantity"]["value"] == 6.4
    # Each still carries its original code (first, unchanged) and unit spelling.
    assert via_hl7["code"]["coding"][0]["system"] == HOSP_T_LIS
    assert via_hl7["code"]["coding"][0]["code"] == "GLU"
    assert via_fhir["code"]["coding"][0] == obs["code"]["coding"][0]
    assert via_hl7["valueQuantity"]["unit"] == via_fhir["valueQuantity"]["unit"] == "mmol/l"
    # Every record leaf names the dictionary version that mapped it, and a `dictionary` leaf of
    # that version precedes it (on each institution's ledger: here each gateway has a log of
    # its own).
    version = gw.terminology.version
    assert version == Terminology.load_default().version
    for leaves in (await tgw.leaves(), clinic_leaves):
        records = [i for i, x in enumerate(leaves) if x["kind"] == "record"]
        assert records
        for i in records:
            assert leaves[i]["dictionary"] == version, leaves[i]
            assert any(x["kind"] == "dictionary" and x["version"] == version for x in leaves[:i]), (
                f"no dictionary leaf of {version} before leaf {i}"
            )


async def test_hl7_unmapped_code_rejected_under_the_reject_policy(strict: App) -> None:
    raw = ORU.format(n=9).replace("GLU^Glucose^LIS", "NOPE^Unknown^LIS").encode()
    ack = await strict.send(raw)
    text = ack.decode()
    assert "MSA|AE|GLU-9" in text, text
    err = next(s for s in text.split("\r") if s.startswith("ERR")).split("|")
    assert err[3].startswith("103"), err
    assert "OBR^1^4" in err[2] or "OBX^1^3" in err[2], err


def test_remap_command_reports_what_it_did(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    data = tmp_path / "gw"
    result = CliRunner().invoke(
        app,
        ["dictionary", "remap", "--data-dir", str(data), "--profile", "embedded"],
        env={"GATEWAY_INSTITUTION": "HOSP-T", "GATEWAY_MLLP_ENABLED": "false"},
    )
    assert result.exit_code == 0, result.output
    version = Terminology.load_default().version
    assert f"remap: dictionary {version}: 0 records examined" in result.output
