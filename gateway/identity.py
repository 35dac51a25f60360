"""Patient identity: the one place where a patient's identifiers become their pseudonym. Pure.

Every input path (FHIR REST, HL7 v2 in the conversion workers, DICOM JSON) calls
:func:`patient_identity`, so one person has one pseudonym, and so one key-encryption key,
across the whole alliance:

- when the alliance's master identifier (``master_id_system``, e.g. the resident health card
  number) is among the identifiers, the pseudonym is ``HMAC(key, master_system|value)``,
  whoever sent it;
- otherwise the pseudonym is *provisional*: the HMAC of the first identifier under its own
  system; an identifier that carries no system (no assigning authority) is scoped by the
  sending facility (:func:`identifier_system`), since its value means something only there.
  The sender's profile decides whether such a record is accepted at all
  (``SenderProfile.missing_master_id``);
- the pseudonyms of the patient's other identifiers are returned as ``aliases``: when a
  provisional pseudonym already holds records and the master identifier arrives later (an A08
  that adds it, an A40 merge, a FHIR ``Patient.link``), the record service anchors a ``link``
  leaf from the alias to the pseudonym, and reads, consent and erasure cover both from then on
  (:class:`gateway.views.PatientLinks`).

Records that belong to no patient (an Organization, a Practitioner) are filed under the
institution's own pseudonym (:func:`institution_pseudonym`).

Raises :class:`gateway.errors.InvalidInputError` (code ``processing``) for a patient with no
usable identifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.crypto import pseudonym
from gateway.errors import InvalidInputError
from mappings.v2.datatypes import facility_system

#: The system under which an institution's own pseudonym is computed.
INSTITUTION_SYSTEM = "urn:alliance:institution"


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """Who a record belongs to: the pseudonym, whether it is provisional (no master
    identifier was given), and the pseudonyms of the patient's other identifiers."""

    pseudonym: str
    provisional: bool
    aliases: tuple[str, ...] = ()


def identifier_system(system: str | None, *, facility: str) -> str:
    """The system an identifier is pseudonymised under: its own, or, when it carries no
    assigning authority, the sending facility's (the value means something only there)."""
    return system if system else facility_system(facility)


def institution_pseudonym(key: bytes, institution: str) -> str:
    """The pseudonym records that belong to no patient (an Organization) are filed under."""
    return pseudonym(key, INSTITUTION_SYSTEM, institution)


def patient_identity(
    key: bytes,
    identifiers: Iterable[tuple[str | None, str]],
    *,
    master_system: str | None,
    facility: str,
    master: tuple[str, str] | None = None,
) -> PatientIdentity:
    """The identity of a patient known by ``identifiers`` ((system or None, value) pairs, the
    sender's preferred first) as sent by ``facility``.

    ``master`` names the master identifier when the caller recognised it by other means
    (an HL7 assigning authority whose name is the master system). Raises InvalidInputError
    when no identifier has a value.
    """
    pairs: list[tuple[str, str]] = []
    for system, value in identifiers:
        if not value:
            continue
        pair = (identifier_system(system, facility=facility), str(value))
        if pair not in pairs:
            pairs.append(pair)
    if master is None and master_system:
        master = next(((s, v) for s, v in pairs if s == master_system), None)
    if master is not None:
        master = (master_system or master[0], master[1])
        chosen, provisional = master, False
    elif pairs:
        chosen, provisional = pairs[0], True
    else:
        raise InvalidInputError(
            "the patient has no identifier with a value", location="Patient.identifier"
        )
    main = pseudonym(key, *chosen)
    aliases = tuple(
        dict.fromkeys(
            p for pair in pairs if pair != chosen and (p := pseudonym(key, *pair)) != main
        )
    )
    return PatientIdentity(main, provisional, aliases)


def fhir_identifiers(resource: dict[str, Any]) -> list[tuple[str | None, str]]:
    """The (system, value) pairs of a FHIR Patient's (or Reference's) ``identifier``."""
    raw = resource.get("identifier")
    items = raw if isinstance(raw, list) else [raw] if isinstance(raw, dict) else []
    out: list[tuple[str | None, str]] = []
    for ident in items:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
            system = ident.get("system")
            out.append((system if isinstance(system, str) and system else None, ident["value"]))
    return out
