"""Who may call which route: one table, deny by default. Pure except for the metric.

:data:`ROUTES` maps every route of the app (method and path template, as FastAPI matched it) to
a :class:`Rule`. A route missing from the table is refused with 403 for everyone
(tests/gateway/test_authz_routes.py fails when a route is added without an entry).
:func:`authorize` applies a rule to a :class:`Caller` and the route's path parameters;
:func:`authorize_entry` is the per-entry check of a transaction Bundle (a ``Bundle`` scope alone
authorises nothing inside it). :class:`CallerPolicy` is the record-level seam of today's routers
(``gw.policy``): it keeps a patient token on that patient's own records.

Rules (``kind``):

- ``public``: no token (metadata, SMART configuration, token endpoint, health).
- ``fhir``: the FHIR type is the ``rtype`` path parameter; GET needs ``r``, POST ``c``, PUT
  ``u``; reads need a purpose of use; writes need a system client of this institution.
- ``transaction``: any authenticated caller of this institution with a purpose-free write right;
  each entry is then checked by :func:`authorize_entry`.
- ``hl7``: a system client (or the loopback sender) of this institution allowed to create every
  type (``system/*.c``): an HL7 v2 message becomes resources of many types.
- ``imaging``: ``ImagingStudy`` create, this institution.
- ``ledger``: a system client of any member institution (the ledger holds no patient data; its
  proofs serve every member's audit).
- ``witness``: another member's gateway client only.
- ``portal``: a portal client of this institution (asks for patient tokens).
- ``terminology``: read (``r``) on the rule's resource type (ConceptMap, CodeSystem,
  ValueSet); no purpose of use (the dictionary holds no patient data).
- ``search``: search (``s``) on the ``rtype`` path parameter's type (or the rule's type, for
  ``Patient/$everything``), with a purpose of use; what it returns is filtered by the access
  seam and each record checked as a read.
- ``curator``: a system client of this institution allowed to update ConceptMaps
  (``system/ConceptMap.u``): the curation queue of unmapped codes.
- ``consent``: the Consent routes (gateway/api/consent.py); the interaction is the rule's
  (``c``, ``u``, ``r``, ``s``, ``d``, ``h`` for the type history) or the method's. A patient
  token needs a ``patient/Consent`` scope with it (that it acts for its own patient only is
  checked by the consent service) and may not delete or list every consent; a system client
  needs a ``Consent`` scope of this institution, and a purpose of use to read.
- ``consent-explain``: ``GET /consent/$explain``: a patient token with ``patient/Consent.r``
  (its own patient only, checked by the route), or the privacy officer: a system client of
  this institution acting for a user with role :data:`PRIVACY_OFFICER_ROLE` and
  ``system/Consent.r``.
- ``erase``: a patient's erasure request (``POST /fhir/Patient/{pid}/$erase``): the patient's
  own token (the route checks that ``pid`` is that patient), or the administrator: a system
  client of this institution with ``system/Patient.d`` that selected the purpose of use
  ``HLEGAL`` (the request is processed as a legal obligation).
- ``access-log``: the access history (``GET /fhir/AuditEvent``), ``r`` on ``AuditEvent``: a
  patient token (the route then answers only for that patient, every linked pseudonym) or
  the privacy officer.
- ``privacy``: the privacy officer only (the break-glass review queue): a system client of
  this institution whose token names a user with role :data:`PRIVACY_OFFICER_ROLE`, with
  ``r`` on ``AuditEvent``.

Raises :class:`gateway.auth.errors.ForbiddenError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.auth.caller import Caller
from gateway.auth.errors import ForbiddenError

RuleKind = Literal[
    "public",
    "fhir",
    "transaction",
    "hl7",
    "imaging",
    "ledger",
    "witness",
    "portal",
    "terminology",
    "curator",
    "search",
    "consent",
    "consent-explain",
    "erase",
    "access-log",
    "privacy",
]

#: The staff role (IHE IUA ``subject_role``, registered for the client) of the privacy officer,
#: who may ask ``GET /consent/$explain`` about any patient, reads every patient's access
#: history and reviews break-glass accesses.
PRIVACY_OFFICER_ROLE = "privacy-officer"


@dataclass(frozen=True, slots=True)
class Rule:
    """What a route needs; ``resource_type`` for routes whose path names no type;
    ``interaction`` when it is not the method's (``consent`` routes)."""

    kind: RuleKind
    resource_type: str = ""
    interaction: str = ""


PUBLIC = Rule("public")

#: (method, path template) -> rule. Every route of the app must be here.
ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    # Prometheus scrapes without tokens; the metrics hold counts and latencies by route
    # template, never ids or patient data. Keep the port off the public network.
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/fhir/metadata"): PUBLIC,
    ("GET", "/.well-known/smart-configuration"): PUBLIC,
    ("POST", "/auth/token"): PUBLIC,
    ("POST", "/auth/patient-token"): Rule("portal"),
    ("POST", "/fhir"): Rule("transaction"),
    ("POST", "/fhir/{rtype}"): Rule("fhir"),
    ("PUT", "/fhir/{rtype}/{rid}"): Rule("fhir"),
    ("PUT", "/fhir/{rtype}"): Rule("fhir"),  # conditional update (?identifier=...)
    ("GET", "/fhir/{rtype}/{rid}"): Rule("fhir"),
    ("DELETE", "/fhir/{rtype}/{rid}"): Rule("fhir"),
    ("GET", "/fhir/{rtype}/_history"): Rule("fhir"),
    ("GET", "/fhir/{rtype}/{rid}/_history"): Rule("fhir"),
    ("GET", "/fhir/{rtype}/{rid}/_history/{vid}"): Rule("fhir"),
    ("GET", "/fhir/ConceptMap/$translate"): Rule("terminology", "ConceptMap"),
    ("POST", "/fhir/ConceptMap/$translate"): Rule("terminology", "ConceptMap"),
    ("GET", "/fhir/ConceptMap"): Rule("terminology", "ConceptMap"),
    ("GET", "/fhir/CodeSystem/$lookup"): Rule("terminology", "CodeSystem"),
    ("POST", "/fhir/CodeSystem/$lookup"): Rule("terminology", "CodeSystem"),
    ("GET", "/fhir/CodeSystem"): Rule("terminology", "CodeSystem"),
    ("GET", "/fhir/ValueSet/$validate-code"): Rule("terminology", "ValueSet"),
    ("POST", "/fhir/ValueSet/$validate-code"): Rule("terminology", "ValueSet"),
    ("GET", "/fhir/ValueSet"): Rule("terminology", "ValueSet"),
    ("GET", "/dictionary/unmapped"): Rule("curator", "ConceptMap"),
    ("POST", "/fhir/Consent"): Rule("consent", "Consent", "c"),
    ("PUT", "/fhir/Consent/{cid}"): Rule("consent", "Consent", "u"),
    ("GET", "/fhir/Consent"): Rule("consent", "Consent", "s"),
    ("POST", "/fhir/Consent/_search"): Rule("consent", "Consent", "s"),
    ("GET", "/fhir/Consent/_history"): Rule("consent", "Consent", "h"),
    ("GET", "/fhir/Consent/{cid}"): Rule("consent", "Consent", "r"),
    ("GET", "/fhir/Consent/{cid}/_history"): Rule("consent", "Consent", "r"),
    ("GET", "/fhir/Consent/{cid}/_history/{vid}"): Rule("consent", "Consent", "r"),
    ("DELETE", "/fhir/Consent/{cid}"): Rule("consent", "Consent", "d"),
    ("GET", "/consent/$explain"): Rule("consent-explain", "Consent", "r"),
    ("GET", "/fhir/{rtype:fhirtype}"): Rule("search"),
    ("POST", "/fhir/{rtype:fhirtype}/_search"): Rule("search"),
    ("GET", "/fhir/Patient/{pid}/$everything"): Rule("search", "Patient"),
    ("POST", "/fhir/Patient/{pid}/$erase"): Rule("erase", "Patient"),
    ("POST", "/hl7v2"): Rule("hl7"),
    ("POST", "/imaging/studies"): Rule("imaging"),
    ("GET", "/ledger/checkpoint"): Rule("ledger"),
    ("GET", "/ledger/receipt"): Rule("ledger"),
    ("GET", "/ledger/witness"): Rule("ledger"),
    ("GET", "/ledger/witness/evidence"): Rule("ledger"),
    ("GET", "/ledger/proof/inclusion"): Rule("ledger"),
    ("GET", "/ledger/proof/consistency"): Rule("ledger"),
    ("GET", "/ledger/leaves"): Rule("ledger"),
    ("POST", "/ledger/witness"): Rule("witness"),
    ("GET", "/fhir/AuditEvent"): Rule("access-log"),
    ("GET", "/consent/break-glass"): Rule("privacy"),
    ("POST", "/consent/break-glass/{event}/reviewed"): Rule("privacy"),
}

#: Routes FastAPI itself serves (not API routes): the OpenAPI description is public (it says
#: what the API is, not what it holds); the interactive docs are off in production.
FRAMEWORK_ROUTES = ("/openapi.json", "/docs", "/docs/oauth2-redirect")

#: The purpose of use an administrator's erasure request must select.
ERASE_PURPOSE = "HLEGAL"

INTERACTIONS = {"GET": "r", "POST": "c", "PUT": "u", "DELETE": "d"}


def rule_for(method: str, template: str) -> Rule | None:
    """The rule of a route, or None (refused)."""
    return ROUTES.get((method, template))


def _refuse(message: str, reason: str) -> ForbiddenError:
    return ForbiddenError(message, reason=reason)


def _own_institution(caller: Caller, institution: str, what: str) -> None:
    if caller.institution != institution:
        raise _refuse(
            f"client {caller.client_id} of {caller.institution} may not {what} at {institution}",
            "institution",
        )


def _system(caller: Caller, what: str) -> None:
    if caller.kind == "patient":
        raise _refuse(f"a patient token may not {what}", "patient-scope")


def authorize(
    caller: Caller, rule: Rule, path_params: Mapping[str, str], method: str, *, institution: str
) -> None:
    """Refuse unless ``caller`` may call a route with ``rule``. Raises ForbiddenError with
    reason ``scope``, ``purpose``, ``institution``, ``patient-scope``, ``gateway-only``."""
    kind = rule.kind
    if kind == "public":
        return
    if kind == "fhir":
        rtype = str(path_params.get("rtype", ""))
        interaction = INTERACTIONS.get(method, "?")
        authorize_entry(caller, rtype, interaction, institution=institution)
        if interaction == "r" and caller.purpose is None:
            raise _refuse(
                "no purpose of use selected: send X-Purpose-Of-Use with one of the token's",
                "purpose",
            )
        return
    if kind == "transaction":
        _system(caller, "send a transaction")
        _own_institution(caller, institution, "write")
        if not any(("c" in s.permissions or "u" in s.permissions) for s in caller.scopes):
            raise _refuse(f"client {caller.client_id} has no write scope", "scope")
        return
    if kind == "hl7":
        _system(caller, "send HL7 v2")
        _own_institution(caller, institution, "send HL7 v2")
        if not caller.allows("*", "c"):
            raise _refuse(
                f"client {caller.client_id} needs system/*.c to send HL7 v2 (a message becomes "
                "resources of many types)",
                "scope",
            )
        return
    if kind == "imaging":
        authorize_entry(caller, "ImagingStudy", "c", institution=institution)
        return
    if kind == "ledger":
        _system(caller, "read the ledger")
        return
    if kind == "witness":
        if caller.kind != "system" or not caller.gateway:
            raise _refuse("only another member's gateway may ask this witness", "gateway-only")
        if caller.institution == institution:
            raise _refuse("a gateway does not witness its own institution", "gateway-only")
        return
    if kind == "portal":
        _system(caller, "ask for patient tokens")
        _own_institution(caller, institution, "ask for patient tokens")
        return
    if kind == "terminology":
        authorize_entry(caller, rule.resource_type, "r")
        return
    if kind == "search":
        rtype = rule.resource_type or str(path_params.get("rtype", ""))
        authorize_entry(caller, rtype, "s")
        if caller.purpose is None:
            raise _refuse(
                "no purpose of use selected: send X-Purpose-Of-Use with one of the token's",
                "purpose",
            )
        return
    if kind == "curator":
        authorize_entry(caller, rule.resource_type, "u", institution=institution)
        return
    if kind == "consent":
        _authorize_consent(caller, rule.interaction or INTERACTIONS.get(method, "?"), institution)
        return
    if kind == "consent-explain":
        if caller.kind == "patient":
            if not caller.allows("Consent", "r"):
                raise _refuse("a patient token needs patient/Consent.r", "scope")
            return
        _own_institution(caller, institution, "explain consents")
        if caller.role != PRIVACY_OFFICER_ROLE:
            raise _refuse(
                f"only the patient or the privacy officer (role {PRIVACY_OFFICER_ROLE}) may "
                "ask why consents permit or deny",
                "role",
            )
        authorize_entry(caller, "Consent", "r", institution=institution)
        return
    if kind == "erase":
        if caller.kind == "patient":
            return  # its own record only: the route resolves pid and compares
        _own_institution(caller, institution, "ask for an erasure")
        if not caller.allows(rule.resource_type, "d"):
            raise _refuse(
                f"client {caller.client_id} needs system/Patient.d to ask for an erasure", "scope"
            )
        if caller.purpose != ERASE_PURPOSE:
            raise _refuse(
                f"an erasure on the patient's behalf needs purpose of use {ERASE_PURPOSE}",
                "purpose",
            )
        return
    if kind == "access-log":
        if caller.kind == "patient" and caller.patient:
            authorize_entry(caller, "AuditEvent", "r")
            return
        require_privacy_officer(caller, institution)
        authorize_entry(caller, "AuditEvent", "r", institution=institution)
        return
    if kind == "privacy":
        require_privacy_officer(caller, institution)
        authorize_entry(caller, "AuditEvent", "r", institution=institution)
        return
    raise _refuse(f"no rule {kind}", "no-rule")


def _authorize_consent(caller: Caller, interaction: str, institution: str) -> None:
    """The ``consent`` rule (see the module docstring). Raises ForbiddenError."""
    if caller.kind == "patient":
        if interaction in ("d", "h"):
            raise _refuse(
                "a patient token may not delete or list every Consent (revoke with status "
                "inactive)",
                "patient-scope",
            )
        if not caller.allows("Consent", interaction):
            raise _refuse(f"a patient token needs patient/Consent.{interaction}", "scope")
        return
    authorize_entry(caller, "Consent", "r" if interaction == "h" else interaction)
    _own_institution(caller, institution, "act on consents")
    if interaction in ("r", "s", "h") and caller.purpose is None:
        raise _refuse(
            "no purpose of use selected: send X-Purpose-Of-Use with one of the token's",
            "purpose",
        )


def authorize_entry(
    caller: Caller, resource_type: str, interaction: str, *, institution: str | None = None
) -> None:
    """Refuse unless ``caller`` may do ``interaction`` (``r``, ``c``, ``u``, ``d``, ``s``, or
    the HTTP method of a Bundle entry: GET, POST, PUT, DELETE) on ``resource_type``: one entry
    of a transaction, or one route. Writes (``c``, ``u``, ``d``)
    need a system client of ``institution`` (when given). A request that only a constrained
    scope would allow is refused: the content is checked by the record service.

    Raises ForbiddenError (reasons ``scope``, ``scope-constrained``, ``institution``,
    ``patient-scope``).
    """
    interaction = INTERACTIONS.get(interaction, interaction)
    writing = interaction in ("c", "u", "d")
    if writing:
        _system(caller, f"write {resource_type}")
        if institution is not None:
            _own_institution(caller, institution, "write")
    if resource_type == "Bundle" or not resource_type:
        raise _refuse("a Bundle scope authorises nothing inside it", "scope")
    if caller.allows(resource_type, interaction):
        return
    if caller.allows(resource_type, interaction, unconstrained=False):
        raise _refuse(
            f"only a constrained scope allows {interaction} on {resource_type}",
            "scope-constrained",
        )
    raise _refuse(
        f"client {caller.client_id} has no scope for {interaction} on {resource_type}", "scope"
    )


def is_privacy_officer(caller: Caller, institution: str) -> bool:
    """Whether ``caller`` is this institution's privacy officer: a system client of
    ``institution`` whose token names a user with role :data:`PRIVACY_OFFICER_ROLE`. Raises
    nothing."""
    return (
        caller.kind == "system"
        and caller.institution == institution
        and caller.user is not None
        and caller.role == PRIVACY_OFFICER_ROLE
    )


def require_privacy_officer(caller: Caller, institution: str) -> None:
    """Refuse anyone but this institution's privacy officer. Raises ForbiddenError (reason
    ``privacy-officer``)."""
    if not is_privacy_officer(caller, institution):
        raise _refuse(
            f"only the privacy officer of {institution} (a user with role "
            f"{PRIVACY_OFFICER_ROLE}) may do this",
            "privacy-officer",
        )


def check_patient(caller: Caller, patient: str, linked: tuple[str, ...] = ()) -> None:
    """Refuse a patient token reaching a record of another patient (``patient`` is the
    record's pseudonym, ``linked`` its other pseudonyms). Raises ForbiddenError."""
    if caller.kind == "patient" and caller.patient != patient and caller.patient not in linked:
        raise _refuse("a patient token reaches only that patient's own records", "patient")
