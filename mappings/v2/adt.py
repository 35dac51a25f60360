"""ADT (A01 admit, A03 discharge, A04 register, A08 update, A28 add person, A31 update
person, A40 merge patient) -> Organization, Patient, Encounter (PV1) and Condition (DG1).

An A08/A31 maps to the same resource ids as the A01/A28 it updates, so it replaces them. An
A40 merges the patient named by MRG-1 into the one of PID: the surviving Patient gets
``link: [{other: Patient/<prior id>, type: replaces}]``, the prior id computed from MRG-1
exactly as any PID's, and the prior identifiers are returned as
``ConversionResult.prior_identifiers``.
Raises :class:`mappings.errors.MessageContentError` (see :mod:`mappings.v2.common`; an A40
without MRG: 101 at MRG-1, with more than one patient group: 207).
"""

from __future__ import annotations

from mappings.errors import MessageContentError
from mappings.v2.common import Context, JsonDict

__all__ = ["EVENTS", "convert_adt"]

#: Supported ADT events -> Encounter status they imply (``None``: from PV1 times).
EVENTS: dict[str, str | None] = {
    "A01": "in-progress",
    "A03": "finished",
    "A04": "arrived",
    "A08": None,
    "A28": None,
    "A31": None,
    "A40": None,
}

_DIAGNOSIS_STATUS = {"F": "confirmed", "W": "provisional", "A": "provisional"}


def convert_adt(ctx: Context) -> None:
    """Convert an ADT message into ``ctx.resources``."""
    msg = ctx.msg
    ctx.organization()
    patient_ref = ctx.patient(msg.first("PID"))
    if msg.event == "A40":
        _merge(ctx, patient_ref)
    status = EVENTS.get(msg.event)
    pv1 = msg.first("PV1")
    if msg.event == "A01" and pv1 is not None and pv1.text(45):
        status = "finished"
    encounter = ctx.encounter(pv1, status=status)
    diagnoses: list[JsonDict] = []
    for dg1 in msg.all("DG1"):
        code = ctx.concept(dg1, 3, clinical=True)
        if code is None:
            code = {"text": dg1.text(4)} if dg1.text(4) else None
        if code is None:
            continue
        key = dg1.text(3) or dg1.text(4)
        cond: JsonDict = {
            "resourceType": "Condition",
            "id": ctx.id("Condition", encounter or ctx.patient_ref or "", dg1.text(1), key),
        }
        verification = _DIAGNOSIS_STATUS.get(dg1.text(6).upper())
        if verification:
            cond["verificationStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": verification,
                    }
                ]
            }
        cond["category"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "encounter-diagnosis",
                    }
                ]
            }
        ]
        cond["code"] = code
        ctx.subject(cond)
        recorded = ctx.datetime(dg1, 5)
        if recorded:
            cond["recordedDate"] = recorded
        ref = ctx.add(cond)
        diagnoses.append({"condition": {"reference": ref}})
    if encounter and diagnoses:
        for res in ctx.resources:
            if f"Encounter/{res['id']}" == encounter:
                res["diagnosis"] = diagnoses


def _merge(ctx: Context, patient_ref: str) -> None:
    """A40: link the surviving Patient to the prior one named by MRG-1."""
    msg = ctx.msg
    if len(msg.all("PID")) > 1 or len(msg.all("MRG")) > 1:
        raise MessageContentError(
            "more than one patient merge in one message", hl7_code="207", segment="PID"
        )
    mrg = msg.first("MRG")
    if mrg is None:
        raise MessageContentError(
            "MRG segment is missing (A40)", segment="MRG", segment_index=1, field=1
        )
    prior = f"Patient/{ctx.prior_patient(mrg)}"
    if prior == patient_ref:
        return  # MRG names the surviving patient itself: nothing to link
    for resource in ctx.resources:
        if f"{resource['resourceType']}/{resource['id']}" == patient_ref:
            resource["link"] = [{"other": {"reference": prior}, "type": "replaces"}]
