"""SIU^S12 (new appointment booking) -> Appointment with the patient, resources (AIG),
locations (AIL) and personnel (AIP) as participants.

Start and end come from SCH-11 (TQ, v2.3-2.5), TQ1-7/8, or AIS-4 plus its duration;
a booked Appointment must have both (FHIR invariant app-3).

``Appointment.appointmentType`` (SCH-8) is bound by FHIR R4 to v2 table 0276 (appointment
reason codes: ROUTINE, WALKIN, CHECKUP, FOLLOWUP, EMERGENCY). Senders often send those codes
in SCH-8 labelled with table 0277 (appointment type: Normal, Tentative, Complete), whose code
set is disjoint from 0276's: such a coding is put in table 0276, where its code is defined;
a real 0277 code stays in 0277.

Raises :class:`mappings.errors.MessageContentError` for a missing SCH (100), missing
appointment identifiers or times (101), malformed values (102).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from mappings.errors import MessageContentError
from mappings.v2 import datatypes as dt
from mappings.v2.common import Context, JsonDict
from mappings.v2.parse import Segment, comp

__all__ = ["convert_siu"]

_STATUS = {
    "BOOKED": "booked",
    "PENDING": "pending",
    "WAITLIST": "waitlist",
    "CANCELLED": "cancelled",
    "COMPLETE": "fulfilled",
    "NOSHOW": "noshow",
    "STARTED": "arrived",
    "OVERBOOK": "booked",
    "DELETED": "entered-in-error",
    "BLOCKED": "booked",
}
_V2_0276 = "http://terminology.hl7.org/CodeSystem/v2-0276"
_V2_0277 = "http://terminology.hl7.org/CodeSystem/v2-0277"
#: The codes of HL7 table 0276 (appointment reason codes), the table FHIR binds
#: Appointment.appointmentType to.
_TABLE_0276 = frozenset({"ROUTINE", "WALKIN", "CHECKUP", "FOLLOWUP", "EMERGENCY"})
_UNIT_MINUTES = {"MIN": 1, "M": 1, "S": 1 / 60, "SEC": 1 / 60, "H": 60, "HR": 60, "D": 1440}


def _add_minutes(instant: str, minutes: float) -> str:
    start = datetime.fromisoformat(instant)
    return (start + timedelta(minutes=minutes)).isoformat()


def _duration(seg: Segment, n_value: int, n_unit: int) -> float | None:
    value = seg.text(n_value)
    if not value:
        return None
    try:
        amount = float(value)
    except ValueError as exc:
        raise MessageContentError(
            "duration is not numeric",
            hl7_code="102",
            segment=seg.name,
            segment_index=seg.index,
            field=n_value,
        ) from exc
    unit = seg.text(n_unit, 1).upper() or "MIN"
    return amount * _UNIT_MINUTES.get(unit, 1)


def convert_siu(ctx: Context) -> None:
    """Convert an SIU^S12 message into ``ctx.resources``."""
    msg = ctx.msg
    sch = msg.first("SCH")
    if sch is None:
        raise MessageContentError("SCH segment is missing", hl7_code="100", segment="SCH")
    ctx.organization()
    ctx.patient(msg.first("PID"))
    ctx.encounter(msg.first("PV1"))
    identifiers: list[JsonDict] = []
    for n, kind, code in ((2, "filler-appointment", "FILL"), (1, "placer-appointment", "PLAC")):
        ident = dt.ei_identifier(
            sch.rep(n), facility=ctx.facility, systems=ctx.systems, kind=kind, type_code=code
        )
        if ident:
            identifiers.append(ident)
    if not identifiers:
        raise MessageContentError(
            "no appointment id (SCH-1 or SCH-2)", segment="SCH", segment_index=sch.index, field=2
        )
    tq1 = msg.first("TQ1")
    ais = msg.first("AIS")
    start = (
        ctx.instant(sch, 11, 4)
        or (ctx.instant(tq1, 7) if tq1 else None)
        or (ctx.instant(ais, 4) if ais else None)
    )
    end = ctx.instant(sch, 11, 5) or (ctx.instant(tq1, 8) if tq1 else None)
    if start is None:
        raise MessageContentError(
            "appointment start time is missing", segment="SCH", segment_index=sch.index, field=11
        )
    if end is None:
        minutes = _duration(sch, 9, 10) or (_duration(ais, 7, 8) if ais else None)
        if minutes is None:
            raise MessageContentError(
                "appointment end time or duration is missing",
                segment="SCH",
                segment_index=sch.index,
                field=9,
            )
        end = _add_minutes(start, minutes)
    appt: JsonDict = {
        "resourceType": "Appointment",
        "id": ctx.id("Appointment", identifiers[0]["system"], identifiers[0]["value"]),
        "identifier": identifiers,
        "status": _STATUS.get(sch.text(25).upper(), "booked"),
    }
    reason = ctx.concept(sch, 6)
    if reason:
        appt["cancelationReason"] = reason if appt["status"] == "cancelled" else None
        if appt["cancelationReason"] is None:
            del appt["cancelationReason"]
    service = ctx.concept(ais, 3, clinical=True) if ais else None
    if service:
        appt["serviceType"] = [service]
    appt_type = ctx.concept(sch, 8)
    if appt_type:
        for coding in appt_type.get("coding", ()):
            if coding["system"] == _V2_0277 and coding["code"] in _TABLE_0276:
                coding["system"] = _V2_0276
        appt["appointmentType"] = appt_type
    appt_reason = ctx.concept(sch, 7)
    if appt_reason:
        appt["reasonCode"] = [appt_reason]
        if appt_reason.get("text"):
            appt["description"] = appt_reason["text"]
    appt["start"] = start
    appt["end"] = end
    minutes = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() / 60
    if minutes >= 1 and minutes == int(minutes):
        appt["minutesDuration"] = int(minutes)
    notes = ctx.notes(msg.all("NTE"))
    if notes:
        appt["comment"] = "\n".join(n["text"] for n in notes)
    participants: list[JsonDict] = [
        {"actor": {"reference": ctx.patient_ref}, "required": "required", "status": "accepted"}
    ]
    for aip in msg.all("AIP"):
        actor = ctx.practitioner(aip, 3)
        if actor:
            participants.append({"actor": actor, "required": "required", "status": "accepted"})
    for ail in msg.all("AIL"):
        loc = ail.rep(3)
        if loc:
            display = " / ".join(p for p in (comp(loc, 4), comp(loc, 1), comp(loc, 2)) if p)
            if display:
                participants.append(
                    {"actor": {"display": display}, "required": "required", "status": "accepted"}
                )
    for aig in msg.all("AIG"):
        resource = ctx.concept(aig, 3)
        if resource and resource.get("text"):
            participants.append(
                {
                    "actor": {"display": resource["text"]},
                    "required": "required",
                    "status": "accepted",
                }
            )
    appt["participant"] = participants
    ctx.add(appt)
