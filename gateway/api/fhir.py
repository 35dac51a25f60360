"""FHIR R4 REST: ``POST /fhir`` (transaction/batch), ``POST /fhir/{type}``, ``PUT`` and ``GET``.

Every response that reports stored records is sent only after the pipeline returned, i.e. after
the ciphertexts are stored and the leaves are durable in the log. Errors are raised as gateway
errors and turned into OperationOutcome by the app's single handler.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import (
    fhir_response,
    parse_json,
    read_body,
    require_json_content_type,
)
from gateway.auth.policy import authorize_entry
from gateway.errors import InvalidInputError
from gateway.fhir import (
    PreparedBundle,
    PreparedEntry,
    b64,
    operation_outcome,
    patient_reference,
    prepare_bundle,
    receipt_extension,
    validate_resource,
)
from gateway.identity import fhir_identifiers, patient_identity
from gateway.pipeline import RecordInput, StoredRecord
from gateway.runtime import Gateway
from mappings.v2.datatypes import facility_system

FHIR_VERSION = "4.0.1"
SUPPORTED_TYPES = (
    "Patient",
    "Observation",
    "DiagnosticReport",
    "Encounter",
    "Organization",
    "Practitioner",
    "Specimen",
    "ServiceRequest",
    "ImagingStudy",
    "DocumentReference",
    "Appointment",
    "Condition",
    "Binary",
    "Provenance",
    "MedicationRequest",
    "AllergyIntolerance",
    "Procedure",
)


def capability_statement(gw: Gateway) -> dict[str, Any]:
    """The CapabilityStatement served at /fhir/metadata."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-28",
        "kind": "instance",
        "software": {"name": "alliance-gateway", "version": "0.1.0"},
        "implementation": {"description": f"Alliance gateway of {gw.settings.institution}"},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": t,
                        "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}],
                    }
                    for t in SUPPORTED_TYPES
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


def _patient_identity(gw: Gateway, resource: dict[str, Any]) -> str:
    """The pseudonym of a Patient resource sent over FHIR REST (gateway/identity.py). A
    Patient with no identifier at all is known only by its id at this institution."""
    facility = gw.settings.institution
    identifiers = fhir_identifiers(resource) or [
        (facility_system(facility, "Patient"), str(resource["id"]))
    ]
    return patient_identity(
        gw.pseudonym_key,
        identifiers,
        master_system=gw.settings.master_id_system,
        facility=facility,
    ).pseudonym


def _link_patients(gw: Gateway, prepared: PreparedBundle) -> None:
    """Set each entry's patient pseudonym; an unresolvable patient is an entry error."""
    in_bundle: dict[str, str] = {}
    for pe in prepared.entries:
        if pe.resource is not None and pe.resource["resourceType"] == "Patient":
            pe.patient = _patient_identity(gw, pe.resource)
            in_bundle[f"Patient/{pe.resource['id']}"] = pe.patient
    for pe in prepared.entries:
        if pe.resource is None or pe.patient is not None:
            continue
        try:
            pe.patient = resolve_patient(
                gw, pe.resource, in_bundle, where=f"Bundle.entry[{pe.position}].resource"
            )
        except InvalidInputError as exc:
            if prepared.bundle_type == "transaction":
                raise
            pe.error, pe.resource = exc, None


def resolve_patient(
    gw: Gateway, resource: dict[str, Any], in_bundle: dict[str, str], *, where: str
) -> str:
    """The pseudonym of the patient a resource belongs to (the institution's if none).

    Raises InvalidInputError (code processing) when it names a patient unknown here.
    """
    if resource["resourceType"] == "Patient":
        return _patient_identity(gw, resource)
    found = patient_reference(resource)
    if found is None:
        return gw.pipeline.no_patient
    element, ref = found
    reference = str(ref.get("reference", ""))
    if reference.startswith("Patient/"):
        known = in_bundle.get(reference)
        if known is None:
            known = gw.pipeline.patient_of("Patient", reference.split("/", 1)[1])
        if known is None:
            raise InvalidInputError(
                f"{element} references a Patient that is not stored on this gateway",
                location=f"{where}.{element}",
                code="processing",
            )
        return known
    identifiers = fhir_identifiers(ref)
    if not identifiers:
        raise InvalidInputError(
            f"{element} has neither a reference nor an identifier value",
            location=f"{where}.{element}",
            code="processing",
        )
    return patient_identity(
        gw.pseudonym_key,
        identifiers,
        master_system=gw.settings.master_id_system,
        facility=gw.settings.institution,
    ).pseudonym


def entry_response(
    gw: Gateway, stored: StoredRecord, encoded: dict[int, bytes] | None = None
) -> dict[str, Any]:
    """A Bundle.entry.response for a stored record, with its ledger receipt.

    ``encoded`` caches serialised checkpoints: the records of one batch share one checkpoint.
    """
    proof = gw.ledger.inclusion_proof(stored.leaf_index, stored.tree_size)
    cache = {} if encoded is None else encoded
    checkpoint = cache.get(id(stored.checkpoint))
    if checkpoint is None:
        checkpoint = cache[id(stored.checkpoint)] = stored.checkpoint.to_bytes()
    return {
        "status": "201 Created" if stored.created else "200 OK",
        "location": f"{stored.resource_type}/{stored.resource_id}/_history/{stored.version}",
        "etag": f'W/"{stored.version}"',
        "lastModified": stored.last_updated,
        "extension": [
            receipt_extension(
                leaf_index=stored.leaf_index,
                tree_size=stored.tree_size,
                root=stored.root,
                proof=proof,
                checkpoint=checkpoint,
                cid=stored.cid,
                byte_range=stored.byte_range,
            )
        ],
    }


def _error_entry(pe: PreparedEntry) -> dict[str, Any]:
    assert pe.error is not None
    status = "422 Unprocessable Entity" if pe.error.code == "processing" else "400 Bad Request"
    return {
        "response": {
            "status": status,
            "outcome": operation_outcome(
                "error", pe.error.code, str(pe.error), location=pe.error.location
            ),
        }
    }


async def store_and_count(gw: Gateway, inputs: list[RecordInput]) -> list[StoredRecord]:
    """Run the pipeline, count what was stored, and attach the final checkpoint if asked.

    With ``receipt_wait_final_ms`` and a witness quorum, waits (bounded) until a checkpoint
    covering these records is cosigned by the quorum, and moves the receipts onto it.
    """
    stored = await gw.pipeline.store(inputs)
    gw.metrics.count_stored(s.resource_type for s in stored)
    wait = gw.settings.receipt_wait_final_ms / 1000.0
    if stored and wait > 0 and gw.settings.witness_quorum > 0:
        try:
            final = await gw.witness.wait_final(max(s.tree_size for s in stored), wait)
        except TimeoutError:
            return stored
        cp = final.checkpoint
        stored = [s._replace(tree_size=cp.size, root=cp.root, checkpoint=final) for s in stored]
    return stored


def build_router(gw: Gateway) -> APIRouter:
    """The /fhir routes."""
    router = APIRouter(prefix="/fhir")
    settings = gw.settings

    @router.get("/metadata")
    async def metadata() -> Response:
        return fhir_response(capability_statement(gw))

    @router.post("")
    async def post_bundle(request: Request) -> Response:
        require_json_content_type(request)
        body = parse_json(await read_body(request, settings.max_body_bytes))
        prepared = prepare_bundle(body, max_entries=settings.max_bundle_entries)
        _link_patients(gw, prepared)
        for pe in prepared.entries:
            if pe.resource is not None:
                authorize_entry(request.state.caller, pe.resource["resourceType"], pe.method)
                await gw.policy.check_write(request, pe.resource["resourceType"])
        good = [pe for pe in prepared.entries if pe.resource is not None]
        stored = await store_and_count(
            gw,
            [
                RecordInput(pe.resource, pe.patient or gw.pipeline.no_patient)
                for pe in good
                if pe.resource
            ],
        )
        by_pos = {pe.position: s for pe, s in zip(good, stored, strict=True)}
        entries = []
        encoded: dict[int, bytes] = {}
        for pe in prepared.entries:
            if pe.position in by_pos:
                entries.append({"response": entry_response(gw, by_pos[pe.position], encoded)})
            else:
                entries.append(_error_entry(pe))
        return fhir_response(
            {
                "resourceType": "Bundle",
                "id": uuid.uuid4().hex,
                "type": f"{prepared.bundle_type}-response",
                "entry": entries,
            }
        )

    async def _store_one(request: Request, rtype: str, rid: str | None) -> Response:
        require_json_content_type(request)
        resource = parse_json(await read_body(request, settings.max_body_bytes))
        actual = validate_resource(resource, where=rtype)
        if actual != rtype:
            raise InvalidInputError(
                f"resourceType {actual} does not match the URL's {rtype}",
                location=f"{rtype}.resourceType",
            )
        if rid is not None and resource.get("id") not in (None, rid):
            raise InvalidInputError("resource id differs from the URL", location=f"{rtype}.id")
        resource = dict(resource)
        resource["id"] = rid or uuid.uuid4().hex
        patient = resolve_patient(gw, resource, {}, where=rtype)
        await gw.policy.check_write(request, rtype)
        (stored,) = await store_and_count(gw, [RecordInput(resource, patient)])
        resp = entry_response(gw, stored)
        receipt = resp["extension"][0]
        headers = {
            "Location": f"{str(request.base_url).rstrip('/')}/fhir/{resp['location']}",
            "ETag": resp["etag"],
            "Last-Modified": stored.last_updated,
            "X-Ledger-Leaf-Index": str(stored.leaf_index),
            "X-Ledger-Tree-Size": str(stored.tree_size),
            "X-Ledger-Root": b64(stored.root),
        }
        resource.setdefault("meta", {})["extension"] = [receipt]
        return fhir_response(resource, status=201 if stored.created else 200, headers=headers)

    @router.post("/{rtype}")
    async def create(rtype: str, request: Request) -> Response:
        return await _store_one(request, rtype, None)

    @router.put("/{rtype}/{rid}")
    async def update(rtype: str, rid: str, request: Request) -> Response:
        return await _store_one(request, rtype, rid)

    @router.get("/{rtype}/{rid}")
    async def read(rtype: str, rid: str, request: Request) -> Response:
        anchor = gw.index.latest(gw.pipeline.record_of(rtype, rid))
        if anchor is not None:
            await gw.policy.check_read(request, rtype, anchor.patient)
        record = await gw.pipeline.read(rtype, rid)
        return fhir_response(
            record.resource,
            headers={
                "ETag": f'W/"{record.anchor.version}"',
                "X-Ledger-Leaf-Index": str(record.anchor.leaf_index),
            },
        )

    return router
