"""Consent routes: ``POST /fhir/Consent``, ``PUT /fhir/Consent/{id}``, ``GET /fhir/Consent``
(``?patient=``), reads and history of one Consent, and ``GET /consent/$explain``.

Consents are not clinical records of a custodian: they are sealed under the alliance consent
key and anchored by ``consent`` leaves (gateway/consents.py), never stored through the record
service. This router is included before the FHIR and search routers, so ``/fhir/Consent...`` is
answered here; a Consent inside a transaction or batch Bundle is refused
(:func:`gateway.consents.keep_consents_out`), and deleting a Consent or listing every Consent
is refused (405: a revocation is a new version with ``status: inactive``).

Who may call is decided by the route table (gateway/auth/policy.py, rules ``consent`` and
``consent-explain``); that a patient token acts only for its own patient is checked here and in
:class:`gateway.consents.ConsentService`. Errors become OperationOutcome in the app's handler.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from gateway.api.common import fhir_response, parse_json, read_body, require_json_content_type
from gateway.api.fhir import entry_response, stored_headers
from gateway.auth.caller import Caller
from gateway.auth.errors import ForbiddenError
from gateway.consent import AccessQuery, Decision, RecordMeta
from gateway.consents import ConsentService, ReadConsent, StoredConsent
from gateway.errors import InvalidInputError, NotFoundError
from gateway.fhir import b64, receipt_extension, validate_resource
from gateway.pipeline import StoredRecord
from gateway.runtime import Gateway

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FORM = "application/x-www-form-urlencoded"
_RTYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _as_stored_record(stored: StoredConsent) -> StoredRecord:
    """The write answer of a Consent in the shape the FHIR router's helpers take."""
    return StoredRecord(
        resource_type="Consent",
        resource_id=stored.consent_id,
        version=stored.version,
        record=stored.token,
        cid=stored.cid,
        byte_range=stored.byte_range,
        last_updated=stored.last_updated,
        leaf_index=stored.leaf_index,
        tree_size=stored.tree_size,
        root=stored.root,
        checkpoint=stored.checkpoint,
        created=stored.created,
    )


def _receipt_of(gw: Gateway, read: ReadConsent) -> dict[str, Any]:
    """The ledger-receipt extension of an anchored Consent version, proved in the latest
    checkpoint. Raises LedgerError."""
    latest = gw.ledger.latest
    assert latest is not None  # a consent leaf exists, so the ledger has a checkpoint
    size = latest.checkpoint.size
    index = read.entry.leaf_index
    return receipt_extension(
        leaf_index=index,
        tree_size=size,
        root=latest.checkpoint.root,
        proof=gw.ledger.inclusion_proof(index, size),
        checkpoint=latest.to_bytes(),
        cid=read.entry.leaf.cid,
        byte_range=read.entry.leaf.byte_range,
    )


def _patient_param(
    service: ConsentService, caller: object | None, params: list[tuple[str, str]]
) -> str | None:
    """The pseudonym the ``patient`` (``Patient/{id}`` or ``{id}`` stored here) or
    ``patient:identifier`` (``{master system}|{value}``) parameter names; for a patient token
    without one, its own. None: a Patient id not stored here. Raises InvalidInputError (400
    located at the parameter), ForbiddenError (a patient token naming another patient)."""
    values = [(k, v) for k, v in params if k in ("patient", "patient:identifier")]
    if len(values) > 1:
        raise InvalidInputError("give the patient once", location=values[1][0])
    if not values:
        if isinstance(caller, Caller) and caller.kind == "patient" and caller.patient:
            return caller.patient
        raise InvalidInputError("the patient parameter is required", location="patient")
    name, value = values[0]
    if name == "patient:identifier":
        system, bar, ident = value.rpartition("|")
        if not bar or system != service.master_system or not ident:
            raise InvalidInputError(
                f"patient:identifier must be {service.master_system}|<value>",
                location="patient:identifier",
            )
        patient: str | None = service.patient_of_master_id(ident)
    else:
        rid = value.removeprefix("Patient/")
        if not _ID.fullmatch(rid):
            raise InvalidInputError("patient must be Patient/<id>", location="patient")
        patient = service.patient_of_stored(rid)
    if patient is None:
        if isinstance(caller, Caller) and caller.kind == "patient":
            raise ForbiddenError(
                "a patient token reaches only that patient's own consents", reason="patient"
            )
        return None
    service.check_caller(caller, patient)
    return patient


def _search_bundle(request: Request, found: list[ReadConsent]) -> dict[str, Any]:
    base = f"{str(request.base_url).rstrip('/')}/fhir"
    return {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": "searchset",
        "total": len(found),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [
            {
                "fullUrl": f"{base}/Consent/{r.resource.get('id')}",
                "resource": r.resource,
                "search": {"mode": "match"},
            }
            for r in found
        ],
    }


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "permitted": decision.permitted,
        "consent": decision.consent_id,
        "path": decision.path,
        "reason": decision.reason,
        "breakGlass": decision.break_glass,
    }


def explain_query(params: list[tuple[str, str]], *, institution: str, at: datetime) -> AccessQuery:
    """The access query ``$explain`` asks about: ``actor`` (``Organization/{institution}``,
    required; ``Practitioner/{user}`` optional), ``role``, ``purpose`` (v3 ActReason, required),
    ``class`` (resource type, required), ``code`` and ``label`` (``system|code``, repeatable),
    ``custodian`` (default this gateway's institution), ``date`` (the record's clinical date).
    Raises InvalidInputError (400, located at the parameter)."""
    known = {"patient", "patient:identifier", "actor", "role", "purpose", "class", "code"}
    known |= {"label", "custodian", "date"}
    for name, _v in params:
        if name not in known:
            raise InvalidInputError(f"unknown parameter {name!r}", location=name)

    def one(name: str, *, required: bool) -> str | None:
        values = [v for k, v in params if k == name]
        if len(values) > 1:
            raise InvalidInputError(f"give {name} once", location=name)
        if required and not values:
            raise InvalidInputError(f"the {name} parameter is required", location=name)
        return values[0] if values else None

    org = user = None
    for value in (v for k, v in params if k == "actor"):
        kind, _slash, ident = value.partition("/")
        if kind == "Organization" and _ID.fullmatch(ident) and org is None:
            org = ident
        elif kind == "Practitioner" and ident and user is None:
            user = ident
        else:
            raise InvalidInputError(
                "actor must be Organization/<institution> (once) and optionally "
                "Practitioner/<user>",
                location="actor",
            )
    if org is None:
        raise InvalidInputError("actor=Organization/<institution> is required", location="actor")
    rtype = one("class", required=True) or ""
    if not _RTYPE.fullmatch(rtype):
        raise InvalidInputError("class must be a FHIR resource type", location="class")
    clinical = None
    date = one("date", required=False)
    if date is not None:
        try:
            clinical = datetime.fromisoformat(date.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInputError("date must be an ISO 8601 date-time", location="date") from exc
        if clinical.tzinfo is None:
            clinical = clinical.replace(tzinfo=UTC)
    for name in ("code", "label"):
        for value in (v for k, v in params if k == name):
            if "|" not in value:
                raise InvalidInputError(f"{name} must be system|code", location=name)
    meta = RecordMeta(
        resource_type=rtype,
        custodian=one("custodian", required=False) or institution,
        codes=frozenset(v for k, v in params if k == "code"),
        clinical_date=clinical,
        labels=frozenset(v for k, v in params if k == "label"),
    )
    return AccessQuery(
        institution=org,
        purpose=one("purpose", required=True) or "",
        at=at,
        user=user,
        role=one("role", required=False),
        record=meta,
    )


def build_router(gw: Gateway) -> APIRouter:
    """The Consent routes (include before the FHIR and search routers)."""
    router = APIRouter()
    service = gw.consents
    settings = gw.settings

    async def _consent_body(request: Request) -> dict[str, Any]:
        require_json_content_type(request)
        resource = parse_json(await read_body(request, settings.max_body_bytes))
        actual = validate_resource(resource, where="Consent")
        if actual != "Consent":
            raise InvalidInputError(
                f"resourceType {actual} does not match the URL's Consent",
                location="Consent.resourceType",
            )
        return dict(resource)

    def _written(request: Request, stored: StoredConsent) -> Response:
        record = _as_stored_record(stored)
        resp = entry_response(gw, record)
        resource = dict(stored.resource)
        resource["meta"] = {**resource.get("meta", {}), "extension": resp["extension"]}
        return fhir_response(
            resource,
            status=201 if stored.created else 200,
            headers=stored_headers(request, record),
        )

    @router.post("/fhir/Consent")
    async def create(request: Request) -> Response:
        resource = await _consent_body(request)
        resource["id"] = uuid.uuid4().hex  # a create names no id (FHIR): the server gives one
        return _written(request, await service.record(resource, request.state.caller))

    @router.put("/fhir/Consent/{cid}")
    async def update(cid: str, request: Request) -> Response:
        if not _ID.fullmatch(cid):
            raise InvalidInputError("not a valid resource id", location="Consent.id")
        resource = await _consent_body(request)
        if resource.get("id") not in (None, cid):
            raise InvalidInputError("resource id differs from the URL", location="Consent.id")
        resource["id"] = cid
        return _written(request, await service.record(resource, request.state.caller))

    async def _search(request: Request, params: list[tuple[str, str]]) -> Response:
        unknown = {k for k, _v in params} - {"patient", "patient:identifier", "_count"}
        if unknown:
            raise InvalidInputError(
                f"unknown search parameter {sorted(unknown)[0]!r} (Consent is searched by patient)",
                location=sorted(unknown)[0],
            )
        caller = request.state.caller
        patient = _patient_param(service, caller, params)
        found = await service.consents_of(patient) if patient is not None else []
        return fhir_response(_search_bundle(request, found))

    @router.get("/fhir/Consent")
    async def search(request: Request) -> Response:
        return await _search(request, list(request.query_params.multi_items()))

    @router.post("/fhir/Consent/_search")
    async def search_post(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, settings.max_body_bytes)
        if body.strip() and ctype != _FORM:
            raise InvalidInputError(
                f"POST _search takes a {_FORM} body", code="not-supported-media-type"
            )
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError as exc:
            raise InvalidInputError("the form body is not UTF-8") from exc
        return await _search(request, list(request.query_params.multi_items()) + form)

    @router.get("/fhir/Consent/_history")
    async def type_history(request: Request) -> Response:
        raise HTTPException(405, "Consent history is read per Consent (Consent/{id}/_history)")

    @router.delete("/fhir/Consent/{cid}")
    async def delete(cid: str, request: Request) -> Response:
        raise HTTPException(
            405, "a Consent is not deleted: revoke it with a new version of status inactive"
        )

    async def _readable(caller: object | None, read: ReadConsent) -> ReadConsent:
        patient = read.entry.leaf.patient
        if patient is not None:
            service.check_caller(caller, patient)
        elif isinstance(caller, Caller) and caller.kind == "patient":
            raise ForbiddenError(
                "a patient token reaches only that patient's own consents", reason="patient"
            )
        return read

    def _read_response(read: ReadConsent) -> Response:
        return fhir_response(
            read.resource,
            headers={
                "ETag": f'W/"{read.entry.leaf.version}"',
                "X-Ledger-Leaf-Index": str(read.entry.leaf_index),
                "X-Ledger-Root": b64(gw.ledger.root()),
            },
        )

    @router.get("/fhir/Consent/{cid}")
    async def read(cid: str, request: Request) -> Response:
        found = await service.read(cid)
        return _read_response(await _readable(request.state.caller, found))

    @router.get("/fhir/Consent/{cid}/_history/{vid}")
    async def vread(cid: str, vid: str, request: Request) -> Response:
        if not vid.isdigit() or int(vid) < 1:
            raise NotFoundError(f"Consent/{cid[:64]} has no version {vid[:20]!r}")
        found = await service.read(cid, int(vid))
        return _read_response(await _readable(request.state.caller, found))

    @router.get("/fhir/Consent/{cid}/_history")
    async def history(cid: str, request: Request) -> Response:
        versions = await service.history(cid)
        if versions:
            await _readable(request.state.caller, versions[0])
        entries = []
        for v in versions:
            leaf = v.entry.leaf
            entries.append(
                {
                    "fullUrl": f"{str(request.base_url).rstrip('/')}/fhir/Consent/{cid}",
                    "resource": v.resource,
                    "request": {
                        "method": "POST" if leaf.version == 1 else "PUT",
                        "url": "Consent" if leaf.version == 1 else f"Consent/{cid}",
                    },
                    "response": {
                        "status": "201 Created" if leaf.version == 1 else "200 OK",
                        "etag": f'W/"{leaf.version}"',
                        "lastModified": leaf.time,
                        "extension": [_receipt_of(gw, v)],
                    },
                }
            )
        return fhir_response({"resourceType": "Bundle", "type": "history", "entry": entries})

    @router.get("/consent/$explain")
    async def explain(request: Request) -> Response:
        params = list(request.query_params.multi_items())
        caller = request.state.caller
        patient = _patient_param(service, caller, params)
        query = explain_query(params, institution=gw.settings.institution, at=datetime.now(UTC))
        if patient is None:
            raise NotFoundError("no such Patient on this gateway")
        await service.fresh()
        compiled = await service.policy_for(patient)
        decision = compiled.policy.evaluate(query)
        return fhir_response(
            {
                "consentVersion": compiled.version,
                "consents": list(compiled.policy.consent_ids),
                "inactive": list(compiled.policy.inactive_ids),
                "decision": _decision_json(decision),
                "matches": [
                    {
                        "consent": m.consent_id,
                        "path": m.path,
                        "type": m.type,
                        "specificity": m.specificity,
                        "elements": list(m.elements),
                    }
                    for m in decision.matches
                ],
            }
        )

    return router
