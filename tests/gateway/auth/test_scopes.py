"""SMART v2 scopes and purposes of use: parsing, granting, constraints. Pure unit tests."""

from __future__ import annotations

import pytest

from gateway.auth.caller import Caller
from gateway.auth.errors import ForbiddenError
from gateway.auth.policy import authorize_entry
from gateway.auth.purposes import parse_purposes, select_purpose
from gateway.auth.scopes import ScopeError, grant, parse_scope, parse_scopes, resource_matches


def test_parse_v2_v1_and_constrained() -> None:
    s = parse_scope("system/Observation.rs?category=laboratory")
    assert (s.context, s.resource, s.permissions) == ("system", "Observation", frozenset("rs"))
    assert s.params == (("category", "laboratory"),)
    assert str(s) == "system/Observation.rs?category=laboratory"
    assert parse_scope("user/*.read").permissions == frozenset("rs")
    assert parse_scope("system/Patient.write").permissions == frozenset("cud")
    assert parse_scopes("openid fhirUser system/*.c") == (parse_scope("system/*.c"),)


@pytest.mark.parametrize(
    "bad",
    [
        "system/Observation",
        "admin/Observation.r",
        "system/observation.r",
        "system/Observation.sr",
        "system/Observation.rr",
        "system/Observation.x",
        "system/Observation.rs?category=",
        "Observation.rs",
        "banana",
    ],
)
def test_malformed_scopes_are_refused(bad: str) -> None:
    with pytest.raises(ScopeError):
        parse_scopes(bad)


def test_grant_only_requested_and_registered() -> None:
    registered = parse_scopes("system/*.rs system/Observation.c system/Patient.rs?x=1")
    requested = parse_scopes(
        "system/Observation.rs system/Observation.cu system/Patient.rs "
        "system/Condition.rs?category=problem-list-item system/Patient.rs?x=1 patient/*.rs"
    )
    granted = grant(requested, registered)
    assert [str(s) for s in granted] == [
        "system/Observation.rs",
        "system/Patient.rs",
        "system/Condition.rs?category=problem-list-item",
        "system/Patient.rs?x=1",
    ]
    # a constrained registration never grants the unconstrained scope, only itself or narrower
    narrow = parse_scopes("system/Patient.rs?x=1")
    assert grant(parse_scopes("system/Patient.rs"), narrow) == ()
    assert grant(parse_scopes("system/Patient.r?x=1&y=2"), narrow) == parse_scopes(
        "system/Patient.r?x=1&y=2"
    )


def test_resource_matches_constraints() -> None:
    scope = parse_scope(
        "system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/"
        "observation-category|laboratory"
    )
    lab = {
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ]
    }
    assert resource_matches(scope, lab)
    assert not resource_matches(scope, {"category": [{"coding": [{"code": "vital-signs"}]}]})
    assert not resource_matches(parse_scope("system/Observation.rs?foo=bar"), lab)


def test_purposes() -> None:
    assert parse_purposes("treat, hpaymt TREAT") == ("TREAT", "HPAYMT")
    assert select_purpose(("TREAT",), None) == "TREAT"
    assert select_purpose(("TREAT", "HPAYMT"), None) is None
    assert select_purpose(("TREAT", "HPAYMT"), "hpaymt") == "HPAYMT"
    with pytest.raises(ForbiddenError):
        select_purpose(("TREAT",), "HRESCH")


def test_authorize_entry() -> None:
    his = Caller("his", "h1", "system", scopes=parse_scopes("system/Observation.cu"))
    authorize_entry(his, "Observation", "POST", institution="h1")
    authorize_entry(his, "Observation", "PUT", institution="h1")
    for rtype, interaction, inst in (
        ("Patient", "c", "h1"),
        ("Observation", "r", "h1"),
        ("Observation", "c", "h2"),
        ("Bundle", "c", "h1"),
    ):
        with pytest.raises(ForbiddenError):
            authorize_entry(his, rtype, interaction, institution=inst)
    patient = Caller("p", "h1", "patient", scopes=parse_scopes("patient/*.cruds"), patient="x")
    with pytest.raises(ForbiddenError):
        authorize_entry(patient, "Observation", "c")
    authorize_entry(patient, "Observation", "r")
