"""POST /imaging/studies: DICOM JSON metadata becomes the same ImagingStudy as the HL7 v2 path."""

from __future__ import annotations

import json
from pathlib import Path

from tests.gateway.hl7.test_ingest import HL7, App, hl7gw, msa

__all__ = ["hl7gw"]  # the fixture (a gateway with MLLP), shared with the HL7 tests

DICOM = Path(__file__).resolve().parents[2] / "fixtures" / "dicom" / "ct-chest-instances.json"


async def test_dicom_json_updates_the_study_the_ris_reported(hl7gw: App) -> None:
    ack = await hl7gw.send((HL7 / "oru_r01_radiology.hl7").read_bytes())
    assert msa(ack)[1] in ("AA", "CA")
    r = await hl7gw.http.post(
        "/imaging/studies",
        content=DICOM.read_bytes(),
        headers={"content-type": "application/dicom+json"},
    )
    assert r.status_code in (200, 201), r.text
    study = r.json()
    assert study["resourceType"] == "ImagingStudy"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 3)
    gw = hl7gw.gw
    anchor = gw.index.latest(gw.pipeline.record_of("ImagingStudy", study["id"]))
    patient_id = study["subject"]["reference"].split("/")[1]
    patient_anchor = gw.index.latest(gw.pipeline.record_of("Patient", patient_id))
    assert patient_anchor is not None, "the DICOM study names a patient the v2 path did not"
    assert anchor.patient == patient_anchor.patient
    assert r.status_code == 200 and anchor.version == 2  # the v2 message created version 1
    back = (await hl7gw.http.get(f"/fhir/ImagingStudy/{study['id']}")).json()
    assert back["series"][0]["bodySite"]["code"] == "CHEST"


async def test_bad_dicom_json_is_an_operation_outcome(hl7gw: App) -> None:
    headers = {"content-type": "application/dicom+json"}
    r = await hl7gw.http.post("/imaging/studies", content=b"[]", headers=headers)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    no_uid = json.loads(DICOM.read_text())
    for obj in no_uid:
        obj.pop("0020000D")
    r = await hl7gw.http.post("/imaging/studies", content=json.dumps(no_uid), headers=headers)
    assert r.status_code == 400
    r = await hl7gw.http.post(
        "/imaging/studies", content=b"{}", headers={"content-type": "text/csv"}
    )
    assert r.status_code == 415
