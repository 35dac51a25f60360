"""Conversion workers: the same outcome as converting in-process, errors described exactly,
and a worker that dies costs its batch an AE, not the gateway."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import orjson
import pytest

from gateway.hl7_workers import ConversionWorkers, Converted, Crashed, Failed, convert_one
from mappings.errors import MappingError
from mappings.terminology import Terminology
from mappings.v2.common import ConversionOptions
from mappings.v2.convert import convert
from mappings.v2.parse import parse

HL7 = Path(__file__).resolve().parents[2] / "fixtures" / "hl7v2"
_O = json.loads((HL7 / "options.json").read_text())
OPTIONS = ConversionOptions(
    default_tz=_O["default_tz"],
    master_id_system=_O["master_id_system"],
    institution=_O["institution"],
    authority_systems=_O["authority_systems"],
    terminology=Terminology.load_default(),
    id_secret=b"k" * 32,
)
ORU = (HL7 / "oru_r01_lab.hl7").read_bytes()
NO_PATIENT = b"MSH|^~\\&|LIS|HOSPA|GW|ALLIANCE|20260315113000||ORU^R01|N-1|P|2.5.1\rOBR|1\r"


def test_converted_matches_in_process_conversion() -> None:
    outcome = convert_one(ORU, OPTIONS)
    assert isinstance(outcome, Converted)
    expected = convert(parse(ORU), options=OPTIONS)
    assert outcome.resource_list() == orjson.loads(orjson.dumps(expected.resources))
    assert list(outcome.patient_identifiers) == expected.patient_identifiers
    assert outcome.master_identifier == expected.master_identifier


def test_failed_carries_the_mapping_error_exactly() -> None:
    with pytest.raises(MappingError) as err:
        convert(parse(NO_PATIENT), options=OPTIONS)
    outcome = convert_one(NO_PATIENT, OPTIONS)
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
    conv = ConversionWorkers(OPTIONS, workers=workers)
    await conv.start()
    try:
        ok, bad = await conv.convert(ORU), await conv.convert(NO_PATIENT)
    finally:
        await conv.stop()
    assert ok == convert_one(ORU, OPTIONS)
    assert bad == convert_one(NO_PATIENT, OPTIONS)


async def test_a_dead_worker_fails_its_batch_and_is_replaced() -> None:
    conv = ConversionWorkers(OPTIONS, workers=1)
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
