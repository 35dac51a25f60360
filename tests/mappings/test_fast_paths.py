"""The fast paths of the hot conversion path agree with the general code they shortcut:
Segment.text/rep against value/reps, the numeric fast path of decimal, the HMAC of
stable_id, and the options' memo (shared values are copied, repeated conversions agree)."""

from __future__ import annotations

import hmac
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from mappings.errors import MappingError
from mappings.v2 import datatypes as dt
from mappings.v2.common import ConversionOptions, stable_id
from mappings.v2.convert import convert
from mappings.v2.parse import Segment, comp, comps, parse
from tests.mappings.conftest import HL7_DIR

_PIECES = ["a", "B1", "", '""', "^", "~", "&", "\\F\\", "\\X41\\", "\\XZZ\\", "\\", "x y", "张"]


def _outcome(fn: Callable[..., object], *args: object) -> object:
    try:
        return ("ok", fn(*args))
    except MappingError as exc:
        return ("error", type(exc).__name__, exc.hl7_code)


def _text_by_value(seg: Segment, n: int, component: int, sub: int) -> str:
    return seg.value(n, component, sub) or ""


def _segments(count: int) -> list[Segment]:
    rng = random.Random(20260315)
    out = []
    for _ in range(count):
        fields = ["".join(rng.choices(_PIECES, k=rng.randint(0, 6))) for _ in range(6)]
        out.append(parse("MSH|^~\\&|A|F|B|G|20260101||ADT^A08|C1|P|2.5\rZZZ|" + "|".join(fields)))
    return [m.segments[1] for m in out]


@pytest.mark.parametrize("seg", _segments(400))
def test_text_and_rep_agree_with_value_and_reps(seg: Segment) -> None:
    for n, component, sub in itertools.product(range(8), (1, 2, 3), (1, 2)):
        expected = _outcome(_text_by_value, seg, n, component, sub)
        assert _outcome(seg.text, n, component, sub) == expected
    for n in range(8):
        reps = _outcome(seg.reps, n)
        first = ("ok", reps[1][0] if reps[1] else None) if reps[0] == "ok" else reps  # type: ignore[index]
        assert _outcome(seg.rep, n) == first


def test_comps_pads_like_comp() -> None:
    rep = [["a", "x"], [""], ["c"]]
    assert comps(rep, 5) == [comp(rep, i) for i in range(1, 6)]
    assert comps(None, 2) == ["", ""]
    assert comps(rep, 2) == ["a", ""]


@pytest.mark.parametrize(
    "value", ["12", "007", "3.2", "3.0", "3.", ".5", "-1.5", " 4 ", "1.2.3", "١٢", "", "x", "1e5"]
)
def test_decimal_fast_path_matches_the_regex(value: str) -> None:
    match = dt._NM.match(value)
    if match is None or not (match.group(2) or match.group(3)):
        with pytest.raises(MappingError):
            dt.decimal(value)
        return
    sign, whole, frac = match.groups()
    number = (sign or "") + (whole or "0") + (f".{frac}" if frac else "")
    expected = float(number) if frac else int(number)
    assert dt.decimal(value) == expected and type(dt.decimal(value)) is type(expected)


@pytest.mark.parametrize("secret", [b"", b"k" * 32, b"x" * 64, b"y" * 65, bytes(range(200))])
def test_stable_id_is_hmac_sha256(secret: bytes) -> None:
    options = ConversionOptions(institution="inst", id_secret=secret)
    data = "\x1f".join(("inst", "Patient", "urn:x", "42")).encode()
    expected = hmac.digest(secret, data, "sha256").hex()[:32]
    assert stable_id(options, "Patient", "urn:x", "42") == expected


def test_memo_values_are_copied_and_not_carried_by_replace(options: ConversionOptions) -> None:
    raw = (HL7_DIR / "oru_r01_lab.hl7").read_bytes()
    opts = replace(options)
    assert opts.memo == {} and opts.memo is not options.memo
    first = convert(parse(raw), options=opts)
    assert opts.memo
    snapshot = json.dumps(first.resources, sort_keys=True)
    for res in first.resources:  # callers may modify what they get back, in place
        for coding in res.get("code", {}).get("coding", []):
            coding["code"] = "CHANGED"
        for ref_range in res.get("referenceRange", []):
            ref_range.get("low", {}).clear()
            ref_range.clear()
    second = convert(parse(raw), options=opts)
    assert json.dumps(second.resources, sort_keys=True) == snapshot
