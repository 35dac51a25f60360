"""``POST /imaging/studies``: imaging metadata as DICOM JSON (PS3.18 ``application/dicom+json``).

Produces the same ImagingStudy as the HL7 v2 path (mappings/imaging.py) and stores it through
the record pipeline; the answer is the stored ImagingStudy with its ledger receipt, as for
``POST /fhir/{type}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import fhir_response, parse_json, read_body
from gateway.api.fhir import entry_response, stored_headers
from gateway.errors import InvalidInputError
from gateway.hl7.ingest import HL7Ingest
from gateway.identity import patient_identity
from gateway.pipeline import RecordInput
from mappings.errors import MappingError
from mappings.imaging import dicom_patient_identifier, imaging_study_from_dicom_json

DICOM_JSON = "application/dicom+json"


def build_router(ingest: HL7Ingest) -> APIRouter:
    """The /imaging/studies route."""
    router = APIRouter()
    gw = ingest.gw

    @router.post("/imaging/studies")
    async def post_study(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (DICOM_JSON, "application/json"):
            raise InvalidInputError(
                f"content type {ctype or '(none)'} is not supported; send {DICOM_JSON}",
                code="not-supported-media-type",
            )
        doc = parse_json(await read_body(request, gw.settings.max_body_bytes))
        try:
            study = imaging_study_from_dicom_json(doc, options=ingest.options)
        except MappingError as exc:
            where = f"DICOM {exc.segment or ''}".strip()
            raise InvalidInputError(str(exc), location=where) from exc
        subject = str(study.get("subject", {}).get("reference", ""))
        patient = gw.records.patient_of("Patient", subject.split("/", 1)[-1])
        if patient is None:
            patient = patient_identity(
                gw.pseudonym_key,
                [dicom_patient_identifier(doc, options=ingest.options)],
                master_system=gw.settings.master_id_system,
                facility=gw.settings.institution,
            ).pseudonym
        study = await gw.terminology.apply(
            study, source=gw.settings.institution, profile=gw.settings.default_sender_profile
        )
        (stored,) = await gw.records.store(
            [RecordInput(study, patient)], caller=request.state.caller
        )
        resp = entry_response(gw, stored)
        study.setdefault("meta", {})["extension"] = resp["extension"]
        return fhir_response(
            study, status=201 if stored.created else 200, headers=stored_headers(request, stored)
        )

    return router
