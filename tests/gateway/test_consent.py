"""Consent evaluation (gateway/consent.py): a decision table over actor, role, purpose, class,
code, period, dataPeriod, custodian, nested exceptions, security labels, revoked and expired
consents and break-glass; located validation errors; and a hypothesis property that a search
filter returns exactly the records ``evaluate`` permits. Pure unit tests: no services."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.consent import (
    ACT_CODE,
    ACT_REASON,
    ALL,
    CONFIDENTIALITY,
    CONSENT_ACTION,
    CONSENT_SCOPE,
    MAX_CONSENTS,
    MAX_DEPTH,
    MAX_PROVISIONS,
    NOTHING,
    PARTICIPATION_TYPE,
    RESOURCE_TYPES,
    AccessQuery,
    RecordMeta,
    compile_policy,
    default_consent,
)
from gateway.errors import InvalidInputError

LOINC = "http://loinc.org"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
GLUCOSE = f"{LOINC}|2345-7"
HBA1C = f"{LOINC}|4548-4"
HIV = f"{ACT_CODE}|HIV"
PSY = f"{ACT_CODE}|PSY"
NORMAL = f"{CONFIDENTIALITY}|N"
RESTRICTED = f"{CONFIDENTIALITY}|R"
NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)


# --- building blocks for consents -----------------------------------------------------------


def org(name: str) -> dict[str, Any]:
    """A requester actor: the institution ``name``."""
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
        "reference": {"reference": f"Organization/{name}"},
    }


def custodian(name: str) -> dict[str, Any]:
    """The custodian actor (role CST): records kept by ``name``."""
    return {
        "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "CST"}]},
        "reference": {"reference": f"Organization/{name}"},
    }


def purpose(*codes: str) -> list[dict[str, str]]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def classes(*types: str) -> list[dict[str, str]]:
    return [{"system": RESOURCE_TYPES, "code": t} for t in types]


def concept(*codes: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": c.split("|")[0], "code": c.split("|")[1]}]} for c in codes]


def labels(*codes: str) -> list[dict[str, str]]:
    return [{"system": c.split("|")[0], "code": c.split("|")[1]} for c in codes]


def consent(cid: str, provision: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "patient": {"reference": "Patient/p1"},
        "provision": provision,
        **extra,
    }


HOSP_TREAT = {"type": "permit", "actor": [org("hosp")], "purpose": purpose("TREAT")}
CONSENTS: dict[str, dict[str, Any]] = {
    "hosp-treat": consent("hosp-treat", HOSP_TREAT),
    "hosp-labs-of-clinic": consent(
        "hosp-labs-of-clinic",
        {
            "type": "permit",
            "actor": [org("hosp"), custodian("clinic")],
            "purpose": purpose("TREAT"),
            "class": classes("Observation", "DiagnosticReport"),
        },
    ),
    "dr-smith": consent(
        "dr-smith",
        {
            "type": "permit",
            "actor": [{"reference": {"reference": "Practitioner/dr-smith"}}],
            "purpose": purpose("TREAT"),
        },
    ),
    "hosp-nurses": consent(
        "hosp-nurses",
        {
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"system": ROLE, "code": "NURSE"}]},
                    "reference": {"reference": "Organization/hosp"},
                }
            ],
        },
    ),
    "uni-glucose": consent(
        "uni-glucose",
        {
            "type": "permit",
            "actor": [org("uni")],
            "purpose": purpose("HRESCH"),
            "code": concept(GLUCOSE),
        },
    ),
    "uni-2020-2022": consent(
        "uni-2020-2022",
        {
            "type": "permit",
            "actor": [org("uni")],
            "purpose": purpose("HRESCH"),
            "dataPeriod": {"start": "2020-01-01", "end": "2022-12-31"},
        },
    ),
    "hosp-emergency-only": consent(
        "hosp-emergency-only", {**HOSP_TREAT, "purpose": purpose("ETREAT")}
    ),
    "hosp-2020": consent(
        "hosp-2020", {**HOSP_TREAT, "period": {"start": "2020-01-01", "end": "2020-12-31"}}
    ),
    "hosp-revoked": consent("hosp-revoked", HOSP_TREAT, status="inactive"),
    "hosp-draft": consent("hosp-draft", HOSP_TREAT, status="draft"),
    "hosp-from-2030": consent("hosp-from-2030", HOSP_TREAT, dateTime="2030-01-01T00:00:00Z"),
    "hosp-no-meds": consent(
        "hosp-no-meds",
        {
            **HOSP_TREAT,
            "provision": [
                {
                    "type": "deny",
                    "class": classes("MedicationStatement"),
                    "provision": [{"type": "permit", "code": concept(HBA1C)}],
                }
            ],
        },
    ),
    "hosp-paused-2026h2": consent(
        "hosp-paused-2026h2",
        {**HOSP_TREAT, "provision": [{"period": {"start": "2026-07", "end": "2026-12"}}]},
    ),
    "deny-hosp": consent("deny-hosp", {"type": "deny", "actor": [org("hosp")]}),
    "deny-hosp-treat": consent("deny-hosp-treat", {**HOSP_TREAT, "type": "deny"}),
    "deny-hosp-obs": consent(
        "deny-hosp-obs", {**HOSP_TREAT, "type": "deny", "class": classes("Observation")}
    ),
    "deny-clinic-treat": consent(
        "deny-clinic-treat",
        {
            "type": "deny",
            "actor": [org("clinic"), custodian("clinic")],
            "purpose": purpose("TREAT"),
        },
    ),
    "hosp-hiv": consent("hosp-hiv", {**HOSP_TREAT, "securityLabel": labels(HIV)}),
    "hosp-restricted": consent(
        "hosp-restricted", {**HOSP_TREAT, "securityLabel": labels(RESTRICTED)}
    ),
    "hosp-access-only": consent(
        "hosp-access-only",
        {**HOSP_TREAT, "action": [{"coding": [{"system": CONSENT_ACTION, "code": "access"}]}]},
    ),
    "hosp-obs-but-glucose": consent(
        "hosp-obs-but-glucose",
        {
            "type": "permit",
            "actor": [org("hosp")],
            "provision": [
                {"type": "deny", "class": classes("Observation")},
                {"type": "permit", "code": concept(GLUCOSE)},
            ],
        },
    ),
}
DEFAULTS = [default_consent(i) for i in ("clinic", "psych", "hosp")]


# --- the decision table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    consents: tuple[str, ...]
    permitted: bool
    by: str | None = None  # the deciding consent id, when the case is about it
    path: str | None = None
    query: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    break_glass: bool = False
    defaults: bool = True


def q(**kw: Any) -> dict[str, Any]:
    return kw


GLASS = q(
    institution="hosp", purpose="ETREAT", break_glass_reason="unconscious", may_break_glass=True
)

CASES = [
    # the administrative default
    Case(
        "default: custodian reads own records for treatment",
        (),
        True,
        "default-clinic",
        query=q(institution="clinic"),
    ),
    Case(
        "default: custodian's emergency treatment is treatment",
        (),
        True,
        "default-clinic",
        query=q(institution="clinic", purpose="ETREAT"),
    ),
    Case(
        "default: custodian may not read for payment",
        (),
        False,
        query=q(institution="clinic", purpose="HPAYMT"),
    ),
    Case(
        "default: custodian reads its own sensitive records",
        (),
        True,
        "default-clinic",
        query=q(institution="clinic"),
        record=q(labels={PSY, RESTRICTED}),
    ),
    Case("default: another institution is denied", (), False),
    Case(
        "default: an institution cannot read another custodian's records",
        (),
        False,
        query=q(institution="clinic"),
        record=q(custodian="psych"),
    ),
    Case("no consent at all (not even the default) denies", (), False, defaults=False),
    # actor: organization, practitioner, role
    Case("actor organization permitted", ("hosp-treat",), True, "hosp-treat", "Consent.provision"),
    Case(
        "actor organization: another institution denied",
        ("hosp-treat",),
        False,
        query=q(institution="uni"),
    ),
    Case("actor practitioner permitted", ("dr-smith",), True, "dr-smith", query=q(user="dr-smith")),
    Case("actor practitioner: another user denied", ("dr-smith",), False, query=q(user="dr-jones")),
    Case("actor practitioner: an institution without a user denied", ("dr-smith",), False),
    Case(
        "actor role at an organization permitted",
        ("hosp-nurses",),
        True,
        "hosp-nurses",
        query=q(role=f"{ROLE}|NURSE"),
    ),
    Case("actor role: another role denied", ("hosp-nurses",), False, query=q(role=f"{ROLE}|PHYS")),
    Case("actor role: no role denied", ("hosp-nurses",), False),
    Case(
        "actor role: the role at another organization denied",
        ("hosp-nurses",),
        False,
        query=q(institution="uni", role=f"{ROLE}|NURSE"),
    ),
    # purpose
    Case("purpose mismatch denied", ("hosp-treat",), False, query=q(purpose="HPAYMT")),
    Case(
        "purpose TREAT covers ETREAT",
        ("hosp-treat",),
        True,
        "hosp-treat",
        query=q(purpose="ETREAT"),
    ),
    Case(
        "purpose HRESCH covers CLINTRCH",
        ("uni-glucose",),
        True,
        "uni-glucose",
        query=q(institution="uni", purpose="CLINTRCH"),
    ),
    Case(
        "purpose ETREAT does not cover TREAT",
        ("hosp-emergency-only",),
        False,
        query=q(purpose="TREAT"),
    ),
    Case(
        "purpose ETREAT permit used for ETREAT",
        ("hosp-emergency-only",),
        True,
        "hosp-emergency-only",
        query=q(purpose="ETREAT"),
    ),
    # class and custodian
    Case("class and custodian permitted", ("hosp-labs-of-clinic",), True, "hosp-labs-of-clinic"),
    Case(
        "class: another resource type denied",
        ("hosp-labs-of-clinic",),
        False,
        record=q(resource_type="MedicationStatement"),
    ),
    Case(
        "custodian: the clinic's lab results, not the psychiatric clinic's",
        ("hosp-labs-of-clinic",),
        False,
        record=q(custodian="psych"),
    ),
    Case(
        "custodian: psychiatric notes stay closed",
        ("hosp-labs-of-clinic",),
        False,
        record=q(custodian="psych", resource_type="DocumentReference", labels={PSY}),
    ),
    # code
    Case(
        "code permitted",
        ("uni-glucose",),
        True,
        "uni-glucose",
        query=q(institution="uni", purpose="HRESCH"),
    ),
    Case(
        "code: another code denied",
        ("uni-glucose",),
        False,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(codes={HBA1C}),
    ),
    Case(
        "code: a record without codes denied",
        ("uni-glucose",),
        False,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(codes=set()),
    ),
    # dataPeriod
    Case(
        "dataPeriod: clinical date inside",
        ("uni-2020-2022",),
        True,
        "uni-2020-2022",
        query=q(institution="uni", purpose="HRESCH"),
        record=q(clinical_date=datetime(2021, 5, 1, tzinfo=UTC)),
    ),
    Case(
        "dataPeriod: clinical date before",
        ("uni-2020-2022",),
        False,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(clinical_date=datetime(2019, 12, 31, tzinfo=UTC)),
    ),
    Case(
        "dataPeriod: the end day is included",
        ("uni-2020-2022",),
        True,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(clinical_date=datetime(2022, 12, 31, 23, 59, tzinfo=UTC)),
    ),
    Case(
        "dataPeriod: after the end day",
        ("uni-2020-2022",),
        False,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(clinical_date=datetime(2023, 1, 1, tzinfo=UTC)),
    ),
    Case(
        "dataPeriod: unknown clinical date denied",
        ("uni-2020-2022",),
        False,
        query=q(institution="uni", purpose="HRESCH"),
        record=q(clinical_date=None),
    ),
    # period, dateTime, status
    Case("period: expired consent denied", ("hosp-2020",), False),
    Case(
        "period: inside the period permitted",
        ("hosp-2020",),
        True,
        "hosp-2020",
        query=q(at=datetime(2020, 6, 1, tzinfo=UTC)),
    ),
    Case("dateTime: a consent not yet in force denied", ("hosp-from-2030",), False),
    Case("status: revoked (inactive) consent denied", ("hosp-revoked",), False),
    Case("status: draft consent denied", ("hosp-draft",), False),
    Case(
        "status: a revoked consent beside an active one",
        ("hosp-revoked", "hosp-treat"),
        True,
        "hosp-treat",
    ),
    # nested exceptions
    Case(
        "nested deny: the excluded class denied",
        ("hosp-no-meds",),
        False,
        "hosp-no-meds",
        "Consent.provision.provision[0]",
        record=q(resource_type="MedicationStatement"),
    ),
    Case(
        "nested deny: other classes still permitted",
        ("hosp-no-meds",),
        True,
        "hosp-no-meds",
        "Consent.provision",
    ),
    Case(
        "nested permit inside a nested deny",
        ("hosp-no-meds",),
        True,
        "hosp-no-meds",
        "Consent.provision.provision[0].provision[0]",
        record=q(resource_type="MedicationStatement", codes={HBA1C}),
    ),
    Case(
        "nested period: paused while the exception runs",
        ("hosp-paused-2026h2",),
        False,
        "hosp-paused-2026h2",
        "Consent.provision.provision[0]",
        query=q(at=datetime(2026, 11, 15, tzinfo=UTC)),
    ),
    Case(
        "nested period: the pause's last month included",
        ("hosp-paused-2026h2",),
        False,
        query=q(at=datetime(2026, 12, 31, 23, tzinfo=UTC)),
    ),
    Case(
        "nested period: permitted after the pause",
        ("hosp-paused-2026h2",),
        True,
        query=q(at=datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)),
    ),
    Case(
        "deny wins between siblings of the same specificity",
        ("hosp-obs-but-glucose",),
        False,
        "hosp-obs-but-glucose",
        "Consent.provision.provision[0]",
    ),
    Case(
        "sibling permit applies where the deny does not",
        ("hosp-obs-but-glucose",),
        True,
        "hosp-obs-but-glucose",
        "Consent.provision.provision[1]",
        record=q(resource_type="Condition"),
    ),
    # specificity and deny-wins across consents
    Case(
        "deny wins across consents at the same specificity",
        ("hosp-treat", "deny-hosp-treat"),
        False,
        "deny-hosp-treat",
    ),
    Case(
        "deny wins whatever the order of the consents",
        ("deny-hosp-treat", "hosp-treat"),
        False,
        "deny-hosp-treat",
    ),
    Case(
        "a more specific permit beats a general deny",
        ("deny-hosp", "hosp-treat"),
        True,
        "hosp-treat",
    ),
    Case(
        "a more specific deny beats a general permit",
        ("hosp-treat", "deny-hosp-obs"),
        False,
        "deny-hosp-obs",
    ),
    Case(
        "the patient's deny of the custodian ties the default and wins",
        ("deny-clinic-treat",),
        False,
        "deny-clinic-treat",
        query=q(institution="clinic"),
    ),
    Case("a patient's permit overrides the default's deny", ("hosp-treat",), True, "hosp-treat"),
    # security labels
    Case(
        "label: a sensitive record needs an explicit permit",
        ("hosp-treat",),
        False,
        record=q(labels={HIV}),
    ),
    Case(
        "label: the explicit permit opens it",
        ("hosp-hiv",),
        True,
        "hosp-hiv",
        record=q(labels={HIV}),
    ),
    Case(
        "label: permit of one sensitive label, record with two",
        ("hosp-hiv",),
        False,
        record=q(labels={HIV, PSY}),
    ),
    Case("label: a label permit only matches labelled records", ("hosp-hiv",), False),
    Case(
        "label: general plus label permits cover both",
        ("hosp-treat", "hosp-hiv"),
        True,
        record=q(labels={HIV}),
    ),
    Case(
        "label: confidentiality R needs a permit",
        ("hosp-treat",),
        False,
        record=q(labels={RESTRICTED}),
    ),
    Case(
        "label: confidentiality R with its permit",
        ("hosp-restricted",),
        True,
        record=q(labels={RESTRICTED}),
    ),
    Case(
        "label: confidentiality N is not sensitive",
        ("hosp-treat",),
        True,
        record=q(labels={NORMAL}),
    ),
    # action
    Case("action: access permitted", ("hosp-access-only",), True),
    Case("action: disclose not covered", ("hosp-access-only",), False, query=q(action="disclose")),
    # break-glass
    Case(
        "break-glass: emergency with a reason and registration",
        (),
        True,
        None,
        break_glass=True,
        query=GLASS,
    ),
    Case(
        "break-glass opens sensitive records too",
        (),
        True,
        break_glass=True,
        query=GLASS,
        record=q(labels={PSY}),
    ),
    Case(
        "break-glass: no reason, no glass", (), False, query={**GLASS, "break_glass_reason": "  "}
    ),
    Case(
        "break-glass: a caller not registered for it",
        (),
        False,
        query={**GLASS, "may_break_glass": False},
    ),
    Case("break-glass: only for ETREAT", (), False, query={**GLASS, "purpose": "TREAT"}),
    Case(
        "break-glass not used when the policy permits",
        ("hosp-treat",),
        True,
        "hosp-treat",
        query=GLASS,
    ),
]


def query_of(case_query: dict[str, Any], record: dict[str, Any] | None) -> AccessQuery:
    base: dict[str, Any] = {"institution": "hosp", "purpose": "TREAT", "at": NOW}
    rec: dict[str, Any] = {
        "resource_type": "Observation",
        "custodian": "clinic",
        "codes": {GLUCOSE},
        "clinical_date": datetime(2026, 3, 1, tzinfo=UTC),
        "labels": set(),
    }
    if record is not None:
        rec.update(record)
        rec["codes"] = frozenset(rec["codes"])
        rec["labels"] = frozenset(rec["labels"])
    return AccessQuery(
        **{**base, **case_query}, record=RecordMeta(**rec) if record is not None else None
    )


def test_the_table_has_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision_table(case: Case) -> None:
    consents = [CONSENTS[c] for c in case.consents] + (DEFAULTS if case.defaults else [])
    policy = compile_policy(consents)
    query = query_of(case.query, case.record)
    decision = policy.evaluate(query)
    assert decision.permitted is case.permitted, decision.reason
    assert decision.break_glass is case.break_glass
    if case.by is not None:
        assert decision.consent_id == case.by, decision.reason
    if case.path is not None:
        assert decision.path == case.path, decision.reason
    if case.break_glass:
        assert decision.consent_id is None and "break-glass" in decision.reason
        assert "unconscious" not in decision.reason  # the stated reason stays in the access log
    if decision.consent_id is not None:
        assert f"Consent/{decision.consent_id}" in decision.reason
    # the reason names elements and ids, never the record's codes, dates or labels
    assert "2345-7" not in decision.reason and "HIV" not in decision.reason
    # the search filter agrees with the decision on this record (break-glass: everything)
    assert query.record is not None
    assert policy.search_filter(query).matches(query.record) is case.permitted


def test_decision_lists_the_competing_provisions() -> None:
    policy = compile_policy([CONSENTS["hosp-treat"], CONSENTS["deny-hosp-obs"], *DEFAULTS])
    decision = policy.evaluate(query_of({}, {}))
    assert not decision.permitted
    got = {(m.consent_id, m.type, m.specificity) for m in decision.matches}
    assert ("hosp-treat", "permit", 2) in got and ("deny-hosp-obs", "deny", 3) in got
    assert ("default-clinic", "deny", 0) in got
    assert decision.reason.startswith("denied by Consent/deny-hosp-obs Consent.provision")


def test_evaluate_needs_record_metadata() -> None:
    policy = compile_policy(DEFAULTS)
    with pytest.raises(InvalidInputError) as err:
        policy.evaluate(query_of({}, None))
    assert err.value.location == "AccessQuery.record"


def test_queries_refuse_naive_times_and_unknown_actions() -> None:
    with pytest.raises(InvalidInputError, match="timezone"):
        AccessQuery(institution="a", purpose="TREAT", at=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="timezone"):
        RecordMeta("Observation", "a", clinical_date=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="action"):
        AccessQuery(institution="a", purpose="TREAT", at=NOW, action="read")  # type: ignore[arg-type]


def test_inactive_consents_are_kept_aside() -> None:
    policy = compile_policy([CONSENTS["hosp-revoked"], CONSENTS["hosp-treat"]])
    assert policy.consent_ids == ("hosp-treat",)
    assert policy.inactive_ids == ("hosp-revoked",)


def test_search_filter_constants() -> None:
    policy = compile_policy(DEFAULTS)
    assert policy.search_filter(query_of({"institution": "uni"}, None)) == NOTHING
    assert policy.search_filter(query_of(GLASS, None)) == ALL
    own = policy.search_filter(query_of({"institution": "clinic"}, None))
    assert own.matches(RecordMeta("Observation", "clinic"))
    assert not own.matches(RecordMeta("Observation", "psych"))


# --- validation: located errors -------------------------------------------------------------


def nested_actor(ref: str) -> dict[str, Any]:
    return consent(
        "bad",
        {
            "type": "deny",
            "provision": [
                {"type": "permit", "actor": [org("hosp")]},
                {"type": "permit", "actor": [{"reference": {"reference": ref}}]},
            ],
        },
    )


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "permit", "actor": [org("hosp")]}
    for _ in range(levels):
        node = {"type": "deny", "provision": [node]}
    return consent("deep", node)


INVALID = [
    (
        "actor reference to a patient",
        nested_actor("Patient/p1"),
        "Consent.provision.provision[1].actor[0].reference",
    ),
    (
        "actor reference absolute",
        nested_actor("https://x.org/fhir/Organization/a"),
        "Consent.provision.provision[1].actor[0].reference",
    ),
    (
        "actor names nobody",
        consent("bad", {"type": "permit", "actor": [{}]}),
        "Consent.provision.actor[0]",
    ),
    (
        "custodian is a practitioner",
        consent(
            "bad",
            {
                "type": "permit",
                "actor": [{**custodian("a"), "reference": {"reference": "Practitioner/x"}}],
            },
        ),
        "Consent.provision.actor[0].reference",
    ),
    (
        "empty actor list",
        consent("bad", {"type": "permit", "actor": []}),
        "Consent.provision.actor",
    ),
    ("root without type", consent("bad", {"actor": [org("a")]}), "Consent.provision.type"),
    ("unknown type", consent("bad", {"type": "maybe"}), "Consent.provision.type"),
    (
        "purpose of another system",
        consent("bad", {"type": "permit", "purpose": [{"system": LOINC, "code": "TREAT"}]}),
        "Consent.provision.purpose[0].system",
    ),
    (
        "class of another system",
        consent("bad", {"type": "permit", "class": [{"system": "urn:x", "code": "Observation"}]}),
        "Consent.provision.class[0].system",
    ),
    (
        "code without system",
        consent("bad", {"type": "permit", "code": [{"coding": [{"code": "1"}]}]}),
        "Consent.provision.code[0].coding[0].system",
    ),
    (
        "action of another system",
        consent(
            "bad",
            {"type": "permit", "action": [{"coding": [{"system": "urn:x", "code": "access"}]}]},
        ),
        "Consent.provision.action[0].coding",
    ),
    (
        "label without code",
        consent("bad", {"type": "permit", "securityLabel": [{"system": ACT_CODE}]}),
        "Consent.provision.securityLabel[0].code",
    ),
    (
        "period ends before it starts",
        consent("bad", {"type": "permit", "period": {"start": "2026-02-01", "end": "2026-01-01"}}),
        "Consent.provision.period",
    ),
    (
        "dataPeriod not a date",
        consent("bad", {"type": "permit", "dataPeriod": {"start": "yesterday"}}),
        "Consent.provision.dataPeriod.start",
    ),
    (
        "dataPeriod impossible date",
        consent("bad", {"type": "permit", "dataPeriod": {"end": "2026-02-30"}}),
        "Consent.provision.dataPeriod.end",
    ),
    (
        "data references unsupported",
        consent(
            "bad",
            {
                "type": "permit",
                "data": [{"meaning": "instance", "reference": {"reference": "Observation/1"}}],
            },
        ),
        "Consent.provision.data",
    ),
    (
        "nested provision not an object",
        consent("bad", {"type": "permit", "provision": ["deny"]}),
        "Consent.provision.provision[0]",
    ),
    ("unknown status", {**consent("bad", HOSP_TREAT), "status": "revoked"}, "Consent.status"),
    (
        "research scope",
        {
            **consent("bad", HOSP_TREAT),
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "research"}]},
        },
        "Consent.scope",
    ),
    (
        "no provision",
        {k: v for k, v in consent("bad", HOSP_TREAT).items() if k != "provision"},
        "Consent.provision",
    ),
    ("bad dateTime", consent("bad", HOSP_TREAT, dateTime="2026-13-01"), "Consent.dateTime"),
    (
        "not a Consent",
        {**consent("bad", HOSP_TREAT), "resourceType": "Patient"},
        "Consent.resourceType",
    ),
    ("no id", {k: v for k, v in consent("x", HOSP_TREAT).items() if k != "id"}, "Consent.id"),
    (
        "provision modifier extension",
        consent("bad", {"type": "permit", "modifierExtension": [{"url": "urn:x"}]}),
        "Consent.provision.modifierExtension",
    ),
    (
        "consent modifier extension",
        {**consent("bad", HOSP_TREAT), "modifierExtension": [{"url": "urn:x"}]},
        "Consent.modifierExtension",
    ),
    (
        "too deep",
        deep(MAX_DEPTH + 1),
        "Consent.provision" + ".provision[0]" * MAX_DEPTH + ".provision",
    ),
]


@pytest.mark.parametrize(
    ("resource", "location"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID]
)
def test_invalid_consents_are_located(resource: dict[str, Any], location: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        compile_policy([default_consent("clinic"), resource])
    assert err.value.location == location
    assert "consent" in str(err.value).lower()


def test_plain_extensions_are_ignored() -> None:
    ext = [{"url": "urn:x", "valueString": "note"}]
    policy = compile_policy([consent("ext", {**HOSP_TREAT, "extension": ext})])
    assert policy.evaluate(query_of({}, {})).permitted


def test_depth_limit_is_exact() -> None:
    compile_policy([deep(MAX_DEPTH)])  # the limit itself is allowed
    with pytest.raises(InvalidInputError, match="deeper"):
        compile_policy([deep(MAX_DEPTH + 1)])


def test_bounds_on_consents_and_provisions() -> None:
    many = [consent(f"c{i}", HOSP_TREAT) for i in range(MAX_CONSENTS + 1)]
    compile_policy(many[:MAX_CONSENTS])
    with pytest.raises(InvalidInputError, match="more than") as err:
        compile_policy(many)
    assert err.value.location == "Consent"
    wide = consent("wide", {"type": "permit", "provision": [{"type": "deny"}] * MAX_PROVISIONS})
    with pytest.raises(InvalidInputError, match="provisions in one consent"):
        compile_policy([wide])
    with pytest.raises(InvalidInputError, match="twice"):
        compile_policy([CONSENTS["hosp-treat"], CONSENTS["hosp-treat"]])


def test_a_revoked_consent_is_still_validated() -> None:
    bad = {**nested_actor("Patient/p1"), "status": "inactive"}
    with pytest.raises(InvalidInputError) as err:
        compile_policy([bad])
    assert err.value.location == "Consent.provision.provision[1].actor[0].reference"
    assert "Consent bad" in str(err.value)


# --- the search filter agrees with evaluate (hypothesis) ------------------------------------

INSTITUTIONS = ["a", "b", "c"]
TYPES = ["Observation", "Condition", "MedicationStatement"]
CODES = ["urn:x|1", "urn:x|2", "urn:x|3"]
LABELS = [HIV, PSY, NORMAL]
PURPOSES = ["TREAT", "ETREAT", "HRESCH", "HPAYMT"]
DATES = [datetime(y, 6, 1, tzinfo=UTC) for y in (2019, 2021, 2023, 2025)]


def provision_of(rnd: random.Random, depth: int) -> dict[str, Any]:
    """A random provision over a small vocabulary (each element present with some chance)."""

    def some(items: list[str]) -> list[str]:
        return rnd.sample(items, rnd.randint(1, 2))

    p: dict[str, Any] = {"type": "permit" if rnd.random() < 0.6 else "deny"}
    if rnd.random() < 0.5:
        p["actor"] = [org(i) for i in some(INSTITUTIONS)]
        if rnd.random() < 0.3:
            p["actor"].append({"reference": {"reference": "Practitioner/u1"}})
    if rnd.random() < 0.3:
        p.setdefault("actor", []).extend(custodian(i) for i in some(INSTITUTIONS))
    if rnd.random() < 0.4:
        p["purpose"] = purpose(*some(PURPOSES))
    if rnd.random() < 0.3:
        p["class"] = classes(*some(TYPES))
    if rnd.random() < 0.3:
        p["code"] = concept(*some(CODES))
    if rnd.random() < 0.3:
        p["securityLabel"] = labels(*some(LABELS))
    if rnd.random() < 0.2:
        start, end = sorted(rnd.sample(range(2018, 2027), 2))
        p["dataPeriod"] = {"start": str(start), "end": str(end)}
    if rnd.random() < 0.15:
        p["period"] = rnd.choice([{"start": "2026-01-01"}, {"end": "2025-12-31"}])
    if depth < 2 and rnd.random() < 0.4:
        p["provision"] = [provision_of(rnd, depth + 1) for _ in range(rnd.randint(1, 2))]
    return p


def random_case(rnd: random.Random) -> tuple[list[dict[str, Any]], AccessQuery, list[RecordMeta]]:
    """Consents (with or without a default), one requester and some records, all random."""
    consents = [consent(f"c{i}", provision_of(rnd, 0)) for i in range(rnd.randint(0, 5))]
    if rnd.random() < 0.5:
        consents.append(default_consent(rnd.choice(INSTITUTIONS)))
    query = AccessQuery(
        institution=rnd.choice(INSTITUTIONS),
        purpose=rnd.choice(PURPOSES),
        at=NOW,
        user=rnd.choice([None, "u1", "u2"]),
    )
    recs = [
        RecordMeta(
            resource_type=rnd.choice(TYPES),
            custodian=rnd.choice(INSTITUTIONS),
            codes=frozenset(rnd.sample(CODES, rnd.randint(0, 2))),
            clinical_date=rnd.choice([None, *DATES]),
            labels=frozenset(rnd.sample(LABELS, rnd.choice([0, 0, 1, 2]))),
        )
        for _ in range(20)
    ]
    return consents, query, recs


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_search_filter_agrees_with_evaluate(seed: int) -> None:
    # One seed drives the whole case (consents, requester, 20 records): hypothesis's own
    # draws cost more than the evaluation on this shared machine. A failure names the seed.
    consents, query, recs = random_case(random.Random(seed))
    policy = compile_policy(consents)
    reordered = compile_policy(consents[::-1])  # the order of consents never matters
    where = policy.search_filter(query)
    for rec in recs:
        permitted = policy.evaluate(replace(query, record=rec)).permitted
        assert where.matches(rec) is permitted
        assert reordered.evaluate(replace(query, record=rec)).permitted is permitted


def test_generated_cases_exercise_both_outcomes() -> None:
    # The property above is only worth something if its cases are not all denials.
    rnd = random.Random(15)
    outcomes = [
        compile_policy(c).evaluate(replace(qy, record=r)).permitted
        for c, qy, recs in (random_case(rnd) for _ in range(100))
        for r in recs
    ]
    assert 0.15 < sum(outcomes) / len(outcomes) < 0.85
