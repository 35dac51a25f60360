"""Per-sender policy on HL7 v2 input (``Settings.sender_profiles``, keyed ``MSH-3^MSH-4``, then
``*^MSH-4``, then ``MSH-3^*``): a value that does not fit its type is kept as text with a
warning (AA with an ERR of severity W) unless the sender is strict; a patient without the
master identifier is rejected (AE 101 at PID-3) when the sender's profile says so.

The adverse-event report below is written for these tests: it follows the structure of the
vaccine adverse-event ORU^R01 of CDC's HL7 2.5.1 VAERS implementation guide (a report OBR,
then OBX of types NM, CE and TX, one NM value not a number), but it is not the CDC sample (no
fetchable package ships that one) and all its values are invented.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.config import SenderProfile
from gateway.hl7.dedup import _key as _dedup_key
from mappings.v2.parse import parse
from tests.gateway.hl7.test_ingest import App, _settings, msa

ADVERSE_EVENT = (
    b"MSH|^~\\&|VAXREP|CLINIC-Q|GATEWAY|ALLIANCE|20260402101500+0800||ORU^R01^ORU_R01|"
    b"AE-0001|P|2.5.1||||||UNICODE UTF-8\r"
    b"PID|1||Q77001^^^CLINICQ^MR||Test^Patient||19700101|F\r"
    b"OBR|1||AER-0001|RPT^Adverse event report^L|||20260401120000\r"
    b"OBX|1|NM|AGE^Age at vaccination^L||56|a^year^UCUM||||||F\r"
    b"OBX|2|NM|DUR^Hours from vaccination to onset^L||unknown, next day|h^hour^UCUM||||||F\r"
    b"OBX|3|CE|SEV^Seriousness^L||N^Not serious^HL70136||||||F\r"
    b"OBX|4|TX|DESC^Description^L||Sore arm and low fever||||||F\r"
)

WITH_MASTER = ADVERSE_EVENT.replace(
    b"Q77001^^^CLINICQ^MR", b"Q77001^^^CLINICQ^MR~H9900001^^^HCN^HC", 1
).replace(b"|AE-0001|", b"|AE-0002|", 1)


def err_segments(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s.startswith("ERR")]


@pytest.fixture
async def make_gw(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    services = request.getfixturevalue("services") if profile == "production" else None
    apps: list[tuple[Any, App]] = []

    async def make(**extra: Any) -> App:
        settings = _settings(profile, tmp_path / f"gw{len(apps)}", services)
        settings = settings.model_copy(update=extra)
        app = create_app(settings)
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        a = App(app)
        apps.append((ctx, a))
        return a

    yield make
    for ctx, a in reversed(apps):
        await a.http.aclose()
        await ctx.__aexit__(None, None, None)


async def test_value_not_fitting_its_type_is_kept_as_text_and_warned(make_gw: Any) -> None:
    gw = await make_gw()
    ack = await gw.send(ADVERSE_EVENT)
    assert msa(ack)[1:3] == ["AA", "AE-0001"]
    (err,) = err_segments(ack)
    assert err[2] == "OBX^2^5^1" and err[3].startswith("102^") and err[4] == "W"
    assert b"unknown" not in ack and b"next day" not in ack  # never the value
    assert b"\rZRC|" in ack
    # FHIR: the Observation carries the value as text, and a note saying so.
    result = gw.app.state.hl7.converter
    outcome = await result.convert(ADVERSE_EVENT)
    observations = [r for r in outcome.resources() if r["resourceType"] == "Observation"]
    stored = (await gw.http.get(f"/fhir/Observation/{observations[1]['id']}")).json()
    assert stored["valueString"] == "unknown, next day" and "valueQuantity" not in stored
    assert "NM" in stored["note"][0]["text"]
    first = (await gw.http.get(f"/fhir/Observation/{observations[0]['id']}")).json()
    assert first["valueQuantity"]["value"] == 56
    # Stored but its acceptance forgotten (a crash): the re-sent copy's AA has the same ERR.
    size = gw.gw.ledger.size
    await gw.app.state.hl7.dedup.stop()
    await gw.gw.backends.state.delete(_dedup_key("CLINIC-Q", "AE-0001"))
    await gw.app.state.hl7.dedup.start()
    again = await gw.send(ADVERSE_EVENT)
    assert msa(again)[1] == "AA" and err_segments(again) == err_segments(ack)
    assert gw.gw.ledger.size == size


@pytest.mark.parametrize("key", ["VAXREP^CLINIC-Q", "*^CLINIC-Q", "VAXREP^*"])
async def test_strict_sender_gets_ae_102(make_gw: Any, key: str) -> None:
    gw = await make_gw(sender_profiles={key: SenderProfile(strict_types=True)})
    size = gw.gw.ledger.size
    ack = await gw.send(ADVERSE_EVENT)
    assert msa(ack)[1] == "AE"
    (err,) = err_segments(ack)
    assert err[2] == "OBX^2^5^1" and err[3].startswith("102^") and err[4] == "E"
    assert gw.gw.ledger.size == size
    # Another sender (other application and facility) is not affected.
    other = ADVERSE_EVENT.replace(b"|VAXREP|CLINIC-Q|", b"|OTHER|CLINIC-R|", 1)
    assert msa(await gw.send(other))[1] == "AA"


async def test_most_specific_profile_wins(make_gw: Any) -> None:
    gw = await make_gw(
        sender_profiles={
            "VAXREP^CLINIC-Q": SenderProfile(strict_types=False),
            "*^CLINIC-Q": SenderProfile(strict_types=True),
        }
    )
    assert msa(await gw.send(ADVERSE_EVENT))[1] == "AA"


async def test_missing_master_identifier_rejected_by_policy(make_gw: Any) -> None:
    gw = await make_gw(sender_profiles={"*^CLINIC-Q": SenderProfile(missing_master_id="reject")})
    size = gw.gw.ledger.size
    ack = await gw.send(ADVERSE_EVENT)
    assert msa(ack)[1:3] == ["AE", "AE-0001"]
    (err,) = err_segments(ack)
    assert err[2] == "PID^1^3^1" and err[3].startswith("101^") and err[4] == "E"
    assert b"Q77001" not in ack
    assert gw.gw.ledger.size == size
    # With the master identifier the same sender's message is accepted.
    assert parse(WITH_MASTER).control_id == "AE-0002"
    assert msa(await gw.send(WITH_MASTER))[1] == "AA"
    # The default policy keeps a provisional identity.
    lenient = await make_gw()
    assert msa(await lenient.send(ADVERSE_EVENT))[1] == "AA"
