"""Errors map to the right HL7 code (table 0357), acknowledgement code and location, and
never carry patient data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mappings.errors import MappingError, MessageContentError, ParseError, UnsupportedMessageError
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import parse
from tests.mappings.conftest import HL7_DIR

HEADER = "MSH|^~\\&|HIS|HOSPA|GW|ALL|20260101||{type}|{cid}|{pid}|{ver}\r"
PID = "PID|1||SECRET-MRN^^^HOSPA^MR||王^秘密||19800101|F\r"


def _convert(text: str, options: ConversionOptions) -> None:
    convert(parse(text.encode()), options=options)


def _header(type_: str = "ADT^A01", cid: str = "C1", pid: str = "P", ver: str = "2.5") -> str:
    return HEADER.format(type=type_, cid=cid, pid=pid, ver=ver)


@pytest.mark.parametrize(
    ("header", "cls", "code", "field", "component"),
    [
        (_header(type_="QBP^Q22"), UnsupportedMessageError, "200", 9, 1),
        (_header(type_="ADT^A17"), UnsupportedMessageError, "201", 9, 2),
        (_header(pid="X"), UnsupportedMessageError, "202", 11, None),
        (_header(ver="2.2"), UnsupportedMessageError, "203", 12, None),
        (_header(ver="3.0"), UnsupportedMessageError, "203", 12, None),
        (_header(type_=""), ParseError, "101", 9, None),
        (_header(cid=""), ParseError, "101", 10, None),
    ],
)
def test_header_errors_are_rejected(
    header: str,
    cls: type[MappingError],
    code: str,
    field: int,
    component: int | None,
    options: ConversionOptions,
) -> None:
    with pytest.raises(cls) as info:
        _convert(header + PID, options)
    err = info.value
    assert (err.hl7_code, err.ack_code, err.segment, err.field) == (code, "AR", "MSH", field)
    assert err.component == component


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5.1", "2.6", "2.7.1", "2.8"])
def test_supported_versions(version: str, options: ConversionOptions) -> None:
    _convert(_header(ver=version) + PID, options)


@pytest.mark.parametrize(
    ("body", "code", "segment", "index", "field"),
    [
        ("PID|1||||王^秘密\r", "101", "PID", 1, 3),
        ("PV1|1|I\r", "101", "PID", None, None),
        (PID.replace("19800101", "19801301"), "102", "PID", 1, 7),
        (PID + "PV1|1|I" + "|" * 42 + "2026xx\r", "102", "PV1", 1, 44),
    ],
)
def test_content_errors(
    body: str,
    code: str,
    segment: str,
    index: int | None,
    field: int | None,
    options: ConversionOptions,
) -> None:
    with pytest.raises(MessageContentError) as info:
        _convert(_header() + body, options)
    err = info.value
    assert (err.hl7_code, err.ack_code) == (code, "AE")
    assert (err.segment, err.segment_index, err.field) == (segment, index, field)
    assert err.control_id == "C1"
    assert "SECRET" not in str(err) and "秘密" not in str(err) and "1980" not in str(err)


def test_oru_errors_locate_the_obx(options: ConversionOptions) -> None:
    text = (
        _header(type_="ORU^R01")
        + PID
        + "OBR|1||F1|GLU^Glucose^ALB\rOBX|1|NM|GLU^Glucose^ALB||7.8||||||F\r"
        + "OBX|2|NM|K^Potassium^ALB||high||||||F\r"
    )
    with pytest.raises(MessageContentError) as info:
        _convert(text, replace(options, strict_types=True))
    err = info.value
    assert (err.hl7_code, err.segment, err.segment_index, err.field) == ("102", "OBX", 2, 5)
    assert err.location == "OBX[2]-5"
    missing_code = _header(type_="ORU^R01") + PID + "OBR|1||F1|\r"
    with pytest.raises(MessageContentError) as info:
        _convert(missing_code, options)
    assert (info.value.hl7_code, info.value.segment, info.value.field) == ("101", "OBR", 4)


def test_value_that_does_not_fit_its_type_is_kept_as_text_with_a_warning(
    options: ConversionOptions,
) -> None:
    text = (
        _header(type_="ORU^R01")
        + PID
        + "OBR|1||F1|GLU^Glucose^ALB\rOBX|1|NM|GLU^Glucose^ALB||7.8||||||F\r"
        + "OBX|2|NM|K^Potassium^ALB||SECRET high||||||F\r"
    )
    result = convert(parse(text.encode()), options=options)
    (warning,) = result.warnings
    assert (warning.hl7_code, warning.segment, warning.segment_index, warning.field) == (
        "102",
        "OBX",
        2,
        5,
    )
    assert "SECRET" not in warning.text and "NM" in warning.text
    observations = [r for r in result.resources if r["resourceType"] == "Observation"]
    assert observations[0]["valueQuantity"]["value"] == 7.8 and "note" not in observations[0]
    assert observations[1]["valueString"] == "SECRET high"
    assert "valueQuantity" not in observations[1] and "NM" in observations[1]["note"][0]["text"]
    # The per-message override of the options (a sender's strict profile) rejects it.
    with pytest.raises(MessageContentError):
        convert(parse(text.encode()), options=options, strict_types=True)


def test_strict_policy_rejects_unmapped_local_codes(options: ConversionOptions) -> None:
    raw = (HL7_DIR / "oru_r01_local_codes.hl7").read_bytes()
    convert(parse(raw), options=options)  # lenient: kept as sent
    with pytest.raises(MessageContentError) as info:
        convert(parse(raw), options=replace(options, strict_codes=True))
    assert (info.value.hl7_code, info.value.segment, info.value.field) == ("103", "OBR", 4)
    mapped = (HL7_DIR / "oru_r01_lab.hl7").read_bytes()
    strict_lab = replace(options, strict_codes=True)
    with pytest.raises(MessageContentError) as info:
        convert(parse(mapped), options=strict_lab)
    # OBX 4 carries a local (L) code the dictionary does not know
    assert (info.value.segment, info.value.segment_index, info.value.field) == ("OBX", 4, 3)


def test_error_str_and_root() -> None:
    err = ParseError("x", segment="PID", segment_index=2, field=3, component=4, repetition=2)
    assert err.location == "PID[2]-3(2).4"
    assert isinstance(err, MappingError) and err.severity == "E"
    assert MessageContentError("y").hl7_code == "101"
