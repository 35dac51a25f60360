"""ADT (A01 admit, A03 discharge, A04 register, A08 update, A28 add person, A31 update
person) -> Organization, Patient, Encounter (PV1) and Condition (DG1).

An A08/A31 maps to the same resource ids as the A01/A28 it updates, so it replaces them.
Raises :class:`mappings.errors.MessageContentError` (see :mod:`mappings.v2.common`).
"""

from __future__ import annotations

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
}

_DIAGNOSIS_STATUS = {"F": "confirmed", "W": "provisional", "A": "provisional"}


def convert_adt(ctx: Context) -> None:
    """Convert an ADT message into ``ctx.resources``."""
    msg = ctx.msg
    ctx.organization()
    ctx.patient(msg.first("PID"))
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
