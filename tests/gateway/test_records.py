"""The record service as entry points use it: one pseudonym per patient across FHIR, HL7 v2
and DICOM JSON; versions from what the ledger committed; every Location resolves; patient
links; custodian-scoped record ids on a shared log (two institutions, and two processes of
one institution, on one real JetStream stream)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.backends.protocols import Backends
from gateway.config import Settings
from gateway.crypto import pseudonym
from gateway.runtime import Gateway, build_backends, load_secrets
from gateway.verify_cmd import run_verify
from ledger.keys import Signer, TrustedKeys
from mappings.v2.convert import convert
from mappings.v2.parse import parse
from tests.fakes import FailingBlobs
from tests.gateway.conftest import FHIR, auth_headers, settings_for
from tests.gateway.hl7.test_ingest import HL7, OPTIONS, App, hl7gw, msa

__all__ = ["hl7gw"]

DICOM = Path(__file__).resolve().parents[2] / "fixtures" / "dicom" / "ct-chest-instances.json"
MASTER = OPTIONS["master_id_system"]
HCN = "H3101011985050512X"  # the master identifier of fixtures/hl7v2/oru_r01_lab.hl7
DICOM_JSON = {"content-type": "application/dicom+json"}


def _dicom(patient_id: str, issuer: str) -> bytes:
    doc = json.loads(DICOM.read_text())
    for obj in doc:
        obj["00100020"] = {"vr": "LO", "Value": [patient_id]}
        obj["00100021"] = {"vr": "LO", "Value": [issuer]}
    return json.dumps(doc).encode()


async def _sealed_under(gw: Gateway, rtype: str, rid: str) -> tuple[str, str]:
    """(patient pseudonym, key-encryption key id) a stored resource is sealed under."""
    anchor = gw.index.latest(gw.records.record_of(rtype, rid))
    assert anchor is not None, f"{rtype}/{rid} not stored"
    wrapped = await gw.backends.keys.get_wrapped_key(anchor.sha256)
    return anchor.patient, wrapped.kek_id


def _hl7_patient_id(app: App, raw: bytes) -> str:
    resources = convert(parse(raw), options=app.app.state.hl7.options).resources
    return str(next(r["id"] for r in resources if r["resourceType"] == "Patient"))


async def test_one_patient_has_one_pseudonym_and_key_across_fhir_hl7_and_dicom(
    hl7gw: App,
) -> None:
    gw = hl7gw.gw
    raw = (HL7 / "oru_r01_lab.hl7").read_bytes()
    assert msa(await hl7gw.send(raw))[1] in ("AA", "CA")
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"identifier": {"system": MASTER, "value": HCN}},
    }
    r = await hl7gw.http.post("/fhir/Observation", content=json.dumps(obs), headers=FHIR)
    assert r.status_code == 201, r.text
    study = await hl7gw.http.post(
        "/imaging/studies", content=_dicom(HCN, "HCN"), headers=DICOM_JSON
    )
    assert study.status_code in (200, 201), study.text
    hl7_side = await _sealed_under(gw, "Patient", _hl7_patient_id(hl7gw, raw))
    fhir_side = await _sealed_under(gw, "Observation", r.json()["id"])
    dicom_side = await _sealed_under(gw, "ImagingStudy", study.json()["id"])
    assert hl7_side[0] == fhir_side[0] == dicom_side[0] == pseudonym(gw.pseudonym_key, MASTER, HCN)
    assert hl7_side[1] == fhir_side[1] == dicom_side[1], "one patient, one key-encryption key"


async def test_a_study_sent_before_the_hl7_message_of_its_patient_gets_the_same_pseudonym(
    hl7gw: App,
) -> None:
    """No master identifier, an issuer no setting names: both paths scope the id by that
    issuer the same way (before, the DICOM path made up a system of its own)."""
    raw = (
        (HL7 / "oru_r01_lab.hl7")
        .read_bytes()
        .replace(b"MRN000123^^^HOSPA^MR~H3101011985050512X^^^HCN^HC", b"P777^^^CLINIC9^MR")
        .replace(b"LIS20260315-0001", b"LIS-CLINIC9-1")
    )
    study = await hl7gw.http.post(
        "/imaging/studies", content=_dicom("P777", "CLINIC9"), headers=DICOM_JSON
    )
    assert study.status_code == 201, study.text
    assert msa(await hl7gw.send(raw))[1] in ("AA", "CA")
    gw = hl7gw.gw
    dicom_side = await _sealed_under(gw, "ImagingStudy", study.json()["id"])
    hl7_side = await _sealed_under(gw, "Patient", _hl7_patient_id(hl7gw, raw))
    assert dicom_side == hl7_side


async def test_a_retried_first_store_is_created_as_version_1(gw_settings: Settings) -> None:
    _, master = load_secrets(gw_settings)
    real = build_backends(gw_settings, master_key=master)
    flaky = FailingBlobs(real.blobs)
    backends = Backends(blobs=flaky, log=real.log, state=real.state, keys=real.keys)
    app = create_app(gw_settings, backends=backends)
    body = json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": MASTER, "value": "R1"}]}
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        ) as c,
    ):
        first = await c.put("/fhir/Patient/r-1", content=body, headers=FHIR)
        assert first.status_code == 503 and first.json()["resourceType"] == "OperationOutcome"
        flaky.down = False  # the outage ends; the sender retries
        retry = await c.put("/fhir/Patient/r-1", content=body, headers=FHIR)
        assert retry.status_code == 201, retry.text
        assert retry.json()["meta"]["versionId"] == "1"
        again = await c.put("/fhir/Patient/r-1", content=body, headers=FHIR)
        assert again.status_code == 200 and again.json()["meta"]["versionId"] == "2"


async def test_every_location_resolves_and_old_versions_stay_readable(
    client: httpx.AsyncClient,
) -> None:
    def patient(family: str) -> str:
        return json.dumps(
            {
                "resourceType": "Patient",
                "identifier": [{"system": MASTER, "value": "L1"}],
                "name": [{"family": family}],
            }
        )

    locations = []
    created = await client.put("/fhir/Patient/loc-1", content=patient("Li"), headers=FHIR)
    updated = await client.put("/fhir/Patient/loc-1", content=patient("Wang"), headers=FHIR)
    posted = await client.post(
        "/fhir/Observation",
        content=json.dumps(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": "Patient/loc-1"},
            }
        ),
        headers=FHIR,
    )
    for r in (created, updated, posted):
        assert r.status_code in (200, 201), r.text
        locations.append((r.headers["location"], r.json()["meta"]["versionId"], r.json()))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "y"},
                    "subject": {"reference": "Patient/loc-1"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    tx = await client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert tx.status_code == 200, tx.text
    entry = tx.json()["entry"][0]["response"]
    locations.append((f"http://gw/fhir/{entry['location']}", entry["etag"][3:-1], None))
    for url, version, sent in locations:
        assert url.startswith("http://gw/fhir/") and f"/_history/{version}" in url
        got = await client.get(url)
        assert got.status_code == 200, (url, got.text)
        assert got.json()["meta"]["versionId"] == version
        if sent is not None:
            assert {k: v for k, v in got.json().items() if k != "meta"} == {
                k: v for k, v in sent.items() if k != "meta"
            }
    old = await client.get("/fhir/Patient/loc-1/_history/1")
    assert old.json()["name"] == [{"family": "Li"}] and old.json()["meta"]["versionId"] == "1"
    assert (await client.get("/fhir/Patient/loc-1")).json()["name"] == [{"family": "Wang"}]
    for missing in ("/fhir/Patient/loc-1/_history/3", "/fhir/Patient/loc-1/_history/x"):
        r = await client.get(missing)
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


async def test_a_provisional_patient_is_linked_when_the_master_identifier_arrives(
    client: httpx.AsyncClient,
) -> None:
    app: FastAPI = client.app  # type: ignore[attr-defined]
    gw: Gateway = app.state.gateway
    local = {"system": "urn:oid:1.2.156.9", "value": "MRN-9"}
    first = {"resourceType": "Patient", "identifier": [local]}
    assert (
        await client.put("/fhir/Patient/p9", content=json.dumps(first), headers=FHIR)
    ).status_code == 201
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p9"},
    }
    r = await client.post("/fhir/Observation", content=json.dumps(obs), headers=FHIR)
    assert r.status_code == 201
    provisional = pseudonym(gw.pseudonym_key, local["system"], local["value"])
    system = gw.settings.master_id_system
    master = pseudonym(gw.pseudonym_key, system, "H9")
    assert not gw.index.links.linked(provisional, master)
    # The master identifier arrives with another record of the same person (another id).
    later = {"resourceType": "Patient", "identifier": [{"system": system, "value": "H9"}, local]}
    assert (
        await client.put("/fhir/Patient/p9-b", content=json.dumps(later), headers=FHIR)
    ).status_code == 201
    assert gw.index.links.linked(provisional, master)
    assert gw.index.leaf_kinds["link"] == 1
    ids = {a.record for a in gw.records.records_of_patient(master)}
    assert gw.records.record_of("Observation", r.json()["id"]) in ids
    assert gw.records.record_of("Patient", "p9") in ids
    # Sent again, nothing new is anchored.
    assert (
        await client.put("/fhir/Patient/p9-b", content=json.dumps(later), headers=FHIR)
    ).status_code == 200
    assert gw.index.leaf_kinds["link"] == 1


# ---- a shared log: two institutions, and two processes of one institution ----------------


def _shared(
    tmp: Path, services: Any, names: Sequence[str], *, same_institution: bool = False
) -> list[Settings]:
    """Settings of gateways sharing one JetStream stream, one pseudonym key and one trust
    file (each institution's signer in it)."""
    stream = f"T{os.urandom(6).hex().upper()}"
    pkey = os.urandom(32).hex()
    out = []
    signers = {}
    for n in names:
        inst = names[0] if same_institution else n
        if inst not in signers:
            signers[inst] = Signer.generate(inst)
    trust = tmp / "trust.json"
    TrustedKeys.of(signers.values()).save(trust)
    master = os.urandom(32).hex()
    prefix = f"test:{os.urandom(6).hex()}:"
    for n in names:
        inst = names[0] if same_institution else n
        extra: dict[str, Any] = {
            "nats_stream": stream,
            "pseudonym_key": pkey,
            "trust_file": trust,
            "institution": inst,
        }
        if same_institution:
            extra.update(master_key=master, redis_prefix=prefix)
        s = settings_for("production", tmp / n, services, **extra)
        signers[inst].save(s.data_dir / "keys" / "signer.json")
        out.append(s)
    return out


async def _clients(stack: AsyncExitStack, settings: Sequence[Settings]) -> list[httpx.AsyncClient]:
    out = []
    for s in settings:
        app = create_app(s)
        await stack.enter_async_context(app.router.lifespan_context(app))
        c = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        )
        c.app = app  # type: ignore[attr-defined]
        out.append(await stack.enter_async_context(c))
    return out


@pytest.mark.services
async def test_two_institutions_on_one_stream_each_keep_their_own_record(
    services: Any, tmp_path: Path
) -> None:
    settings = _shared(tmp_path, services, ["clinic-a", "hosp-b"])
    async with AsyncExitStack() as stack:
        a, b = await _clients(stack, settings)
        for c, family in ((a, "Zhang"), (b, "Liu")):
            body = {
                "resourceType": "Patient",
                "name": [{"family": family}],
                "identifier": [{"system": MASTER, "value": f"H-{family}"}],
            }
            r = await c.put("/fhir/Patient/p-1", content=json.dumps(body), headers=FHIR)
            assert r.status_code == 201 and r.json()["meta"]["versionId"] == "1", r.text
        for c in (a, b):
            await c.app.state.gateway.ledger.catch_up()  # type: ignore[attr-defined]
        for c, family in ((a, "Zhang"), (b, "Liu")):
            got = await c.get("/fhir/Patient/p-1")
            assert got.status_code == 200, got.text
            assert (
                got.json()["name"] == [{"family": family}]
                and got.json()["meta"]["versionId"] == "1"
            )
    for s in settings:
        assert await run_verify(s, blobs=True, from_checkpoint=None) == 0


@pytest.mark.services
async def test_two_processes_of_one_institution_never_write_the_same_version(
    services: Any, tmp_path: Path
) -> None:
    settings = _shared(tmp_path, services, ["w1", "w2"], same_institution=True)
    body = json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": MASTER, "value": "H-W"}]}
    )
    async with AsyncExitStack() as stack:
        one, two = await _clients(stack, settings)

        async def put(c: httpx.AsyncClient) -> int:
            r = await c.put("/fhir/Patient/shared", content=body, headers=FHIR)
            assert r.status_code in (200, 201), r.text
            return int(r.json()["meta"]["versionId"])

        versions = await asyncio.gather(*(put(c) for _ in range(6) for c in (one, two)))
        assert sorted(versions) == list(range(1, 13)), versions
        for c in (one, two):
            await c.app.state.gateway.ledger.catch_up()  # type: ignore[attr-defined]
            latest = await c.get("/fhir/Patient/shared")
            assert latest.json()["meta"]["versionId"] == "12"


async def test_delete_writes_a_tombstone_and_history_keeps_every_version(
    client: httpx.AsyncClient,
) -> None:
    app: FastAPI = client.app  # type: ignore[attr-defined]
    gw: Gateway = app.state.gateway
    body = {"resourceType": "Patient", "identifier": [{"system": MASTER, "value": "D1"}]}
    for family in ("Li", "Wang"):
        r = await client.put(
            "/fhir/Patient/del-1",
            content=json.dumps({**body, "name": [{"family": family}]}),
            headers=FHIR,
        )
        assert r.status_code in (200, 201)
    gone = await client.delete("/fhir/Patient/del-1")
    assert gone.status_code == 204 and gone.headers["etag"] == 'W/"3"'
    read = await client.get("/fhir/Patient/del-1")
    assert read.status_code == 410 and read.json()["issue"][0]["code"] == "deleted"
    assert (await client.get("/fhir/Patient/del-1/_history/3")).status_code == 410
    assert (await client.get("/fhir/Patient/del-1/_history/1")).json()["name"] == [{"family": "Li"}]
    again = await client.delete("/fhir/Patient/del-1")
    assert again.status_code == 204 and "etag" not in again.headers  # nothing new written
    assert (await client.delete("/fhir/Patient/never")).status_code == 404
    history = (await client.get("/fhir/Patient/del-1/_history")).json()
    assert history["type"] == "history"
    methods = [(e["request"]["method"], e["response"]["etag"]) for e in history["entry"]]
    assert methods == [("DELETE", 'W/"3"'), ("PUT", 'W/"2"'), ("POST", 'W/"1"')]
    assert "resource" not in history["entry"][0]
    assert history["entry"][1]["resource"]["name"] == [{"family": "Wang"}]
    assert all(e["fullUrl"].endswith("/fhir/Patient/del-1") for e in history["entry"])
    # Each version's anchor stays readable: the receipt's leaf is that version's leaf.
    for entry in history["entry"]:
        leaf_index = entry["response"]["extension"][0]["extension"][0]["valueUnsignedInt"]
        (leaf,) = await gw.ledger.leaves(leaf_index, leaf_index + 1)
        assert json.loads(leaf)["version"] == int(entry["response"]["etag"][3:-1])
    # The tombstone is on the ledger as a deletion, and holds no content.
    (tomb,) = await gw.ledger.leaves(
        history["entry"][0]["response"]["extension"][0]["extension"][0]["valueUnsignedInt"],
        history["entry"][0]["response"]["extension"][0]["extension"][0]["valueUnsignedInt"] + 1,
    )
    assert json.loads(tomb)["deleted"] is True


async def test_type_history_pages_newest_first_without_repeats(client: httpx.AsyncClient) -> None:
    for i in range(5):
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": str(i)}}
        assert (
            await client.put(f"/fhir/Observation/h{i}", content=json.dumps(obs), headers=FHIR)
        ).status_code == 201
    seen: list[str] = []
    url: str | None = "/fhir/Observation/_history?_count=2"
    while url is not None:
        page = (await client.get(url)).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == [f"h{i}" for i in reversed(range(5))]
    bad = await client.get("/fhir/Observation/_history?_count=0")
    assert bad.status_code == 400
    assert (await client.get("/fhir/Observation/_history?_sort=x")).status_code == 400


def _hl7(
    control: str, event: str, pid3: str, *, mrg: str | None = None, obx: bool = False
) -> bytes:
    structure = {"A04": "ADT_A01", "A08": "ADT_A01", "A40": "ADT_A39", "R01": "ORU_R01"}[event]
    kind = "ORU" if event == "R01" else "ADT"
    segments = [
        f"MSH|^~\\&|HIS|CLINIC9|GATEWAY|ALLIANCE|20260401090000||{kind}^{event}^{structure}|"
        f"{control}|P|2.5.1",
    ]
    if kind == "ADT":
        segments.append(f"EVN|{event}|20260401090000")
    segments.append(f"PID|1||{pid3}||Wu^Yi||19900101|F")
    if mrg is not None:
        segments.append(f"MRG|{mrg}")
    if obx:
        segments += [
            f"OBR|1||LAB-{control}|GLU^Glucose^LN|||20260401080000",
            "OBX|1|NM|GLU^Glucose^LN||5.5|mmol/L|3.9-6.1|N|||F",
        ]
    return ("\r".join(segments) + "\r").encode()


async def test_an_hl7_patient_without_the_master_identifier_is_linked_by_a08_and_a40(
    hl7gw: App,
) -> None:
    """First known by two local ids (two registrations, no master identifier), the patient is
    one patient for reads once an A08 adds the master identifier to one and an A40 merges the
    other into it; every gateway derives the same links from the ledger."""
    gw = hl7gw.gw
    first, second = "LOC-1^^^CLINIC9^MR", "LOC-2^^^CLINIC9^MR"
    for n, (pid3, control) in enumerate(((first, "R-1"), (second, "R-2"))):
        assert msa(await hl7gw.send(_hl7(f"A-{n}", "A04", pid3)))[1] == "AA"
        assert msa(await hl7gw.send(_hl7(control, "R01", pid3, obx=True)))[1] == "AA"
    key = gw.pseudonym_key
    p1 = pseudonym(key, "urn:alliance:authority:CLINIC9", "LOC-1")
    p2 = pseudonym(key, "urn:alliance:authority:CLINIC9", "LOC-2")
    master = pseudonym(key, MASTER, "H999")
    assert gw.index.has_patient(p1) and gw.index.has_patient(p2)
    observations = {
        a.record
        for p in (p1, p2)
        for a in gw.index.records_of(p)
        if a.resource_type == "Observation"
    }
    assert len(observations) == 2
    # A08: the master identifier arrives beside the first local id.
    a08 = _hl7("U-1", "A08", f"{first}~H999^^^HCN^HC")
    assert msa(await hl7gw.send(a08))[1] == "AA"
    assert gw.index.links.linked(p1, master) and not gw.index.links.linked(p2, master)
    # A40: the second registration is merged into the patient (MRG names the old id).
    a40 = _hl7("M-1", "A40", f"{first}~H999^^^HCN^HC", mrg=second)
    assert msa(await hl7gw.send(a40))[1] == "AA"
    assert gw.index.links.all_of(master) >= {p1, p2, master}
    assert gw.index.leaf_kinds["link"] == 2  # one per new link; nothing anchored twice
    seen = {
        a.record for a in gw.records.records_of_patient(master) if a.resource_type == "Observation"
    }
    assert seen == observations
    # Every other node derives the same: a fresh replay of the log gives the same classes.
    from gateway.views import RecordIndex

    replayed = RecordIndex()
    size = gw.ledger.size
    replayed.on_batch(0, await gw.ledger.leaves(0, size), 0)
    assert replayed.links.all_of(p2) == gw.index.links.all_of(p2)


async def test_without_the_search_index_records_are_stored_and_read_and_search_is_absent(
    tmp_path: Path,
) -> None:
    settings = settings_for("embedded", tmp_path / "gw", None, search_index=False)
    app = create_app(settings)
    assert not hasattr(app.state, "search")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=auth_headers(app)
        ) as c,
    ):
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
        r = await c.put("/fhir/Observation/o1", content=json.dumps(obs), headers=FHIR)
        assert r.status_code == 201, r.text
        assert (await c.get("/fhir/Observation/o1")).status_code == 200
        assert (await c.get("/fhir/Observation?code=x")).status_code in (403, 404, 405)
        assert not (settings.data_dir / "search").exists()
