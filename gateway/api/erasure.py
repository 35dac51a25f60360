"""``POST /fhir/Patient/{pid}/$erase``: a patient's erasure request (gateway/erasure.py).

Thin: resolves the Patient to its pseudonym, keeps a patient token to its own record (403 for
any other, as for reads), asks the erasure service, and answers with a
``Parameters`` resource: the restriction's ledger receipt, what was crypto-shredded now, how
many records are retained and until when the earliest of them is kept, and whether the
patient's key was destroyed. Raises NotFoundError, ForbiddenError, BackendError, LedgerError.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.common import fhir_response
from gateway.auth.caller import Caller
from gateway.auth.policy import check_patient
from gateway.erasure import ErasureResult
from gateway.errors import NotFoundError
from gateway.fhir import receipt_extension
from gateway.runtime import Gateway


def erasure_parameters(gw: Gateway, result: ErasureResult) -> dict[str, Any]:
    """The answer to an erasure request, as a FHIR ``Parameters`` resource. Raises
    LedgerError."""
    latest = gw.ledger.latest
    assert latest is not None  # the restriction is on the ledger
    size = latest.checkpoint.size
    receipt = receipt_extension(
        leaf_index=result.restrict_leaf,
        tree_size=size,
        root=latest.checkpoint.root,
        proof=gw.ledger.inclusion_proof(result.restrict_leaf, size),
        checkpoint=latest.to_bytes(),
        cid=None,
    )
    shred = result.shred
    params: list[dict[str, Any]] = [
        {"name": "restricted", "valueBoolean": True},
        {"name": "newlyRestricted", "valueBoolean": result.newly_restricted},
        {"name": "receipt", "valueUnsignedInt": result.restrict_leaf, "extension": [receipt]},
    ]
    params += [{"name": "shredded", "valueString": name} for name in shred.shredded]
    params.append({"name": "retained", "valueUnsignedInt": shred.retained})
    if shred.next_due is not None:
        until = shred.next_due.strftime("%Y-%m-%dT%H:%M:%SZ")
        params.append({"name": "retainedUntil", "valueDateTime": until})
    params.append({"name": "keyDestroyed", "valueBoolean": bool(shred.keks_destroyed)})
    return {"resourceType": "Parameters", "parameter": params}


def build_router(gw: Gateway) -> APIRouter:
    """The erasure route."""
    router = APIRouter(prefix="/fhir")

    @router.post("/Patient/{pid}/$erase")
    async def erase(pid: str, request: Request) -> Response:
        patient = gw.records.patient_of("Patient", pid)
        caller = request.state.caller
        if isinstance(caller, Caller) and caller.kind == "patient":
            # A patient token reaches only its own record (403, as for its reads).
            check_patient(caller, patient or "", tuple(gw.index.links.all_of(patient or "")))
        if patient is None:
            raise NotFoundError(f"Patient/{pid} is not known")
        result = await gw.erasure.erase(patient)
        return fhir_response(erasure_parameters(gw, result))

    return router
