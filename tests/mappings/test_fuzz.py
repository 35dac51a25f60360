"""Mutated fixtures raise only MappingError (never another exception, never a hang):
a hypothesis property test plus a seeded run of 10,000 mutations."""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappings.errors import MappingError
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import decode, parse, split_batch
from tests.mappings.conftest import HL7_DIR

SAMPLES = [p.read_bytes() for p in sorted(HL7_DIR.glob("*.hl7"))]
DELIMITERS = b'|^~\\&\r\n"#0123456789AZ \x00\xff\xe4'
EXAMPLES = int(os.environ.get("HL7_FUZZ_EXAMPLES", "300"))


def _run(raw: bytes, options: ConversionOptions) -> str:
    """Convert one input; returns 'ok' or the error class (anything else propagates)."""
    try:
        for text in split_batch(decode(raw)):
            convert(parse(text), options=options)
        convert(parse(raw), options=options)
    except MappingError as exc:
        assert exc.hl7_code.isdigit() and exc.ack_code in ("AE", "AR")
        return type(exc).__name__
    return "ok"


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1) if data else 0
        if op == 0 and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(DELIMITERS)])
        elif op == 2 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 3:
            segments = bytes(data).split(b"\r")
            i, j = rng.randrange(len(segments)), rng.randrange(len(segments))
            segments.insert(j, segments[i])
            data = bytearray(b"\r".join(segments))
        elif op == 4:
            segments = bytes(data).split(b"\r")
            if len(segments) > 1:
                del segments[rng.randrange(1, len(segments))]
            data = bytearray(b"\r".join(segments))
        else:
            data = data[:pos]
    return bytes(data)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(list(DELIMITERS)), st.integers(0, 3)),
        min_size=1,
        max_size=6,
    ),
)
def test_hypothesis_mutations_raise_only_mapping_errors(
    sample: bytes, edits: list[tuple[int, int, int]], options: ConversionOptions
) -> None:
    data = bytearray(sample)
    for pos, byte, op in edits:
        pos %= len(data) + 1
        if op == 0:
            data[pos:pos] = bytes([byte])
        elif op == 1:
            del data[pos : pos + 1]
        elif op == 2 and pos < len(data):
            data[pos] = byte
        else:
            data[pos:pos] = b"\r"
    assert _run(bytes(data), options) in {
        "ok",
        "ParseError",
        "UnsupportedMessageError",
        "MessageContentError",
        "MappingError",
        "DictionaryError",
    }


def test_ten_thousand_seeded_mutations(options: ConversionOptions) -> None:
    rng = random.Random(20260315)
    outcomes: dict[str, int] = {}
    for _ in range(10_000):
        outcome = _run(_mutate(rng, rng.choice(SAMPLES)), options)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) == 10_000
    # the mutations must exercise both paths: some still convert, some are rejected
    assert outcomes.get("ok", 0) > 100 and outcomes.get("ParseError", 0) > 100
    assert outcomes.get("MessageContentError", 0) > 10
