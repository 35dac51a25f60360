"""ORM^O01, OML^O21 and OMI^O23 orders -> ServiceRequest per ORC/OBR, Specimen per SPM
(OML) and, for imaging orders from a RIS/PACS carrying a Study Instance UID (ZDS-1 or
IPC-3), a registered ImagingStudy based on the ServiceRequest.

Raises :class:`mappings.errors.MessageContentError` for a missing patient identifier (101)
or malformed values (102), and under ``strict_codes`` for unmapped codes (103).
"""

from __future__ import annotations

from mappings.errors import MessageContentError
from mappings.imaging import DICOM_MODALITIES, imaging_study
from mappings.v2 import datatypes as dt
from mappings.v2.common import Context, JsonDict, group_after
from mappings.v2.oru import specimen
from mappings.v2.parse import Segment

__all__ = ["convert_orm", "order_status"]

_CONTROL_STATUS = {
    "NW": "active",
    "XO": "active",
    "CA": "revoked",
    "DC": "revoked",
    "OC": "revoked",
    "CR": "revoked",
    "HD": "on-hold",
    "OH": "on-hold",
    "RL": "active",
}
_ORDER_STATUS = {
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
_PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}


def order_status(control: str, status: str) -> str:
    """ORC-5 (table 0038) if sent, else ORC-1 (table 0119) -> ServiceRequest.status."""
    return _ORDER_STATUS.get(status.upper()) or _CONTROL_STATUS.get(control.upper(), "unknown")


def convert_orm(ctx: Context) -> None:
    """Convert an ORM/OML/OMI message into ``ctx.resources``."""
    msg = ctx.msg
    pids = msg.all("PID")
    if len(pids) > 1:
        raise MessageContentError(
            "more than one patient in one message is not supported",
            hl7_code="207",
            segment="PID",
            segment_index=2,
        )
    ctx.organization()
    ctx.patient(pids[0] if pids else None)
    ctx.encounter(msg.first("PV1"))
    anchors = msg.all("ORC") or msg.all("OBR")
    if not anchors:
        raise MessageContentError("no ORC or OBR segment in the order", segment="ORC")
    for position, anchor in enumerate(anchors, 1):
        orc = anchor if anchor.name == "ORC" else None
        group = group_after(
            msg, anchor, {"OBR", "SPM", "NTE", "ZDS", "IPC", "TQ1", "DG1"}, {anchor.name}
        )
        obr = anchor if anchor.name == "OBR" else next((s for s in group if s.name == "OBR"), None)
        _order(ctx, orc, obr, group, position)


def _order(
    ctx: Context, orc: Segment | None, obr: Segment | None, group: list[Segment], position: int
) -> None:
    identifiers: list[JsonDict] = []
    for n, kind, type_code in ((2, "placer-order", "PLAC"), (3, "filler-order", "FILL")):
        rep = (orc.rep(n) if orc is not None else None) or (obr.rep(n) if obr is not None else None)
        ident = dt.ei_identifier(
            rep, facility=ctx.facility, systems=ctx.systems, kind=kind, type_code=type_code
        )
        if ident:
            identifiers.append(ident)
    key = (
        (identifiers[0]["system"], identifiers[0]["value"])
        if identifiers
        else (ctx.patient_ref or "", ctx.msg.control_id, str(position))
    )
    sr: JsonDict = {"resourceType": "ServiceRequest", "id": ctx.id("ServiceRequest", *key)}
    if identifiers:
        sr["identifier"] = identifiers
    if orc is not None and orc.rep(4):
        group_id = dt.ei_identifier(
            orc.rep(4), facility=ctx.facility, systems=ctx.systems, kind="placer-group"
        )
        if group_id:
            sr["requisition"] = group_id
    sr["status"] = order_status(orc.text(1) if orc else "NW", orc.text(5) if orc else "")
    sr["intent"] = "order"
    tq1 = next((s for s in group if s.name == "TQ1"), None)
    priority = (
        (tq1.text(9) if tq1 else "")
        or (orc.text(7, 6) if orc else "")
        or (obr.text(27, 6) if obr else "")
    )
    if priority.upper() in _PRIORITY:
        sr["priority"] = _PRIORITY[priority.upper()]
    code = ctx.concept(obr, 4, clinical=True) if obr is not None else None
    if code:
        sr["code"] = code
    ctx.subject(sr)
    occurrence = (
        (ctx.datetime(tq1, 7) if tq1 else None)
        or (ctx.datetime(orc, 7, 4) if orc else None)
        or (ctx.datetime(obr, 27, 4) if obr else None)
        or (ctx.datetime(obr, 6) if obr else None)
    )
    if occurrence:
        sr["occurrenceDateTime"] = occurrence
    authored = ctx.datetime(orc, 9) if orc is not None else None
    if authored:
        sr["authoredOn"] = authored
    requester = (ctx.practitioner(orc, 12) if orc else None) or (
        ctx.practitioner(obr, 16) if obr else None
    )
    if requester:
        sr["requester"] = requester
    if obr is not None:
        reasons = [c for r in obr.reps(31) if (c := ctx.concept(obr, 31, rep=r))]
        if reasons:
            sr["reasonCode"] = reasons
    specimens = [specimen(ctx, s) for s in group if s.name == "SPM"]
    if specimens:
        sr["specimen"] = [{"reference": r} for r in specimens]
    notes = ctx.notes([s for s in group if s.name == "NTE"])
    if notes:
        sr["note"] = notes
    sr_ref = ctx.add(sr)
    ipc = next((s for s in group if s.name == "IPC"), None)
    zds = next((s for s in group if s.name == "ZDS"), None)
    study_uid = (ipc.text(3) if ipc else "") or (zds.text(1) if zds else "")
    if not study_uid:
        return
    modalities = []
    if ipc is not None and ipc.text(5):
        modalities.append(ipc.text(5).upper())
    elif obr is not None and obr.text(24).upper() in DICOM_MODALITIES:
        modalities.append(obr.text(24).upper())
    accession = (ipc.text(1) if ipc else "") or (obr.text(18) if obr else "")
    ctx.add(
        imaging_study(
            options=ctx.options,
            study_uid=study_uid,
            status="registered",
            patient_ref=ctx.patient_ref or "",
            accession=accession,
            accession_system=dt.facility_system(ctx.facility, "accession"),
            modalities=[m for m in modalities if m in DICOM_MODALITIES],
            started=occurrence,
            procedure=code,
            based_on=sr_ref,
        )
    )
