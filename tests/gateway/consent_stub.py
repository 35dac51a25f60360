"""Test stand-ins for the consent source and the access log (h1's ConsentService and h3's
AuditLog implement the real ones): an in-memory :class:`InMemoryConsents` compiling each
patient's Consent dicts with every institution's administrative default, a
:class:`RecordingLog` keeping every event logged, and :func:`install` putting a
:class:`gateway.consent_policy.ConsentPolicy` with them into a started app.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from gateway.access import AccessEvent
from gateway.auth.guard import CallerPolicy
from gateway.consent import (
    ACT_REASON,
    CONSENT_SCOPE,
    PARTICIPATION_TYPE,
    RESOURCE_TYPES,
    compile_policy,
    default_consent,
)
from gateway.consent_policy import ConsentPolicy, PatientPolicy
from gateway.errors import BackendError
from gateway.views import PatientLinks


class InMemoryConsents:
    """Consents by pseudonym; each change bumps the version (like a ledger index)."""

    def __init__(self, institutions: Sequence[str], links: PatientLinks | None = None) -> None:
        self.defaults = [default_consent(i) for i in institutions]
        self.links = links if links is not None else PatientLinks()  # (empty is falsy)
        self.by_patient: dict[str, list[dict[str, Any]]] = {}
        self.versions: dict[str, int] = {}
        self.clock = 0
        self.fresh_calls = 0
        self._cache: dict[tuple[frozenset[str], int], PatientPolicy] = {}

    def put(self, patient: str, consent: dict[str, Any]) -> int:
        """Add or replace (same id) a consent of ``patient``; returns the new version."""
        mine = [c for c in self.by_patient.get(patient, []) if c["id"] != consent["id"]]
        self.by_patient[patient] = [*mine, consent]
        self.clock += 1
        self.versions[patient] = self.clock
        return self.clock

    def revoke(self, patient: str, consent_id: str) -> int:
        """Mark a consent inactive; returns the new version."""
        (found,) = [c for c in self.by_patient[patient] if c["id"] == consent_id]
        return self.put(patient, {**found, "status": "inactive"})

    async def policy_for(self, patient: str) -> PatientPolicy:
        who = self.links.all_of(patient)
        version = max((self.versions.get(p, 0) for p in who), default=0)
        key = (who, version)
        if key not in self._cache:
            consents = [c for p in sorted(who) for c in self.by_patient.get(p, [])]
            self._cache[key] = PatientPolicy(compile_policy([*consents, *self.defaults]), version)
        return self._cache[key]

    async def fresh(self) -> None:
        self.fresh_calls += 1

    def consented_patients(self) -> frozenset[str]:
        return frozenset(self.by_patient)


class RecordingLog:
    """An access log keeping the events; ``fail`` makes record() raise BackendError."""

    def __init__(self) -> None:
        self.events: list[AccessEvent] = []
        self.fail = False

    async def record(self, events: Sequence[AccessEvent]) -> None:
        if self.fail:
            raise BackendError("audit log down (test)", backend="audit")
        self.events.extend(events)


def grant(
    consent_id: str,
    institution: str,
    *,
    purpose: str = "TREAT",
    classes: Sequence[str] = (),
    labels: Sequence[tuple[str, str]] = (),
    codes: Sequence[tuple[str, str]] = (),
    custodian: str | None = None,
    status: str = "active",
) -> dict[str, Any]:
    """A patient-privacy Consent permitting ``institution`` for ``purpose`` (optionally only
    some classes, codes, a custodian's records, and sensitive labels named explicitly)."""
    actors: list[dict[str, Any]] = [
        {
            "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
            "reference": {"reference": f"Organization/{institution}"},
        }
    ]
    if custodian is not None:
        actors.append(
            {
                "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "CST"}]},
                "reference": {"reference": f"Organization/{custodian}"},
            }
        )
    provision: dict[str, Any] = {
        "type": "permit",
        "actor": actors,
        "purpose": [{"system": ACT_REASON, "code": purpose}],
    }
    if classes:
        provision["class"] = [{"system": RESOURCE_TYPES, "code": c} for c in classes]
    if labels:
        provision["securityLabel"] = [{"system": s, "code": c} for s, c in labels]
    if codes:
        provision["code"] = [{"coding": [{"system": s, "code": c}]} for s, c in codes]
    return {
        "resourceType": "Consent",
        "id": consent_id,
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "provision": provision,
    }


def install(
    app: FastAPI, *, others: Sequence[str] = ("hospital",)
) -> tuple[InMemoryConsents, RecordingLog]:
    """Put a ConsentPolicy (stand-in consents for this gateway's institution and ``others``)
    and a recording access log into a started app's record and search services."""
    gw = app.state.gateway
    auth = app.state.auth
    consents = InMemoryConsents([gw.settings.institution, *others], gw.index.links)
    policy = ConsentPolicy(
        CallerPolicy(auth, gw.index.links),
        consents,
        links=gw.index.links,
        institution=gw.settings.institution,
        default_patient=gw.records.no_patient,
    )
    log = RecordingLog()
    gw.records.policy = policy
    gw.records.access_log = log
    search = getattr(app.state, "search", None)
    if search is not None:
        search.policy = policy
    return consents, log
