"""Conversion workers: the same outcome as converting in-process, errors described exactly,
and a worker that dies costs its batch an AE, not the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from gateway.crypto import pseudonym, record_id
from gateway.hl7.workers import (
    ConversionWorkers,
    Converted,
    Crashed,
    Failed,
    MessagePolicy,
    convert_one,
)
from mappings.errors import MappingError
from mappings.terminology import Terminology
from mappings.v2.common import ConversionOptions
from mappings.v2.convert import convert
from mappings.v2.parse import parse

HL7 = Path(__file__).resolve().parents[3] / "fixtures" / "hl7v2"
_O = json.loads((HL7 / "options.json").read_text())
OPTIONS = ConversionOptions(
    default_tz=_O["default_tz"],
    master_id_system=_O["master_id_system"],
    institution=_O["institution"],
    authority_systems=_O["authority_systems"],
    terminology=Terminology.load_default(),
    id_secret=b"k" * 32,
)
KEY = b"p" * 32
ORU = (HL7 / "oru_r01_lab.hl7").read_bytes()
NO_PATIENT = b"MSH|^~\\&|LIS|HOSPA|GW|ALLIANCE|20260315113000||ORU^R01|N-1|P|2.5.1\rOBR|1\r"


def test_converted_is_the_conversion_plus_original_and_provenance() -> None:
    outcome = convert_one(ORU, OPTIONS, KEY)
    assert isinstance(outcome, Converted)
    expected = convert(parse(ORU), options=OPTIONS)
    converted = orjson.loads(orjson.dumps(expected.resources))
    resources = outcome.resources()
    assert resources[: len(converted)] == converted
    binary, provenance = resources[len(converted) :]
    assert binary["resourceType"] == "Binary"
    assert base64.b64decode(binary["data"]) == ORU
    assert provenance["entity"] == [
        {"role": "source", "what": {"reference": f"Binary/{binary['id']}"}}
    ]
    assert len(provenance["target"]) == len(converted)
    for entry in outcome.entries:
        assert entry.record == record_id(KEY, OPTIONS.institution, entry.type, entry.id)
        assert b'"meta"' not in entry.body  # the pipeline sets meta
    patient = next(r for r in converted if r["resourceType"] == "Patient")
    # The fixture's patient carries the master identifier: the pseudonym is its HMAC.
    assert OPTIONS.master_id_system is not None
    master = next(i for i in patient["identifier"] if i["system"] == OPTIONS.master_id_system)
    assert outcome.patient == pseudonym(KEY, OPTIONS.master_id_system, master["value"])
    # Stable: the same message gives the same container and resource ids.
    again = convert_one(ORU, OPTIONS, KEY)
    assert isinstance(again, Converted)
    assert again.container_id == outcome.container_id
    assert [e[:3] for e in again.entries] == [e[:3] for e in outcome.entries]


def test_merge_gives_aliases_of_the_prior_patient_and_identity_flags() -> None:
    """A40: ``aliases`` are the pseudonyms of the prior patient's identifiers (MRG-1) and of
    the patient's own other identifiers; the master identifier makes it not provisional."""
    outcome = convert_one((HL7 / "adt_a40.hl7").read_bytes(), OPTIONS, KEY)
    assert isinstance(outcome, Converted)
    master = OPTIONS.master_id_system
    assert master is not None
    hospa = OPTIONS.authority_systems["HOSPA"]
    assert outcome.patient == pseudonym(KEY, master, "H3101011985050512X")
    assert not outcome.provisional and outcome.warnings == ()
    assert set(outcome.aliases) == {
        pseudonym(KEY, hospa, "MRN000123"),  # the survivor's other identifier
        pseudonym(KEY, hospa, "MRN000999"),  # the prior patient's
        pseudonym(KEY, hospa, "T0000777"),
    }
    assert outcome.patient not in outcome.aliases
    # A patient known only by a facility's record number is provisional.
    local = ORU.replace(b"~H3101011985050512X^^^HCN^HC", b"", 1)
    provisional = convert_one(local, OPTIONS, KEY)
    assert isinstance(provisional, Converted) and provisional.provisional
    assert provisional.patient == pseudonym(KEY, hospa, "MRN000123")
    rejected = convert_one(local, OPTIONS, KEY, MessagePolicy(reject_provisional=True))
    assert isinstance(rejected, Failed)
    assert (rejected.ack_code, rejected.hl7_code, rejected.segment, rejected.field) == (
        "AE",
        "101",
        "PID",
        3,
    )


def test_failed_carries_the_mapping_error_exactly() -> None:
    with pytest.raises(MappingError) as err:
        convert(parse(NO_PATIENT), options=OPTIONS)
    outcome = convert_one(NO_PATIENT, OPTIONS, KEY)
    assert isinstance(outcome, Failed)
    exc = err.value
    assert (outcome.ack_code, outcome.hl7_code, outcome.text) == (
        exc.ack_code,
        exc.hl7_code,
        str(exc),
    )
    assert (outcome.segment, outcome.segment_index, outcome.field) == (
        exc.segment,
        exc.segment_index,
        exc.field,
    )


@pytest.mark.parametrize("workers", [0, 1])
async def test_pool_and_inline_give_the_same_outcomes(workers: int) -> None:
    conv = ConversionWorkers(OPTIONS, pseudonym_key=KEY, workers=workers)
    await conv.start()
    try:
        ok, bad = await conv.convert(ORU), await conv.convert(NO_PATIENT)
    finally:
        await conv.stop()
    inline = convert_one(ORU, OPTIONS, KEY)
    assert isinstance(ok, Converted) and isinstance(inline, Converted)
    # Equal but for the Provenance's ``recorded`` time.
    assert ok.resources()[:-1] == inline.resources()[:-1]
    assert ok.entries[-1][:3] == inline.entries[-1][:3]
    assert (ok.patient, ok.container_id) == (inline.patient, inline.container_id)
    assert bad == convert_one(NO_PATIENT, OPTIONS, KEY)


async def test_a_batch_split_over_workers_comes_back_whole_and_in_order() -> None:
    """Concurrent messages are converted as one batch split over both workers; each caller
    gets the outcome of its own message."""
    control = ORU.split(b"|")[9]
    raws = [ORU.replace(control, b"SPLIT-%d" % i, 1) for i in range(9)] + [NO_PATIENT]
    conv = ConversionWorkers(OPTIONS, pseudonym_key=KEY, workers=2)
    await conv.start()
    try:
        assert conv._pool is not None and len(conv._pool._processes) == 2
        outcomes = await asyncio.gather(*(conv.begin(raw) for raw in raws))
    finally:
        await conv.stop()
    for raw, outcome in zip(raws, outcomes, strict=True):
        inline = convert_one(raw, OPTIONS, KEY)
        if isinstance(inline, Converted):
            assert isinstance(outcome, Converted)
            assert outcome.container_id == inline.container_id
        else:
            assert outcome == inline
    assert len({o.container_id for o in outcomes if isinstance(o, Converted)}) == 9


async def test_a_dead_worker_fails_its_batch_and_is_replaced() -> None:
    conv = ConversionWorkers(OPTIONS, pseudonym_key=KEY, workers=1)
    await conv.start()
    try:
        assert conv._pool is not None
        (pid,) = list(conv._pool._processes)  # the pool's one worker
        os.kill(pid, signal.SIGKILL)
        outcome = await conv.convert(ORU)
        assert isinstance(outcome, Crashed) and outcome.error == "BrokenProcessPool"
        assert isinstance(await conv.convert(ORU), Converted), "the pool was not replaced"
    finally:
        await conv.stop()
    assert isinstance(await conv.convert(ORU), Crashed), "a stopped converter must say so"


@pytest.mark.parametrize("path", sorted(HL7.glob("*.hl7")), ids=lambda p: p.name)
def test_every_fixture_is_prepared_or_refused_never_crashes(path: Path) -> None:
    """Preparing refuses a converted resource with ``meta`` (the pipeline sets it): no fixture
    may hit that, nor any other defect."""
    outcome = convert_one(path.read_bytes(), OPTIONS, KEY)
    assert isinstance(outcome, Converted | Failed), outcome


def test_a_worker_exits_when_its_gateway_process_is_killed(tmp_path: Path) -> None:
    """A gateway killed with SIGKILL must not leave its conversion worker behind."""
    script = tmp_path / "gw.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})\n"
        "from tests.gateway.hl7.test_workers import OPTIONS, KEY\n"
        "from gateway.hl7.workers import ConversionWorkers\n"
        "async def main():\n"
        "    conv = ConversionWorkers(OPTIONS, pseudonym_key=KEY, workers=1)\n"
        "    await conv.start()\n"
        "    print(*conv._pool._processes, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    gw = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert gw.stdout is not None
        (worker,) = [int(p) for p in gw.stdout.readline().split()]
        os.kill(worker, 0)  # alive while the gateway is
        gw.kill()
        gw.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the conversion worker outlived its killed gateway process")
    finally:
        gw.kill()
        gw.wait(timeout=10)
        if gw.stdout is not None:
            gw.stdout.close()


@pytest.mark.parametrize(
    # Every single-message fixture (a batch file is split into its messages before this).
    "name",
    sorted(p.name for p in HL7.glob("*.hl7") if not p.name.startswith("batch_")),
)
def test_index_rows_are_those_of_the_stored_resource(name: str) -> None:
    """The index rows a worker computes beside each resource equal what ``extract`` gives
    for the resource as the pipeline stores it (its ``meta`` members and lastUpdated set):
    the gateway indexes HL7 messages from the rows, ``gateway reindex`` from the stored
    resources, and both must agree."""
    from zoneinfo import ZoneInfo

    from gateway.pipeline import with_meta
    from gateway.search.extract import entry_of_rows, extract, last_updated_of

    outcome = convert_one((HL7 / name).read_bytes(), OPTIONS, KEY, index=True)
    if not isinstance(outcome, Converted):
        raise AssertionError(f"{name} is not converted: {outcome}")
    assert len(outcome.index) == len(outcome.entries)
    updated = "2026-12-01T08:00:00.123Z"
    meta = b'"meta":{"lastUpdated":"%s"}' % updated.encode()
    for entry, rows in zip(outcome.entries, outcome.index, strict=True):
        stored_meta = meta if not entry.meta else b"%s,%s}" % (meta[:-1], entry.meta)
        resource = orjson.loads(with_meta(entry.body, stored_meta))
        expected = extract(
            resource,
            custodian="c",
            record=entry.record,
            version=3,
            patient="p",
            key=KEY,
            tz=ZoneInfo(OPTIONS.default_tz),
        )
        got = entry_of_rows(
            rows,
            custodian="c",
            record=entry.record,
            version=3,
            patient="p",
            last_updated=last_updated_of(updated),
        )
        # The rows keep tuples (what the workers send), extract() lists: same values.
        got.tokens, got.refs, got.labels = list(got.tokens), list(got.refs), list(got.labels)
        assert got == expected, entry.type


def test_unmapped_codes_tag_their_resources_only() -> None:
    """The fixture's two local codes no map has (HBSAG, COMMENT of HOSPA's table L) are
    reported and only the Observations carrying them are tagged."""
    outcome = convert_one(ORU, OPTIONS, KEY)
    assert isinstance(outcome, Converted)
    system = "urn:alliance:facility:HOSPA:cs:L"
    assert outcome.unmapped == ((system, "HBSAG"), (system, "COMMENT"))
    assert outcome.source == "HOSPA"
    tagged = [e for e in outcome.entries if e.meta]
    assert {e.type for e in tagged} == {"Observation"} and len(tagged) == 2
    for e in tagged:
        assert orjson.loads(e.body)["code"]["coding"][0]["system"] == system
        assert b'"dictionary-unmapped"' in e.meta
    assert outcome.index == ()  # rows only when asked for
    rejected = convert_one(ORU, OPTIONS, KEY, MessagePolicy(reject_unmapped=True))
    assert isinstance(rejected, Failed)
    assert (rejected.hl7_code, rejected.segment, rejected.segment_index, rejected.field) == (
        "103",
        "OBX",
        4,
        3,
    )
    assert "'HBSAG'" in rejected.text and system in rejected.text
