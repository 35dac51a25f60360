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
from gateway.auth.caller import Caller
from gateway.auth.policy import authorize_entry
from gateway.config import SenderProfile
from gateway.consents import keep_consents_out
from gateway.errors import InvalidInputError, NotFoundError
from gateway.fhir import (
    PreparedBundle,
    PreparedEntry,
    b64,
    input_outcome,
    patient_reference,
    prepare_bundle,
    receipt_extension,
    validate_resource,
)
from gateway.identity import PatientIdentity, fhir_identifiers, patient_identity
from gateway.pipeline import ReadRecord, RecordInput, StoredRecord
from gateway.records import HistoryEntry, LinkReason, Receipt
from gateway.runtime import Gateway
from gateway.search.params import search_params_of
from mappings.v2.datatypes import facility_system

FHIR_VERSION = "4.0.1"
#: Most versions one page of a history answers.
MAX_HISTORY_PAGE = 1000
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


def _capability_of(rtype: str) -> dict[str, Any]:
    """One type's entry in the CapabilityStatement: exactly the interactions, search
    parameters and operations that work."""
    codes = ["read", "vread", "create", "update", "delete", "history-instance", "history-type"]
    params = search_params_of(rtype)
    if params:
        codes.append("search-type")
    out: dict[str, Any] = {
        "type": rtype,
        "interaction": [{"code": c} for c in codes],
        "versioning": "versioned",
    }
    if params:
        out["searchParam"] = params
    if rtype == "Patient":
        out["operation"] = [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            }
        ]
    return out


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
                "resource": [_capability_of(t) for t in SUPPORTED_TYPES],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


def _patient_identity(gw: Gateway, resource: dict[str, Any]) -> PatientIdentity:
    """The identity of a Patient resource sent over FHIR REST (gateway/identity.py). A
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
    )


def patient_links(
    gw: Gateway, resource: dict[str, Any], identity: PatientIdentity
) -> list[tuple[str, str, LinkReason]]:
    """The pseudonyms a Patient resource says are the same person as ``identity``: its other
    identifiers once the master identifier is present, and the patients its ``link`` names.
    The record service anchors the links whose other side already has records."""
    out: list[tuple[str, str, LinkReason]] = []
    if not identity.provisional:
        out += [(alias, identity.pseudonym, "master-identifier") for alias in identity.aliases]
    for link in resource.get("link") or []:
        other = link.get("other") if isinstance(link, dict) else None
        ref = str(other.get("reference", "")) if isinstance(other, dict) else ""
        if ref.startswith("Patient/"):
            known = gw.records.patient_of("Patient", ref.split("/", 1)[1])
            if known is not None:
                out.append((known, identity.pseudonym, "patient-link"))
    return out


def _link_patients(gw: Gateway, prepared: PreparedBundle) -> None:
    """Set each entry's patient pseudonym; an unresolvable patient is an entry error."""
    in_bundle: dict[str, str] = {}
    for pe in prepared.entries:
        if pe.resource is not None and pe.resource["resourceType"] == "Patient":
            identity = _patient_identity(gw, pe.resource)
            pe.patient = identity.pseudonym
            pe.links = patient_links(gw, pe.resource, identity)
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


def sender_of(gw: Gateway, caller: object | None) -> tuple[str, SenderProfile]:
    """The institution a FHIR request comes from (the authenticated client's, else this
    gateway's) and its sender profile (by client id, else the default)."""
    if isinstance(caller, Caller):
        return caller.institution, gw.settings.sender_profile(caller.client_id)
    return gw.settings.institution, gw.settings.default_sender_profile


async def _apply_dictionary(gw: Gateway, prepared: PreparedBundle, caller: object | None) -> None:
    """Map every entry's codes with the unified dictionary (keyed by the sender's institution)
    under the sender's policy: in a transaction one rejected code fails the whole Bundle
    (before anything is stored), in a batch only its entry."""
    source, profile = sender_of(gw, caller)
    entries = [pe for pe in prepared.entries if pe.resource is not None]
    if prepared.bundle_type == "transaction":
        mapped = await gw.terminology.apply_all(
            [pe.resource for pe in entries if pe.resource is not None],
            source=source,
            profile=profile,
        )
        for pe, resource in zip(entries, mapped, strict=True):
            pe.resource = resource
        return
    for pe in entries:
        assert pe.resource is not None
        try:
            pe.resource = await gw.terminology.apply(pe.resource, source=source, profile=profile)
        except InvalidInputError as exc:
            pe.error, pe.resource = exc, None


def resolve_patient(
    gw: Gateway, resource: dict[str, Any], in_bundle: dict[str, str], *, where: str
) -> str:
    """The pseudonym of the patient a resource belongs to (the institution's if none).
    ``in_bundle`` maps ``Patient/{id}`` of the Bundle's Patients to their pseudonyms; it also
    remembers the pseudonyms of identifiers resolved before in the same request.

    Raises InvalidInputError (code processing) when it names a patient unknown here.
    """
    if resource["resourceType"] == "Patient":
        return _patient_identity(gw, resource).pseudonym
    found = patient_reference(resource)
    if found is None:
        return gw.records.no_patient
    element, ref = found
    reference = str(ref.get("reference", ""))
    if reference.startswith("Patient/"):
        known = in_bundle.get(reference)
        if known is None:
            known = gw.records.patient_of("Patient", reference.split("/", 1)[1])
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
    # The entries of one Bundle often name one patient by the same identifier: one HMAC.
    memo_key = "identifier:" + "\x1f".join(f"{s or ''}\x1e{v}" for s, v in identifiers)
    known = in_bundle.get(memo_key)
    if known is None:
        known = in_bundle[memo_key] = patient_identity(
            gw.pseudonym_key,
            identifiers,
            master_system=gw.settings.master_id_system,
            facility=gw.settings.institution,
        ).pseudonym
    return known


def entry_response(
    gw: Gateway, stored: StoredRecord, encoded: dict[int, bytes] | None = None
) -> dict[str, Any]:
    """A Bundle.entry.response for a stored record, with its ledger receipt.

    ``encoded`` caches serialised checkpoints: the records of one batch share one checkpoint.
    """
    receipt = gw.records.receipt(stored, encoded)
    return {
        "status": "201 Created" if stored.created else "200 OK",
        "location": version_location(stored.resource_type, stored.resource_id, stored.version),
        "etag": f'W/"{stored.version}"',
        "lastModified": stored.last_updated,
        "extension": [_extension(receipt)],
    }


def _extension(receipt: Receipt) -> dict[str, Any]:
    """A receipt as the FHIR ledger-receipt extension (docs/api.md)."""
    return receipt_extension(
        leaf_index=receipt.leaf_index,
        tree_size=receipt.tree_size,
        root=receipt.root,
        proof=receipt.proof,
        checkpoint=receipt.checkpoint,
        cid=receipt.cid,
        byte_range=receipt.byte_range,
    )


def version_location(resource_type: str, resource_id: str, version: int) -> str:
    """The relative URL of one version of a resource (what vread answers)."""
    return f"{resource_type}/{resource_id}/_history/{version}"


def stored_headers(request: Request, stored: StoredRecord) -> dict[str, str]:
    """The HTTP headers of a stored record: an absolute ``Location`` that resolves (vread),
    ``ETag``, ``Last-Modified`` and the receipt's position on the ledger."""
    where = version_location(stored.resource_type, stored.resource_id, stored.version)
    return {
        "Location": f"{str(request.base_url).rstrip('/')}/fhir/{where}",
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": stored.last_updated,
        "X-Ledger-Leaf-Index": str(stored.leaf_index),
        "X-Ledger-Tree-Size": str(stored.tree_size),
        "X-Ledger-Root": b64(stored.root),
    }


def _error_entry(pe: PreparedEntry) -> dict[str, Any]:
    assert pe.error is not None
    status = "422 Unprocessable Entity" if pe.error.code == "processing" else "400 Bad Request"
    return {
        "response": {
            "status": status,
            "outcome": input_outcome(pe.error),
        }
    }


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
        keep_consents_out(prepared)  # consents go through /fhir/Consent (gateway/api/consent.py)
        _link_patients(gw, prepared)
        for pe in prepared.entries:
            if pe.resource is not None:
                authorize_entry(request.state.caller, pe.resource["resourceType"], pe.method)
        await _apply_dictionary(gw, prepared, request.state.caller)
        good = [pe for pe in prepared.entries if pe.resource is not None]
        stored = await gw.records.store(
            [
                RecordInput(pe.resource, pe.patient or gw.records.no_patient)
                for pe in good
                if pe.resource
            ],
            links=[link for pe in good for link in pe.links],
            caller=request.state.caller,
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
        source, profile = sender_of(gw, request.state.caller)
        resource = await gw.terminology.apply(resource, source=source, profile=profile)
        links: list[tuple[str, str, LinkReason]] = []
        if rtype == "Patient":
            identity = _patient_identity(gw, resource)
            patient = identity.pseudonym
            links = patient_links(gw, resource, identity)
        else:
            patient = resolve_patient(gw, resource, {}, where=rtype)
        (stored,) = await gw.records.store(
            [RecordInput(resource, patient)], links=links, caller=request.state.caller
        )
        resp = entry_response(gw, stored)
        resource.setdefault("meta", {})["extension"] = resp["extension"]
        return fhir_response(
            resource, status=201 if stored.created else 200, headers=stored_headers(request, stored)
        )

    @router.post("/{rtype}")
    async def create(rtype: str, request: Request) -> Response:
        return await _store_one(request, rtype, None)

    @router.put("/{rtype}/{rid}")
    async def update(rtype: str, rid: str, request: Request) -> Response:
        return await _store_one(request, rtype, rid)

    def _read_response(record: ReadRecord) -> Response:
        return fhir_response(
            record.resource,
            headers={
                "ETag": f'W/"{record.anchor.version}"',
                "X-Ledger-Leaf-Index": str(record.anchor.leaf_index),
            },
        )

    def _history_bundle(request: Request, entries: list[HistoryEntry], count: int) -> Response:
        base = f"{str(request.base_url).rstrip('/')}/fhir"
        out = []
        for item in entries:
            anchor, rid, resource = item.anchor, item.resource_id, item.resource
            rtype = anchor.resource_type
            receipt = gw.records.receipt_of_anchor(anchor)
            method = "DELETE" if anchor.deleted else ("POST" if anchor.version == 1 else "PUT")
            entry: dict[str, Any] = {"fullUrl": f"{base}/{rtype}/{rid}"}
            if resource is not None:
                entry["resource"] = resource
            entry["request"] = {
                "method": method,
                "url": rtype if method == "POST" else f"{rtype}/{rid}",
            }
            entry["response"] = {
                "status": "410 Gone"
                if anchor.deleted
                else ("201 Created" if anchor.version == 1 else "200 OK"),
                "etag": f'W/"{anchor.version}"',
                "lastModified": anchor.time,
                "extension": [_extension(receipt)],
            }
            out.append(entry)
        links = [{"relation": "self", "url": str(request.url)}]
        if len(entries) == count and entries:
            nxt = request.url.include_query_params(_cursor=entries[-1].anchor.leaf_index)
            links.append({"relation": "next", "url": str(nxt)})
        return fhir_response(
            {"resourceType": "Bundle", "type": "history", "link": links, "entry": out}
        )

    def _paging(request: Request) -> tuple[int, int | None]:
        raw_count = request.query_params.get("_count", "50")
        raw_cursor = request.query_params.get("_cursor")
        unknown = set(request.query_params) - {"_count", "_cursor"}
        if unknown:
            raise InvalidInputError(
                f"unknown history parameter {sorted(unknown)[0]!r}", location="query"
            )
        if not raw_count.isdigit() or not 1 <= int(raw_count) <= MAX_HISTORY_PAGE:
            raise InvalidInputError(f"_count must be 1-{MAX_HISTORY_PAGE}", location="_count")
        if raw_cursor is not None and not raw_cursor.isdigit():
            raise InvalidInputError("_cursor is not a cursor this gateway gave", location="_cursor")
        return int(raw_count), int(raw_cursor) if raw_cursor is not None else None

    @router.get("/{rtype}/_history")
    async def type_history(rtype: str, request: Request) -> Response:
        count, cursor = _paging(request)
        entries = await gw.records.history(
            rtype, before=cursor, count=count, caller=request.state.caller
        )
        return _history_bundle(request, entries, count)

    @router.get("/{rtype}/{rid}/_history")
    async def instance_history(rtype: str, rid: str, request: Request) -> Response:
        count, cursor = _paging(request)
        entries = await gw.records.history(
            rtype, rid, before=cursor, count=count, caller=request.state.caller
        )
        return _history_bundle(request, entries, count)

    @router.delete("/{rtype}/{rid}")
    async def delete(rtype: str, rid: str, request: Request) -> Response:
        stored = await gw.records.delete(rtype, rid, caller=request.state.caller)
        if stored is None:
            return Response(status_code=204)
        headers = stored_headers(request, stored)
        headers.pop("Location")
        return Response(status_code=204, headers=headers)

    @router.get("/{rtype}/{rid}")
    async def read(rtype: str, rid: str, request: Request) -> Response:
        return _read_response(await gw.records.read(rtype, rid, caller=request.state.caller))

    @router.get("/{rtype}/{rid}/_history/{vid}")
    async def vread(rtype: str, rid: str, vid: str, request: Request) -> Response:
        if not vid.isdigit() or int(vid) < 1:
            raise NotFoundError(f"{rtype}/{rid} has no version {vid[:20]!r}")
        return _read_response(
            await gw.records.read(rtype, rid, version=int(vid), caller=request.state.caller)
        )

    return router
