"""The production access policy: authentication's rules, then the patient's consent.

:class:`ConsentPolicy` is the :class:`gateway.access.AccessPolicy` a gateway runs once callers
are authenticated. It wraps :class:`gateway.auth.guard.CallerPolicy` (a patient token reaches
only its own records) and decides every read of a system caller with the patient's compiled
consents (:mod:`gateway.consent`), taken from a :class:`ConsentSource` (the ledger-derived
consent service, ``gateway/consents.py``):

- internal calls (no caller, or the local sender) and a patient reading their own records are
  permitted (the patient's own access is still logged by the record service);
- writes (create, update, delete) are decided by the caller's scopes, as the route table and
  the guard already did;
- reads (read, vread, history, search results, ``$everything`` members, receipt lookups):
  :meth:`ConsentSource.fresh` first (a revocation acknowledged anywhere before this read is
  seen), then ``policy_for(patient).policy.evaluate`` with the caller's institution, purpose
  of use, user, role and break-glass reason and the record's index metadata; the decision
  carries the patient's consent version. A caller without a purpose of use is denied another
  institution's records; the custodian's own caller without one is decided as ``TREAT`` when
  its token grants ``TREAT`` and denied otherwise.

Search (:meth:`ConsentPolicy.search_filter`): a caller from another institution must name
exactly one patient (:class:`gateway.access.AccessDeniedError`, answered 403); the filter is
that patient's consent as a :class:`gateway.consent.Filter`, applied by the index inside the
query. The custodian's own callers searching without naming a patient get one term per
patient with consents and one term (the administrative defaults) for every other patient.

Raises :class:`gateway.access.AccessDeniedError`, and what the consent source raises
(BackendError, LedgerError).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gateway.access import (
    AccessDecision,
    AccessDeniedError,
    AccessPolicy,
    AccessRequest,
    Interaction,
    PatientFilter,
    SearchFilter,
)
from gateway.auth.caller import Caller
from gateway.consent import AccessQuery, Filter, Policy
from gateway.views import PatientLinks

#: Interactions decided by the caller's scopes (the guard), not by consent.
WRITES: frozenset[Interaction] = frozenset(("create", "update", "delete"))

#: The purpose a custodian's own caller without a selected purpose is decided as, when its
#: token grants it.
DEFAULT_OWN_PURPOSE = "TREAT"


class PatientPolicyLike(Protocol):
    """One patient's compiled consents and their version (``gateway.consents.PatientPolicy``)."""

    @property
    def policy(self) -> Policy:
        """The compiled consents (the patient's, under every linked pseudonym, and every
        institution's administrative default)."""

    @property
    def version(self) -> int:
        """The ledger index of the patient's latest ``consent`` leaf (0: none)."""


@dataclass(frozen=True, slots=True)
class PatientPolicy:
    """A patient's compiled consents and their version (the form :class:`ConsentSource`
    returns; the consent service may return its own class of the same shape)."""

    policy: Policy
    version: int


class ConsentSource(Protocol):
    """Where the policy gets each patient's consents (the consent service)."""

    async def policy_for(self, patient: str) -> PatientPolicyLike:
        """The compiled consents of the patient ``patient`` names (a pseudonym). Raises
        BackendError, LedgerError."""

    async def fresh(self) -> None:
        """Return once every consent change acknowledged anywhere before the call is
        seen here. Raises BackendError, LedgerError."""

    def consented_patients(self) -> frozenset[str]:
        """Pseudonyms with at least one consent."""


def _may_break_glass(caller: Caller) -> bool:
    # A token carries a break-glass reason only when its client is registered for it
    # (gateway/auth/tokens.py grants ETREAT/BTG only then).
    return caller.break_glass is not None


def _now() -> datetime:
    return datetime.now(UTC)


class ConsentPolicy:
    """The production :class:`gateway.access.AccessPolicy` (see the module docstring).

    ``callers``: the authentication policy it wraps (``CallerPolicy``); ``consents``: the
    consent source; ``links``: the ledger's patient links (a patient named by one pseudonym
    is named by all); ``institution``: this gateway's (the custodian of its records);
    ``default_patient``: a pseudonym that never has consents (the gateway's ``no_patient``),
    whose policy is the administrative defaults alone; ``may_break_glass``: whether a
    caller's registration allows breaking the glass; ``clock``: the time of an access."""

    def __init__(
        self,
        callers: AccessPolicy,
        consents: ConsentSource,
        *,
        links: PatientLinks,
        institution: str,
        default_patient: str,
        may_break_glass: Callable[[Caller], bool] = _may_break_glass,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.callers = callers
        self.consents = consents
        self.links = links
        self.institution = institution
        self.default_patient = default_patient
        self.may_break_glass = may_break_glass
        self.clock = clock

    # ---- who is decided by consent ---------------------------------------------------------

    @staticmethod
    def _system(caller: object | None) -> Caller | None:
        """The caller when consent decides for it (an authenticated system caller)."""
        if isinstance(caller, Caller) and caller.kind == "system":
            return caller
        return None

    def _purpose(self, caller: Caller, custodian: str) -> str | None:
        if caller.purpose is not None:
            return caller.purpose
        if custodian == caller.institution == self.institution and (
            DEFAULT_OWN_PURPOSE in caller.purposes
        ):
            return DEFAULT_OWN_PURPOSE
        return None

    def _query(self, caller: Caller, purpose: str, request: AccessRequest | None) -> AccessQuery:
        return AccessQuery(
            institution=caller.institution,
            purpose=purpose,
            at=self.clock(),
            user=caller.user,
            role=caller.role,
            break_glass_reason=caller.break_glass,
            may_break_glass=self.may_break_glass(caller),
            record=request.meta if request is not None else None,
        )

    # ---- AccessPolicy ----------------------------------------------------------------------

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        """Decide one request (see the module docstring). Raises AccessDeniedError (with
        the decision and the consent version), ForbiddenError (a patient token reaching
        another patient, from CallerPolicy), BackendError, LedgerError."""
        decision = await self.callers.check(caller, request)
        system = self._system(caller)
        if system is None or request.interaction in WRITES:
            return decision
        purpose = self._purpose(system, request.custodian)
        if purpose is None:
            denied = AccessDecision(False, "no purpose of use selected")
            raise AccessDeniedError(denied.reason, interaction=request.interaction, decision=denied)
        if request.meta is None:
            denied = AccessDecision(False, "the record's metadata is not known")
            raise AccessDeniedError(denied.reason, interaction=request.interaction, decision=denied)
        await self.consents.fresh()
        patient = await self.consents.policy_for(request.patient)
        outcome = patient.policy.evaluate(self._query(system, purpose, request))
        result = AccessDecision(
            outcome.permitted,
            outcome.reason,
            consent_id=outcome.consent_id,
            path=outcome.path,
            break_glass=outcome.break_glass,
            consent_version=patient.version,
        )
        if not result.permitted:
            raise AccessDeniedError(result.reason, interaction=request.interaction, decision=result)
        return result

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        """What the caller may find (see the module docstring). Raises AccessDeniedError
        when a caller from another institution does not name exactly one patient, or has no
        purpose of use; BackendError, LedgerError."""
        base = await self.callers.search_filter(caller, patients)
        system = self._system(caller)
        if system is None:
            return base
        foreign = system.institution != self.institution
        persons = self._persons(patients or frozenset())
        if foreign and (patients is None or len(persons) > 1):
            raise AccessDeniedError(
                "a caller from another institution must name exactly one patient in a search",
                interaction="search",
            )
        purpose = self._purpose(system, system.institution)
        if purpose is None:
            if foreign:
                raise AccessDeniedError("no purpose of use selected", interaction="search")
            return SearchFilter(consent=())
        await self.consents.fresh()
        q = self._query(system, purpose, None)
        if patients is not None:
            terms = [PatientFilter(p, await self._filter(next(iter(p)), q)) for p in persons]
            return SearchFilter(consent=tuple(terms))
        consented = self._persons(self.consents.consented_patients())
        terms = [PatientFilter(p, await self._filter(next(iter(p)), q)) for p in consented]
        terms.append(PatientFilter(None, await self._filter(self.default_patient, q)))
        return SearchFilter(consent=tuple(terms))

    def _persons(self, pseudonyms: frozenset[str]) -> list[frozenset[str]]:
        """The distinct persons among pseudonyms, each as every pseudonym linked to it
        (sorted, so filters and their SQL are stable)."""
        out: dict[frozenset[str], None] = {}
        for p in sorted(pseudonyms):
            out.setdefault(self.links.all_of(p), None)
        return list(out)

    async def _filter(self, patient: str, q: AccessQuery) -> Filter:
        return (await self.consents.policy_for(patient)).policy.search_filter(q)
