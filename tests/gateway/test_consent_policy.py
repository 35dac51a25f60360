"""ConsentPolicy (gateway/consent_policy.py) at the policy level, with the in-memory consent
source: the two-institution flow (a clinic's lab result, the hospital denied, consent granted,
revoked), who consent decides for, sensitive labels, break-glass, and search filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.access import (
    PERMIT,
    AccessDecision,
    AccessDeniedError,
    AccessRequest,
    SearchFilter,
)
from gateway.auth.caller import Caller
from gateway.consent import ACT_CODE, RecordMeta
from gateway.consent_policy import ConsentPolicy
from gateway.views import PatientLinks
from tests.gateway.consent_stub import InMemoryConsents, grant

NOW = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
LAB = RecordMeta("Observation", "clinic", frozenset({"http://loinc.org|2345-7"}), NOW)
PSY_NOTE = RecordMeta(
    "DocumentReference", "clinic", labels=frozenset({f"{ACT_CODE}|PSY"}), clinical_date=NOW
)


class Passthrough:
    """CallerPolicy's role: refuse a patient token on another patient's records."""

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        if (
            isinstance(caller, Caller)
            and caller.kind == "patient"
            and caller.patient != request.patient
        ):
            raise AccessDeniedError("other patient", interaction=request.interaction)
        return PERMIT

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        if isinstance(caller, Caller) and caller.kind == "patient" and caller.patient:
            return SearchFilter(patients=frozenset({caller.patient}))
        return SearchFilter()


def system(institution: str, purpose: str | None = "TREAT", **kw: object) -> Caller:
    return Caller(
        client_id=f"{institution}-his",
        institution=institution,
        kind="system",
        purposes=(purpose,) if purpose else ("TREAT", "HRESCH"),
        purpose=purpose,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def world() -> tuple[ConsentPolicy, InMemoryConsents, PatientLinks]:
    links = PatientLinks()
    consents = InMemoryConsents(["clinic", "hospital"], links)
    policy = ConsentPolicy(
        Passthrough(),
        consents,
        links=links,
        institution="clinic",
        default_patient="no-patient",
        clock=lambda: NOW,
    )
    return policy, consents, links


def read(patient: str = "pat-a", meta: RecordMeta | None = LAB) -> AccessRequest:
    return AccessRequest("read", "Observation", "clinic", patient, "rec-1", 1, meta)


async def test_two_institutions_grant_and_revoke(
    world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks],
) -> None:
    """The clinic stores a lab result; the hospital's client is denied; the patient grants
    the hospital treatment access: permitted, with the consent version; revoked: denied."""
    policy, consents, _ = world
    clinic, hospital = system("clinic"), system("hospital")
    own = await policy.check(clinic, read())
    assert own.permitted and own.consent_id == "default-clinic" and own.consent_version == 0
    with pytest.raises(AccessDeniedError) as denied:
        await policy.check(hospital, read())
    assert denied.value.decision is not None and not denied.value.decision.permitted
    version = consents.put("pat-a", grant("c-1", "hospital"))
    allowed = await policy.check(hospital, read())
    assert allowed.permitted and allowed.consent_id == "c-1"
    assert allowed.consent_version == version
    revoked = consents.revoke("pat-a", "c-1")
    with pytest.raises(AccessDeniedError) as again:
        await policy.check(hospital, read())
    assert again.value.decision is not None and again.value.decision.consent_version == revoked
    assert consents.fresh_calls == 4  # every read decision waited for freshness first


async def test_other_patient_still_denied_to_hospital(
    world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks],
) -> None:
    policy, consents, _ = world
    consents.put("pat-a", grant("c-1", "hospital"))
    with pytest.raises(AccessDeniedError):
        await policy.check(system("hospital"), read("pat-b"))


async def test_who_consent_decides_for(
    world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks],
) -> None:
    """Internal calls, the local sender, a patient on their own records and writes are not
    decided by consent; a foreign caller without purpose is denied; the custodian's own
    caller without a selected purpose is decided as TREAT when its token grants it."""
    policy, consents, _ = world
    assert (await policy.check(None, read(meta=None))).permitted
    local = Caller(client_id="mllp", institution="clinic", kind="local")
    assert (await policy.check(local, read(meta=None))).permitted
    me = Caller(client_id="portal", institution="clinic", kind="patient", patient="pat-a")
    assert (await policy.check(me, read(meta=PSY_NOTE))).permitted
    with pytest.raises(AccessDeniedError):
        await policy.check(me, read("pat-b"))
    write = AccessRequest("create", "Observation", "clinic", "pat-a")
    assert (await policy.check(system("hospital"), write)).permitted
    consents.put("pat-a", grant("c-1", "hospital"))
    with pytest.raises(AccessDeniedError, match="no purpose"):
        await policy.check(system("hospital", None), read())
    assert (await policy.check(system("clinic", None), read())).permitted
    with pytest.raises(AccessDeniedError, match="metadata"):
        await policy.check(system("clinic"), read(meta=None))


async def test_sensitive_labels_need_an_explicit_permit(
    world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks],
) -> None:
    policy, consents, _ = world
    hospital = system("hospital")
    consents.put("pat-a", grant("c-1", "hospital"))
    assert (await policy.check(hospital, read())).permitted
    with pytest.raises(AccessDeniedError):
        await policy.check(hospital, read(meta=PSY_NOTE))
    consents.put("pat-a", grant("c-2", "hospital", labels=[(ACT_CODE, "PSY")]))
    assert (await policy.check(hospital, read(meta=PSY_NOTE))).permitted
    # the custodian's own treatment reads include sensitive records (administrative default)
    assert (await policy.check(system("clinic"), read(meta=PSY_NOTE))).permitted


async def test_break_glass(world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks]) -> None:
    policy, _, _ = world
    emergency = system("hospital", "ETREAT", break_glass="unconscious, suspected overdose")
    decision = await policy.check(emergency, read())
    assert decision.permitted and decision.break_glass
    with pytest.raises(AccessDeniedError):
        await policy.check(system("hospital", "ETREAT"), read())  # no stated reason


async def test_search_filters(world: tuple[ConsentPolicy, InMemoryConsents, PatientLinks]) -> None:
    """A foreign caller names exactly one patient (linked pseudonyms are one); its filter is
    that patient's consent. The custodian's callers get a term per consented patient and
    the default for everyone else."""
    policy, consents, links = world
    links.add("pat-a", "pat-a2")
    hospital = system("hospital")
    with pytest.raises(AccessDeniedError, match="exactly one patient"):
        await policy.search_filter(hospital, None)
    with pytest.raises(AccessDeniedError, match="exactly one patient"):
        await policy.search_filter(hospital, frozenset({"pat-a", "pat-b"}))
    nothing = await policy.search_filter(hospital, frozenset({"pat-a", "pat-a2"}))
    (only_own,) = nothing.consent or ()
    assert only_own.patients == frozenset({"pat-a", "pat-a2"})
    assert not only_own.where.matches(LAB)  # the hospital's default covers its own records only
    assert only_own.where.matches(RecordMeta("Observation", "hospital"))
    assert (await policy.search_filter(hospital, frozenset())).consent == ()
    consents.put("pat-a2", grant("c-1", "hospital", classes=["Observation"]))
    (term,) = (await policy.search_filter(hospital, frozenset({"pat-a"}))).consent or ()
    assert term.patients == frozenset({"pat-a", "pat-a2"})
    assert term.where.matches(LAB) and not term.where.matches(PSY_NOTE)
    own = await policy.search_filter(system("clinic"), None)
    assert own.consent is not None and len(own.consent) == 2
    assert own.consent[0].patients == frozenset({"pat-a", "pat-a2"})
    assert own.consent[1].patients is None and own.consent[1].where.matches(PSY_NOTE)
    me = Caller(client_id="portal", institution="clinic", kind="patient", patient="pat-a")
    assert (await policy.search_filter(me, None)).patients == frozenset({"pat-a"})
    assert (await policy.search_filter(None, None)).unrestricted
