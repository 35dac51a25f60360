"""Decoding (MSH-18 character sets), splitting, escapes, null vs empty, batches."""

from __future__ import annotations

import pytest

from mappings.errors import ParseError
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import decode, detect_charset, parse, parse_header, split_batch
from tests.mappings.conftest import HL7_DIR


def _msg(charset: str, name: str = "张^三") -> str:
    return (
        f"MSH|^~\\&|HIS|HOSPB|GW|ALL|20260101||ADT^A04|C1|P|2.5||||||{charset}\r"
        f"PID|1||123||{name}||||||\r"
    )


def test_gb18030_chinese_name_round_trip(options: ConversionOptions) -> None:
    raw = (HL7_DIR / "adt_a01_gb18030.hl7").read_bytes()
    assert "张^三".encode("gb18030") in raw and "张".encode() not in raw
    result = convert(parse(raw), options=options)
    patient = next(r for r in result.resources if r["resourceType"] == "Patient")
    name = patient["name"][0]
    assert name["family"] + "".join(name["given"]) == "张三"
    assert (name["family"] + "".join(name["given"])).encode("gb18030") == "张三".encode("gb18030")


@pytest.mark.parametrize("charset", ["GB 18030-2000", "GB18030", "gb18030"])
def test_gb18030_spellings(charset: str) -> None:
    raw = _msg(charset).encode("gb18030")
    assert parse(raw).first("PID").text(5) == "张"  # type: ignore[union-attr]


def test_utf8_and_default() -> None:
    assert parse(_msg("UNICODE UTF-8").encode()).first("PID").text(5, 2) == "三"  # type: ignore[union-attr]
    assert detect_charset(_msg("").encode()) == ("", "utf-8")


def test_latin1() -> None:
    raw = _msg("8859/1", "Müller^José").encode("latin-1")
    assert parse(raw).first("PID").text(5) == "Müller"  # type: ignore[union-attr]


def test_msh18_detected_after_batch_header_and_bom() -> None:
    raw = b"\xef\xbb\xbf" + b"FHS|^~\\&\rBHS|^~\\&\r" + _msg("GB 18030-2000").encode("gb18030")
    assert "张" in decode(raw)


def test_undecodable_bytes_are_a_parse_error() -> None:
    raw = _msg("ASCII", "Müller").encode("utf-8")
    with pytest.raises(ParseError) as info:
        decode(raw)
    assert info.value.hl7_code == "102" and info.value.segment == "PID"
    assert info.value.ack_code == "AR"
    assert "Müller" not in str(info.value)


def test_unknown_charset() -> None:
    with pytest.raises(ParseError) as info:
        parse(_msg("EBCDIC").encode())
    assert (info.value.hl7_code, info.value.field) == ("103", 18)


def test_header_fields() -> None:
    msg = parse((HL7_DIR / "oru_r01_lab.hl7").read_bytes())
    assert msg.control_id == "LIS20260315-0001"
    assert msg.message_type == "ORU^R01" and msg.structure == "ORU_R01"
    assert msg.version == "2.5.1" and msg.processing_id == "P"
    assert (msg.sending_app, msg.sending_facility) == ("LIS", "HOSPA")
    assert (msg.receiving_app, msg.receiving_facility) == ("GATEWAY", "ALLIANCE")
    assert (msg.accept_ack_type, msg.app_ack_type) == ("AL", "NE")
    assert msg.charset == "UNICODE UTF-8" and msg.encoding_characters == "^~\\&"
    assert [s.name for s in msg.all("OBX")] == ["OBX"] * 5
    assert msg.all("OBX")[4].index == 5


def test_escape_sequences() -> None:
    text = (
        "MSH|^~\\&|A|F|||20260101||ADT^A04|1|P|2.5\r"
        "PID|1||1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\XE4B8AD\\g\\.br\\h\\H\\i\\N\\\r"
    )
    assert parse(text).first("PID").text(5) == "a|b^c&d~e\\f中g\nhi"  # type: ignore[union-attr]


def test_custom_delimiters() -> None:
    text = "MSH*#@!$*A*F*****ADT#A04*1*P*2.5\rPID*1**77###H$X@78*\r"
    msg = parse(text)
    assert msg.message_type == "ADT^A04"
    pid = msg.first("PID")
    assert pid is not None
    assert pid.reps(3) == [[["77"], [""], [""], ["H", "X"]], [["78"]]]


def test_explicit_null_vs_empty() -> None:
    msg = parse('MSH|^~\\&|A|F|||20260101||ADT^A04|1|P|2.5\rPID|1|""||x^""^y\r')
    pid = msg.first("PID")
    assert pid is not None
    assert pid.value(2) == "" and pid.is_null(2) and not pid.present(2)
    assert pid.value(3) is None and not pid.is_null(3)
    assert pid.value(4, 2) == "" and pid.value(4, 3) == "y"
    assert pid.reps(2) == [] and pid.reps(4) == [[["x"], [""], ["y"]]]


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_terminators(sep: str) -> None:
    text = sep.join(["MSH|^~\\&|A|F|||20260101||ADT^A04|1|P|2.5", "PID|1||9", "PV1|1|O", ""])
    assert [s.name for s in parse(text).segments] == ["MSH", "PID", "PV1"]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "100"),
        ("PID|1\r", "100"),
        ("MSH|^^\\&|A\r", "102"),
        ("MSH|^~\\&|A|F|||1||ADT^A04|1|P|2.5\rpid|1\r", "100"),
        ("MSH|^~\\&|A|F|||1||ADT^A04|1|P|2.5\rMSH|^~\\&|A\r", "100"),
    ],
)
def test_malformed_messages(text: str, code: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(text.encode())
    assert info.value.hl7_code == code


def test_split_batch() -> None:
    text = decode((HL7_DIR / "batch_adt_a04.hl7").read_bytes())
    messages = split_batch(text)
    assert [parse(m).control_id for m in messages] == ["BATCH-1", "BATCH-2"]
    assert all(m.endswith("\r") and m.startswith("MSH") for m in messages)
    assert split_batch(_msg("")) == [_msg("").replace("\r\r", "\r")]


def test_split_batch_count_mismatch() -> None:
    text = "BHS|^~\\&\rMSH|^~\\&|A|F|||1||ADT^A04|1|P|2.5\rBTS|3\r"
    with pytest.raises(ParseError) as info:
        split_batch(text)
    assert (info.value.segment, info.value.field) == ("BTS", 1)
    with pytest.raises(ParseError):
        split_batch("PID|1\rMSH|^~\\&|A\r")


HEADER_FIELDS = (
    "sending_facility_id",
    "control_id",
    "message_code",
    "event",
    "version",
    "accept_ack_type",
    "app_ack_type",
    "charset",
)


@pytest.mark.parametrize("path", sorted(HL7_DIR.glob("*.hl7")), ids=lambda p: p.name)
@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n"])
def test_parse_header_reads_msh_as_parse_does(path: object, terminator: bytes) -> None:
    raw = path.read_bytes().replace(b"\r", terminator)  # type: ignore[attr-defined]
    try:
        whole = parse(raw)
    except ParseError:
        return  # a fixture that is meant not to parse: its header is checked elsewhere
    head = parse_header(raw)
    assert [getattr(head, f) for f in HEADER_FIELDS] == [getattr(whole, f) for f in HEADER_FIELDS]
    assert [s.name for s in head.segments] == ["MSH"]


def test_parse_header_does_not_see_a_later_bad_segment() -> None:
    raw = b"MSH|^~\\&|LIS|HOSPA|GW|ALLIANCE|20260315113000||ORU^R01|C-9|P|2.5.1\r12X|bad\r"
    with pytest.raises(ParseError):
        parse(raw)
    assert parse_header(raw).control_id == "C-9"
