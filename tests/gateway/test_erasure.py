"""Erasure within the law (gateway/erasure.py): restriction at once, crypto-shredding of what
is past retention, the KEK only when nothing is retained, reads of shredded records (410 to
the custodian, 404 to everyone else), a new KEK afterwards, ``gateway verify --blobs``, and a
second gateway applying the restriction. On both profiles (the production one on the real
Kubo, JetStream and Redis)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway.access import (
    AccessDecision,
    AccessDeniedError,
    AccessRequest,
    PatientFilter,
    SearchFilter,
)
from gateway.app import create_app
from gateway.auth.caller import Caller
from gateway.cli import app as cli_app
from gateway.consent import ALL, NOTHING, In
from gateway.erasure import (
    ErasureView,
    RestrictPolicy,
    RetentionRules,
    exclude_patients,
)
from gateway.errors import KeyDestroyedError, KeyNotFoundError
from gateway.runtime import Gateway
from gateway.verify_cmd import run_verify
from gateway.views import RecordIndex
from ledger.errors import LeafFormatError
from ledger.keys import Signer, TrustedKeys
from ledger.leaves import MAX_ERASED, decode_leaf, encode_leaf
from tests.gateway.conftest import FHIR, bearer, settings_for

MASTER = "urn:oid:2.16.156.10011.1.19"
P1 = "a" * 64
P2 = "b" * 64
T = "2026-12-01T00:00:00Z"
LATER = datetime(2061, 1, 1, tzinfo=UTC)  # past every retention period of the records below


# ---- leaves ----------------------------------------------------------------------------------


def test_restrict_and_erasure_leaves_have_exactly_their_fields() -> None:
    raw = encode_leaf("key", {"action": "restrict", "patient": P1, "source": "clinic", "time": T})
    assert raw.startswith(b'{"action":"restrict",')
    with pytest.raises(LeafFormatError, match="needs 'patient'"):
        encode_leaf("key", {"action": "restrict", "source": "clinic", "time": T})
    with pytest.raises(LeafFormatError, match="does not belong"):
        encode_leaf(
            "key",
            {"action": "restrict", "patient": P1, "key_id": "k1", "source": "c", "time": T},
        )
    leaf = decode_leaf(
        encode_leaf("erasure", {"patient": P1, "records": ["r1", "r2"], "source": "c", "time": T})
    )
    assert set(leaf) == {"v", "kind", "patient", "records", "source", "time"}
    for bad in ([], ["r1", "r1"], ["no spaces"], [f"r{n}" for n in range(MAX_ERASED + 1)]):
        with pytest.raises(LeafFormatError, match="records"):
            encode_leaf("erasure", {"patient": P1, "records": bad, "source": "c", "time": T})
    with pytest.raises(LeafFormatError, match="unknown field"):
        encode_leaf(
            "erasure",
            {"patient": P1, "records": ["r1"], "source": "c", "time": T, "name": "Wang"},
        )


# ---- retention rules -------------------------------------------------------------------------

RULES = RetentionRules(
    years={"outpatient": 15, "inpatient": 30, "not-retained": 0},
    by_type={"Appointment": "not-retained"},
)


def _obs(date: str, encounter: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Observation", "effectiveDateTime": date}
    if encounter:
        out["encounter"] = {"reference": f"Encounter/{encounter}"}
    return out


def test_retention_is_counted_by_class_from_the_clinical_date_or_the_discharge() -> None:
    stay = {
        "resourceType": "Encounter",
        "class": {"code": "IMP"},
        "period": {"start": "1999-12-20", "end": "2000-01-05"},
    }
    visit = {"resourceType": "Encounter", "class": {"code": "AMB"}, "period": {"start": "2010"}}
    encounters = {"stay": stay, "visit": visit}
    updated = datetime(2026, 1, 1, tzinfo=UTC)
    assert RULES.class_of(stay, encounters) == "inpatient"
    assert RULES.class_of(visit, encounters) == "outpatient"
    assert RULES.class_of(_obs("1999-12-21", "stay"), encounters) == "inpatient"
    assert RULES.class_of(_obs("2010-01-01", "visit"), encounters) == "outpatient"
    assert RULES.class_of({"resourceType": "Patient"}, encounters) == "patient"
    # An inpatient record is kept 30 years from the discharge (later than its own date).
    until = RULES.until(_obs("1999-12-21", "stay"), encounters, updated)
    assert until == datetime(2030, 1, 6, tzinfo=UTC)
    assert RULES.until(_obs("2005-03-01"), encounters, updated) == datetime(2020, 3, 2, tzinfo=UTC)
    # No clinical date: counted from the last update; not retained: due at once.
    no_date = {"resourceType": "Observation"}
    assert RULES.until(no_date, encounters, updated) == datetime(2041, 1, 1, tzinfo=UTC)
    assert RULES.until({"resourceType": "Appointment"}, encounters, updated) is None
    leap = RULES.until(_obs("2004-02-29"), encounters, updated)
    assert leap is not None and (leap.month, leap.day) == (3, 1)  # end of 29 Feb, +15 years


# ---- the view and the policy (pure) ----------------------------------------------------------


def _view_with(leaves: Sequence[bytes]) -> tuple[ErasureView, RecordIndex, list[frozenset[str]]]:
    index = RecordIndex()
    view = ErasureView(index)
    seen: list[frozenset[str]] = []
    view.on_restrict(seen.append)
    for n, raw in enumerate(leaves):
        index.on_batch(n, [raw], n + 1)
        view.on_batch(n, [raw], n + 1)
    return view, index, seen


def _link(a: str, b: str) -> bytes:
    return encode_leaf(
        "link", {"from": a, "to": b, "reason": "merge", "source": "clinic", "time": T}
    )


def _restrict(p: str) -> bytes:
    return encode_leaf("key", {"action": "restrict", "patient": p, "source": "clinic", "time": T})


def test_a_restriction_covers_every_linked_pseudonym_and_calls_the_hooks() -> None:
    view, _index, seen = _view_with([_link(P1, P2), _restrict(P1)])
    assert view.restricted(P1) and view.restricted(P2)
    assert not view.restricted("c" * 64)
    assert seen == [frozenset({P1, P2})]
    assert view.restricted_pseudonyms() == {P1, P2}
    assert view.restriction_of(P2) == 1


class StandInConsent:
    """A stand-in for the consent policy: a consent that permits everything to everyone."""

    def __init__(self) -> None:
        self.asked = 0

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        self.asked += 1
        return AccessDecision(True, "stand-in consent", consent_id="stand-in")

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        return SearchFilter()


def _caller(institution: str, purpose: str = "TREAT", kind: str = "system") -> Caller:
    return Caller(
        client_id="c",
        institution=institution,
        kind=kind,  # type: ignore[arg-type]
        purpose=purpose,
        patient=P1 if kind == "patient" else None,
    )


async def test_restrict_policy_keeps_only_the_custodians_treatment_and_legal_reads() -> None:
    view, _index, _seen = _view_with([_restrict(P1)])
    inner = StandInConsent()
    policy = RestrictPolicy(inner, view, institution="clinic")
    read = AccessRequest("read", "Observation", "clinic", P1)
    for purpose in ("TREAT", "ETREAT", "HLEGAL"):
        assert (await policy.check(_caller("clinic", purpose), read)).permitted
    for caller in (_caller("hospital"), _caller("clinic", "HPAYMT"), _caller("clinic", "HRESCH")):
        with pytest.raises(AccessDeniedError) as err:
            await policy.check(caller, read)
        assert err.value.decision is not None and not err.value.decision.permitted
    # Writes, the patient's own token, internal calls and other patients: left to the inner.
    write = AccessRequest("create", "Observation", "clinic", P1)
    assert (await policy.check(_caller("clinic", "HPAYMT"), write)).permitted
    assert (await policy.check(_caller("clinic", kind="patient"), read)).permitted
    assert (await policy.check(None, read)).permitted
    other = AccessRequest("read", "Observation", "clinic", "c" * 64)
    assert (await policy.check(_caller("hospital"), other)).permitted
    # Search: the restricted patient is taken out for the refused callers only.
    assert await policy.search_filter(_caller("clinic")) == SearchFilter()
    hidden = await policy.search_filter(_caller("hospital"))
    assert hidden.consent is not None and PatientFilter(frozenset({P1}), NOTHING) in hidden.consent


def _matches(flt: SearchFilter, patient: str, custodian: str) -> bool:
    """The documented meaning of a SearchFilter's consent terms (gateway/access.py), as a
    reference for exclude_patients."""
    from gateway.consent import RecordMeta

    if flt.patients is not None and patient not in flt.patients:
        return False
    if flt.consent is None:
        return True
    meta = RecordMeta(resource_type="Observation", custodian=custodian)
    named = [t for t in flt.consent if t.patients is not None and patient in t.patients]
    terms = named or [t for t in flt.consent if t.patients is None]
    return any(t.where.matches(meta) for t in terms)


def test_exclude_patients_takes_them_out_of_every_term() -> None:
    only_clinic = In("custodian", frozenset({"clinic"}))
    filters = [
        SearchFilter(),
        SearchFilter(patients=frozenset({P1, P2})),
        SearchFilter(consent=(PatientFilter(frozenset({P1, P2}), ALL),)),
        SearchFilter(
            consent=(PatientFilter(frozenset({P1}), ALL), PatientFilter(None, only_clinic))
        ),
    ]
    for flt in filters:
        out = exclude_patients(flt, frozenset({P1}))
        for custodian in ("clinic", "hospital"):
            assert not _matches(out, P1, custodian)
            assert _matches(out, P2, custodian) == _matches(flt, P2, custodian)
            assert _matches(out, "c" * 64, custodian) == _matches(flt, "c" * 64, custodian)


# ---- end to end ------------------------------------------------------------------------------


def _patient(pid: str, hcn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": MASTER, "value": hcn}]}


def _observation(oid: str, pid: str, date: str, encounter: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": date,
        "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    }
    if encounter:
        out["encounter"] = {"reference": f"Encounter/{encounter}"}
    return out


def _bundle(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


RECORDS = [
    _patient("er-1", "ERASE-0001"),
    _patient("nb-1", "NEIGHBOUR-0001"),
    _observation("obs-old", "er-1", "2005-03-01"),  # outpatient, past 15 years
    _observation("obs-new", "er-1", "2024-06-01"),  # outpatient, kept until 2039
    {
        "resourceType": "Encounter",
        "id": "stay",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "IMP",
        },
        "subject": {"reference": "Patient/er-1"},
        "period": {"start": "1999-12-20", "end": "2000-01-05"},
    },
    _observation("obs-stay", "er-1", "1999-12-21", encounter="stay"),  # inpatient, until 2030
    {
        "resourceType": "Appointment",
        "id": "appt",
        "status": "booked",
        "start": "2027-01-10T09:00:00+08:00",
        "end": "2027-01-10T09:30:00+08:00",
        "participant": [{"actor": {"reference": "Patient/er-1"}, "status": "accepted"}],
    },
    _observation("obs-nb", "nb-1", "2005-03-01"),  # another patient's, in the same pack
]


@dataclass
class Site:
    """One started gateway app with its client (the custodian's own TREAT client)."""

    app: FastAPI
    gw: Gateway
    client: httpx.AsyncClient
    consent: StandInConsent


async def _site(stack: AsyncExitStack, settings: Any) -> Site:
    app = create_app(settings)
    await stack.enter_async_context(app.router.lifespan_context(app))
    gw: Gateway = app.state.gateway
    consent = StandInConsent()
    # The composition of the lead's wiring, with a consent that had permitted everyone.
    gw.records.policy = RestrictPolicy(
        consent, gw.erasure_view, institution=gw.settings.institution
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gw",
        headers=bearer(settings),
    )
    await stack.enter_async_context(client)
    return Site(app, gw, client, consent)


@pytest.fixture
async def site(gw_settings: Any) -> AsyncIterator[Site]:
    async with AsyncExitStack() as stack:
        yield await _site(stack, gw_settings)


async def _store(site: Site, resources: Sequence[dict[str, Any]] = RECORDS) -> None:
    r = await site.client.post("/fhir", content=json.dumps(_bundle(resources)), headers=FHIR)
    assert r.status_code == 200, r.text
    assert all(e["response"]["status"].startswith("20") for e in r.json()["entry"]), r.text


def _admin(site: Site) -> dict[str, str]:
    return bearer(
        site.gw.settings, client_id="privacy-office", scope="system/Patient.rd", purpose="HLEGAL"
    )


def _other(site: Site, institution: str = "hosp-b") -> dict[str, str]:
    return bearer(site.gw.settings, client_id="hosp-his", institution=institution)


def _anchor(gw: Gateway, rtype: str, rid: str) -> Any:
    anchor = gw.index.latest(gw.records.record_of(rtype, rid))
    assert anchor is not None
    return anchor


async def _leaves_of_kind(gw: Gateway, kind: str) -> list[dict[str, Any]]:
    raws = await gw.ledger.leaves(0, gw.ledger.size)
    return [json.loads(r) for r in raws if json.loads(r)["kind"] == kind]


async def test_erasure_restricts_at_once_and_shreds_what_is_past_retention(site: Site) -> None:
    c, gw = site.client, site.gw
    await _store(site)
    hospital = _other(site)
    assert (await c.get("/fhir/Observation/obs-new", headers=hospital)).status_code == 200
    assert _anchor(gw, "Observation", "obs-old").cid == _anchor(gw, "Observation", "obs-nb").cid
    old_key = _anchor(gw, "Observation", "obs-old").sha256
    pseudonym = _anchor(gw, "Patient", "er-1").patient
    kek_id = (await gw.backends.keys.get_wrapped_key(old_key)).kek_id

    r = await c.post("/fhir/Patient/er-1/$erase", headers=_admin(site))
    assert r.status_code == 200, r.text
    params = {p["name"]: p for p in r.json()["parameter"]}
    shredded = sorted(p["valueString"] for p in r.json()["parameter"] if p["name"] == "shredded")
    assert shredded == ["Appointment/appt", "Observation/obs-old"]
    assert params["retained"]["valueUnsignedInt"] == 4  # Patient, obs-new, stay, obs-stay
    assert params["retainedUntil"]["valueDateTime"].startswith("2030-01-06")
    assert params["keyDestroyed"]["valueBoolean"] is False
    receipt = params["receipt"]["extension"][0]["extension"]
    leaf_index = params["receipt"]["valueUnsignedInt"]
    assert receipt[0] == {"url": "leafIndex", "valueUnsignedInt": leaf_index}
    (raw,) = await gw.ledger.leaves(leaf_index, leaf_index + 1)
    assert decode_leaf(raw) == {
        "v": 1,
        "kind": "key",
        "action": "restrict",
        "patient": pseudonym,
        "source": gw.settings.institution,
        "time": decode_leaf(raw)["time"],
    }

    # Another institution is denied at once, although its consent permitted it: 404, the
    # same bytes as a record that does not exist.
    denied = await c.get("/fhir/Observation/obs-new", headers=hospital)
    missing = await c.get("/fhir/Observation/no-such", headers=hospital)
    assert denied.status_code == missing.status_code == 404
    assert denied.content == missing.content.replace(b"no-such", b"obs-new")
    # The custodian reads a retained record for treatment, not for payment.
    assert (await c.get("/fhir/Observation/obs-new")).status_code == 200
    payment = bearer(gw.settings, client_id="billing", purpose="HPAYMT")
    assert (await c.get("/fhir/Observation/obs-new", headers=payment)).status_code == 404
    # A shredded record: 410 to the custodian, 404 (as missing) to another institution.
    gone = await c.get("/fhir/Observation/obs-old")
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    assert (await c.get("/fhir/Observation/obs-old/_history/1")).status_code == 410
    other = await c.get("/fhir/Observation/obs-old", headers=hospital)
    assert other.content == missing.content.replace(b"no-such", b"obs-old")
    history = (await c.get("/fhir/Observation/obs-old/_history")).json()
    assert history["entry"] == []  # nothing left to show
    # The wrapped data key is gone: nothing can decrypt the ciphertext, whose block stays;
    # the other patient's record packed in the same block still reads.
    with pytest.raises(KeyNotFoundError):
        await gw.backends.keys.get_wrapped_key(old_key)
    with pytest.raises(KeyDestroyedError):
        await gw.pipeline.read_anchor(_anchor(gw, "Observation", "obs-old"))
    assert await gw.backends.blobs.get(_anchor(gw, "Observation", "obs-old").cid)
    neighbour = await c.get("/fhir/Observation/obs-nb", headers=hospital)
    assert neighbour.status_code == 200 and neighbour.json()["id"] == "obs-nb"
    # The erasure leaf lists the shredded ciphertexts; the patient's KEK stays (retained).
    (erasure,) = await _leaves_of_kind(gw, "erasure")
    assert set(erasure) == {"v", "kind", "patient", "records", "source", "time"}
    assert sorted(erasure["records"]) == sorted(
        _anchor(gw, t, i).record for t, i in (("Observation", "obs-old"), ("Appointment", "appt"))
    )
    assert await gw.backends.keys.kek_by_id(kek_id)
    assert not [k for k in await _leaves_of_kind(gw, "key") if k["action"] == "erasure"]
    # Asking again restricts nothing new and shreds nothing more.
    again = await c.post("/fhir/Patient/er-1/$erase", headers=_admin(site))
    params = {p["name"]: p for p in again.json()["parameter"]}
    assert params["newlyRestricted"]["valueBoolean"] is False
    assert params["receipt"]["valueUnsignedInt"] == leaf_index
    assert "shredded" not in params


async def test_the_key_goes_only_when_nothing_is_retained_and_new_records_get_a_new_one(
    gw_settings: Any,
) -> None:
    settings = gw_settings.model_copy(update={"erasure_interval_s": 0.0})  # run by hand
    async with AsyncExitStack() as stack:
        await _key_goes_last(await _site(stack, settings))
    # The blobs are unchanged: the audit re-hashes every ciphertext, shredded ones too.
    assert await run_verify(settings, blobs=True, from_checkpoint=None) == 0


async def _key_goes_last(site: Site) -> None:
    c, gw = site.client, site.gw
    await _store(site)
    r = await c.post("/fhir/Patient/er-1/$erase", headers=_admin(site))
    assert r.status_code == 200, r.text
    pseudonym = _anchor(gw, "Patient", "er-1").patient
    kek_id = (await gw.backends.keys.get_wrapped_key(_anchor(gw, "Patient", "er-1").sha256)).kek_id
    # Nothing more is due now: the job shreds nothing and keeps the key.
    assert await gw.erasure.run() == []
    assert await gw.backends.keys.kek_by_id(kek_id)
    # Years later every record is past retention: all shredded, then the key.
    gw.erasure.clock = lambda: LATER
    (result,) = await gw.erasure.run()
    assert sorted(result.shredded) == [
        "Encounter/stay",
        "Observation/obs-new",
        "Observation/obs-stay",
        "Patient/er-1",
    ]
    assert result.retained == 0 and [p for _i, p in result.keks_destroyed] == [pseudonym]
    with pytest.raises(KeyDestroyedError):
        await gw.backends.keys.kek_by_id(kek_id)
    key_leaves = [k for k in await _leaves_of_kind(gw, "key") if k["action"] == "erasure"]
    assert [(k["key_id"], k["patient"]) for k in key_leaves] == [(kek_id, pseudonym)]
    for path in ("/fhir/Observation/obs-new", "/fhir/Patient/er-1"):
        assert (await c.get(path)).status_code == 410
    assert (await c.get("/fhir/Observation/obs-nb")).status_code == 200
    assert await gw.erasure.run() == []  # nothing left to do
    # The patient comes back: a new record is sealed under a new KEK and reads (custodian,
    # treatment); the restriction still holds for everyone else.
    await _store(site, [_patient("er-1", "ERASE-0001"), _observation("obs-back", "er-1", "2026")])
    back = _anchor(gw, "Observation", "obs-back")
    new_kek = (await gw.backends.keys.get_wrapped_key(back.sha256)).kek_id
    assert back.patient == pseudonym and new_kek != kek_id
    got = await c.get("/fhir/Observation/obs-back")
    assert got.status_code == 200 and got.json()["effectiveDateTime"] == "2026"
    assert (await c.get("/fhir/Patient/er-1")).status_code == 200  # its new version
    assert (await c.get("/fhir/Observation/obs-back", headers=_other(site))).status_code == 404


async def test_the_scheduled_job_shreds_the_rest_when_retention_ends(gw_settings: Any) -> None:
    settings = gw_settings.model_copy(update={"erasure_interval_s": 0.05})
    async with AsyncExitStack() as stack:
        site = await _site(stack, settings)
        c, gw = site.client, site.gw
        await _store(site, RECORDS[:4])
        assert (await c.post("/fhir/Patient/er-1/$erase", headers=_admin(site))).status_code == 200
        assert (await c.get("/fhir/Observation/obs-new")).status_code == 200
        gw.erasure.clock = lambda: LATER  # the years pass; the job notices on its own
        status = 0
        for _ in range(200):  # at most 10 s
            status = (await c.get("/fhir/Observation/obs-new")).status_code
            if status == 410 and any(
                k["action"] == "erasure" for k in await _leaves_of_kind(gw, "key")
            ):
                break
            await asyncio.sleep(0.05)
        assert status == 410
        assert (await c.get("/fhir/Patient/er-1")).status_code == 410
        assert (await c.get("/fhir/Patient/nb-1")).status_code == 200  # another patient's


async def test_who_may_ask_for_an_erasure(site: Site) -> None:
    c, gw = site.client, site.gw
    await _store(site)
    settings = gw.settings
    no_purpose = bearer(settings, client_id="his", scope="system/Patient.rd", purpose="TREAT")
    no_scope = bearer(settings, client_id="his2", scope="system/Patient.rs", purpose="HLEGAL")
    elsewhere = bearer(
        settings, client_id="hosp", scope="system/Patient.rd", purpose="HLEGAL", institution="h"
    )
    for headers in (no_purpose, no_scope, elsewhere):
        r = await c.post("/fhir/Patient/er-1/$erase", headers=headers)
        assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden", r.text
    unknown = await c.post("/fhir/Patient/nobody/$erase", headers=_admin(site))
    assert unknown.status_code == 404
    assert not gw.erasure_view.restricted(_anchor(gw, "Patient", "er-1").patient)
    if settings.profile != "embedded":
        return  # patient tokens come from the portal on production (tested on embedded)
    stranger = bearer(settings, client_id="app", scope="patient/*.rs", patient="NEIGHBOUR-0001")
    for pid in ("er-1", "nobody"):  # another patient's, or none: refused as for reads
        r = await c.post(f"/fhir/Patient/{pid}/$erase", headers=stranger)
        assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden", r.text
    own = bearer(settings, client_id="app", scope="patient/*.rs", patient="ERASE-0001")
    r = await c.post("/fhir/Patient/er-1/$erase", headers=own)
    assert r.status_code == 200, r.text
    assert gw.erasure_view.restricted(_anchor(gw, "Patient", "er-1").patient)


# ---- a second gateway applies the restriction --------------------------------------------------


def _shared(tmp: Path, services: Any, names: Sequence[str]) -> list[Any]:
    """Settings of two institutions' gateways on one JetStream stream (one pseudonym key, one
    trust file)."""
    stream = f"T{os.urandom(6).hex().upper()}"
    pkey = os.urandom(32).hex()
    signers = {n: Signer.generate(n) for n in names}
    trust = tmp / "trust.json"
    TrustedKeys.of(signers.values()).save(trust)
    out = []
    for n in names:
        s = settings_for(
            "production",
            tmp / n,
            services,
            nats_stream=stream,
            pseudonym_key=pkey,
            trust_file=trust,
            institution=n,
        )
        signers[n].save(s.data_dir / "keys" / "signer.json")
        out.append(s)
    return out


@pytest.mark.services
async def test_a_second_gateway_applies_the_restriction_and_drops_its_caches(
    services: Any, tmp_path: Path
) -> None:
    clinic_settings, hospital_settings = (
        s.model_copy(update={"erasure_interval_s": 0.0})
        for s in _shared(tmp_path, services, ["clinic-a", "hosp-b"])
    )
    async with AsyncExitStack() as stack:
        clinic = await _site(stack, clinic_settings)
        hospital = await _site(stack, hospital_settings)
        dropped: list[frozenset[str]] = []
        hospital.gw.erasure_view.on_restrict(dropped.append)  # e.g. a consent cache
        await _store(clinic, RECORDS[:4])
        # The hospital holds records of the same patient (same master identifier) and caches
        # the patient's KEK from storing them.
        await _store(
            hospital, [_patient("h-9", "ERASE-0001"), _observation("h-obs", "h-9", "2025")]
        )
        pseudonym = _anchor(clinic.gw, "Patient", "er-1").patient
        assert _anchor(hospital.gw, "Patient", "h-9").patient == pseudonym
        assert pseudonym in hospital.gw.pipeline._keks
        clinic_reader = bearer(hospital_settings, client_id="clinic-his", institution="clinic-a")
        got = await hospital.client.get("/fhir/Observation/h-obs", headers=clinic_reader)
        assert got.status_code == 200

        r = await clinic.client.post("/fhir/Patient/er-1/$erase", headers=_admin(clinic))
        assert r.status_code == 200, r.text
        await hospital.gw.ledger.catch_up()  # the follower would within a second
        assert hospital.gw.erasure_view.restricted(pseudonym)
        assert dropped == [frozenset({pseudonym})]
        assert pseudonym not in hospital.gw.pipeline._keks
        # The hospital's gateway now refuses the clinic its records of the patient; its own
        # treatment reads go on; new records of the patient are still written there.
        got = await hospital.client.get("/fhir/Observation/h-obs", headers=clinic_reader)
        assert got.status_code == 404
        assert (await hospital.client.get("/fhir/Observation/h-obs")).status_code == 200
        await _store(hospital, [_observation("h-obs-2", "h-9", "2026")])
        assert (await hospital.client.get("/fhir/Observation/h-obs-2")).status_code == 200
        # Each custodian shreds its own records: the hospital's job, years later, its own.
        hospital.gw.erasure.clock = lambda: LATER
        (result,) = await hospital.gw.erasure.run()
        shredded = sorted(result.shredded)
        assert [s for s in shredded if not s.startswith("Provenance/")] == [
            "Observation/h-obs",
            "Observation/h-obs-2",
            "Patient/h-9",
        ]
        # and the Provenance of each of the two writes, filed under the patient
        assert sum(s.startswith("Provenance/") for s in shredded) == 2
        assert (await clinic.client.get("/fhir/Observation/obs-new")).status_code == 200
        await asyncio.sleep(0)
    for s in (clinic_settings, hospital_settings):
        assert await run_verify(s, blobs=True, from_checkpoint=None) == 0


# ---- the cron command ------------------------------------------------------------------------


def test_gateway_erasure_run_shreds_what_has_come_past_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for("embedded", tmp_path / "gw", erasure_interval_s=0)

    async def prepare() -> tuple[str, str]:
        async with AsyncExitStack() as stack:
            site = await _site(stack, settings)
            await _store(site, RECORDS[:4])
            r = await site.client.post("/fhir/Patient/er-1/$erase", headers=_admin(site))
            assert r.status_code == 200, r.text
            new = _anchor(site.gw, "Observation", "obs-new")
            return new.sha256, (await site.gw.backends.keys.get_wrapped_key(new.sha256)).kek_id

    digest, kek_id = asyncio.run(prepare())
    env = {
        "GATEWAY_DATA_DIR": str(settings.data_dir),
        "GATEWAY_INSTITUTION": settings.institution,
        "GATEWAY_MLLP_ENABLED": "false",
        # The law changed (a shorter period): everything is past retention now.
        "GATEWAY_RETENTION_YEARS": json.dumps({"outpatient": 1, "inpatient": 1}),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(cli_app, ["erasure", "run"])
    assert result.exit_code == 0, result.output
    assert "2 record(s) shredded, 1 patient key(s) destroyed" in result.output

    async def check() -> None:
        gw = Gateway(settings)
        try:
            with pytest.raises(KeyNotFoundError):
                await gw.backends.keys.get_wrapped_key(digest)
            with pytest.raises(KeyDestroyedError):
                await gw.backends.keys.kek_by_id(kek_id)
        finally:
            await gw.stop()  # never started: closes its tree files and backends

    asyncio.run(check())
    assert asyncio.run(run_verify(settings, blobs=True, from_checkpoint=None)) == 0


async def test_verify_reports_an_erasure_leaf_naming_a_record_never_anchored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for("embedded", tmp_path / "gw", erasure_interval_s=0)
    async with AsyncExitStack() as stack:
        site = await _site(stack, settings)
        await _store(site, RECORDS[:3])
        gw = site.gw
        old = _anchor(gw, "Observation", "obs-old")
        other = _anchor(gw, "Patient", "nb-1").patient
        fields = {"source": settings.institution, "time": T}
        await gw.ledger.append(
            [
                encode_leaf("erasure", {**fields, "patient": old.patient, "records": [old.record]}),
                encode_leaf("erasure", {**fields, "patient": other, "records": [old.record]}),
                encode_leaf("erasure", {**fields, "patient": old.patient, "records": ["f00d"]}),
            ]
        )
    assert await run_verify(settings, blobs=True, from_checkpoint=None) == 1
    out = capsys.readouterr().out
    assert "erasure: 0 restriction(s), 3 record(s) crypto-shredded" in out
    assert out.count("did not anchor before it under the patient the leaf names") == 2
    assert "f00d" in out and f"lists record {old.record}, which" in out


async def test_the_container_of_an_hl7_message_is_shredded_whole(tmp_path: Path) -> None:
    settings = settings_for(
        "embedded", tmp_path / "gw", erasure_interval_s=0, hl7_convert_workers=0
    )
    message = (Path(__file__).resolve().parents[2] / "fixtures/hl7v2/oru_r01_lab.hl7").read_bytes()
    async with AsyncExitStack() as stack:
        site = await _site(stack, settings)
        c, gw = site.client, site.gw
        hl7 = {"content-type": "x-application/hl7-v2+er7"}
        r = await c.post("/hl7v2", content=message, headers=hl7)
        assert r.status_code == 200 and b"MSA|CA" in r.content, r.text  # commit accept
        members = [a for a in gw.index.all_versions() if a.container is not None]
        assert len({a.container for a in members}) == 1 and len(members) > 3
        ids = []
        for anchor in members:
            resource = await gw.pipeline.read_anchor(anchor)
            ids.append(f"{anchor.resource_type}/{resource['id']}")
        pid = next(i for i in ids if i.startswith("Patient/"))
        r = await c.post(f"/fhir/{pid}/$erase", headers=_admin(site))
        params = {p["name"]: p for p in r.json()["parameter"]}
        assert r.status_code == 200 and "shredded" not in params, r.text  # all from 2026
        assert params["retained"]["valueUnsignedInt"] == len(members)
        assert (await c.get(f"/fhir/{ids[-1]}")).status_code == 200
        gw.erasure.clock = lambda: LATER
        (result,) = await gw.erasure.run()
        assert sorted(result.shredded) == sorted(ids) and result.keks_destroyed
        (erasure,) = await _leaves_of_kind(gw, "erasure")
        assert erasure["records"] == [members[0].container]  # the container, once
        for rid in ids:
            assert (await c.get(f"/fhir/{rid}")).status_code == 410, rid
    assert await run_verify(settings, blobs=True, from_checkpoint=None) == 0
