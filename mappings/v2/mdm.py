"""MDM^T02 (and T04, T06, T08, T10 which also carry the document) -> DocumentReference.

TXA describes the document; the OBX segments carry it: text (TX, FT, ST; one line per
repetition or OBX) becomes ``text/plain;charset=utf-8`` content, encapsulated data (ED,
e.g. a base64 PDF) its own attachment. The content sits in ``content.attachment.data``
(base64), so it travels in the encrypted payload.

Raises :class:`mappings.errors.MessageContentError` for a missing TXA (100), no document
content (101) or malformed values (102).
"""

from __future__ import annotations

import base64

from mappings.errors import MessageContentError
from mappings.v2 import datatypes as dt
from mappings.v2.common import Context, JsonDict
from mappings.v2.oru import ed_attachment, observation_value

__all__ = ["EVENTS", "convert_mdm"]

EVENTS = ("T02", "T04", "T06", "T08", "T10")

_DOC_STATUS = {
    "AU": "final",
    "LA": "final",
    "DI": "preliminary",
    "DO": "preliminary",
    "IN": "preliminary",
    "IP": "preliminary",
    "PA": "preliminary",
}
_AVAILABILITY = {"AV": "current", "CA": "entered-in-error", "OB": "superseded", "UN": "current"}
_CONFIDENTIALITY = {"V": "V", "R": "R", "U": "N", "N": "N", "L": "L", "M": "M"}


def convert_mdm(ctx: Context) -> None:
    """Convert an MDM message into ``ctx.resources``."""
    msg = ctx.msg
    txa = msg.first("TXA")
    if txa is None:
        raise MessageContentError("TXA segment is missing", hl7_code="100", segment="TXA")
    ctx.organization()
    ctx.patient(msg.first("PID"))
    ctx.encounter(msg.first("PV1"))
    unique = dt.ei_identifier(
        txa.rep(12), facility=ctx.facility, systems=ctx.systems, kind="document"
    )
    filler = dt.ei_identifier(
        txa.rep(15) or txa.rep(16),
        facility=ctx.facility,
        systems=ctx.systems,
        kind="filler-order",
        type_code="FILL",
    )
    key = (
        (unique["system"], unique["value"])
        if unique
        else (ctx.patient_ref or "", "control", msg.control_id)
    )
    lines: list[str] = []
    attachments: list[JsonDict] = []
    for obx in msg.all("OBX"):
        if obx.text(2).upper() == "ED":
            for rep in obx.reps(5):
                attachments.append(ctx.at(obx, 5, lambda rep=rep: ed_attachment(rep)))  # type: ignore[misc]
            continue
        value = observation_value(ctx, obx)
        if value is not None and isinstance(value[1], str):
            lines.append(value[1])
    if lines:
        attachments.insert(
            0,
            {
                "contentType": "text/plain;charset=utf-8",
                "data": base64.b64encode("\n".join(lines).encode("utf-8")).decode("ascii"),
            },
        )
    if not attachments:
        raise MessageContentError(
            "the document has no content (no OBX with a value)",
            segment="OBX",
        )
    doc: JsonDict = {"resourceType": "DocumentReference", "id": ctx.id("DocumentReference", *key)}
    if unique:
        doc["masterIdentifier"] = unique
    if filler:
        doc["identifier"] = [filler]
    doc["status"] = _AVAILABILITY.get(txa.text(19).upper(), "current")
    doc_status = _DOC_STATUS.get(txa.text(17).upper())
    if doc_status:
        doc["docStatus"] = doc_status
    doc_type = ctx.concept(txa, 2, clinical=True)
    if doc_type:
        doc["type"] = doc_type
    ctx.subject(doc, encounter_key="")
    date = ctx.instant(txa, 4) or ctx.instant(txa, 6)
    if date:
        doc["date"] = date
    authors = [
        a
        for r in txa.reps(9)
        if (a := dt.xcn_reference(r, facility=ctx.facility, systems=ctx.systems))
    ]
    if authors:
        doc["author"] = authors
    authenticator = ctx.practitioner(txa, 10) or ctx.practitioner(txa, 22)
    if authenticator:
        doc["authenticator"] = authenticator
    if ctx.organization_ref:
        doc["custodian"] = {"reference": ctx.organization_ref}
    title = doc_type.get("text") if doc_type else None
    for att in attachments:
        if title:
            att["title"] = title
    created = ctx.datetime(txa, 4)
    if created and attachments:
        attachments[0]["creation"] = created
    confidentiality = _CONFIDENTIALITY.get(txa.text(18).upper())
    if confidentiality:
        doc["securityLabel"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                        "code": confidentiality,
                    }
                ]
            }
        ]
    doc["content"] = [{"attachment": a} for a in attachments]
    if ctx.encounter_ref:
        doc["context"] = {"encounter": [{"reference": ctx.encounter_ref}]}
    ctx.add(doc)
