"""ACK building (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.hl7.ack import Receipt, acks_to_send, build_ack, read_header
from mappings.errors import ConversionWarning, MessageContentError

MSG = (
    b"MSH|^~\\&|LIS|HOSPA|GATEWAY|ALLIANCE|20260315113000||ORU^R01^ORU_R01|C-1|P|2.5.1\r"
    b"PID|1||X^^^A^MR\r"
)


def test_ack_swaps_parties_and_echoes_control_id() -> None:
    header = read_header(MSG)
    ack = build_ack(header, code="AA", now=datetime(2026, 3, 15, 12, 0, tzinfo=UTC))
    segs = ack.decode().split("\r")
    msh = segs[0].split("|")
    assert msh[2:6] == ["GATEWAY", "ALLIANCE", "LIS", "HOSPA"]
    assert msh[8] == "ACK^R01^ACK" and msh[11] == "2.5.1"
    assert segs[1] == "MSA|AA|C-1"


def test_err_segment_locates_the_problem_without_patient_data() -> None:
    error = MessageContentError(
        "PID-3 is required", hl7_code="101", segment="PID", segment_index=1, field=3
    )
    ack = build_ack(
        read_header(MSG),
        code="AE",
        error=error,
        text=str(error),
        now=datetime(2026, 1, 1, tzinfo=UTC),
    ).decode()
    err = ack.split("\r")[2].split("|")
    assert err[0] == "ERR" and err[2] == "PID^1^3^1"
    assert err[3].startswith("101^") and err[3].endswith("^HL70357") and err[4] == "E"
    assert "X^^^A" not in ack


def test_ack_is_encoded_in_the_message_charset() -> None:
    msg = (
        "MSH|^~\\&|HIS|医院|GW|ALLIANCE|20260101||ADT^A01|甲1|P|2.5.1|||||CHN|GB 18030-2000\r"
        "PID|1||1^^^A\r"
    ).encode("gb18030")
    ack = build_ack(read_header(msg), code="AA", now=datetime(2026, 1, 1, tzinfo=UTC))
    text = ack.decode("gb18030")
    assert (
        "|医院|" in text and "MSA|AA|甲1" in text and text.split("\r")[0].endswith("GB 18030-2000")
    )
    with pytest.raises(UnicodeDecodeError):
        ack.decode("utf-8")


def test_garbage_header_still_gives_an_ack() -> None:
    for raw in (b"", b"\x00\xff", b"MSH", b"XYZ|abc"):
        ack = build_ack(read_header(raw), code="AR", now=datetime(2026, 1, 1, tzinfo=UTC))
        assert ack.startswith(b"MSH|^~\\&|") and b"\rMSA|AR|" in ack


def test_enhanced_mode_decisions() -> None:
    original = read_header(MSG)
    assert acks_to_send(original, "accept") == ["AA"]
    enhanced = read_header(MSG.replace(b"|2.5.1\r", b"|2.5.1|||AL|NE\r"))
    assert acks_to_send(enhanced, "accept") == ["CA"]
    assert acks_to_send(enhanced, "reject") == ["CR"]
    silent = read_header(MSG.replace(b"|2.5.1\r", b"|2.5.1|||NE|NE\r"))
    assert acks_to_send(silent, "reject") == []
    only_commit = read_header(MSG.replace(b"|2.5.1\r", b"|2.5.1|||NE\r"))
    assert acks_to_send(only_commit, "error") == ["AE"]
    er_al = read_header(MSG.replace(b"|2.5.1\r", b"|2.5.1|||ER|AL\r"))
    assert acks_to_send(er_al, "accept") == ["AA"]
    assert acks_to_send(er_al, "error") == ["CE", "AE"]


def test_accept_with_warnings_and_receipt() -> None:
    header = read_header(MSG)
    warnings = [
        (ConversionWarning("102", "kept as text", "OBX", 2, 5), "kept as text"),
        (ConversionWarning("102", "kept as text", "OBX", 4, 5), "kept as text"),
    ]
    receipt = Receipt(41, 57, bytes(range(32)), "bafkreiexample", (128, 640))
    ack = build_ack(
        header,
        code="AA",
        now=datetime(2026, 3, 15, 12, 0, tzinfo=UTC),
        warnings=warnings,
        receipt=receipt,
    )
    segs = [s.split("|") for s in ack.decode().split("\r") if s]
    assert [s[0] for s in segs] == ["MSH", "MSA", "ERR", "ERR", "ZRC"]
    assert segs[1][1] == "AA"
    assert [(s[2], s[3].split("^")[0], s[4]) for s in segs[2:4]] == [
        ("OBX^2^5^1", "102", "W"),
        ("OBX^4^5^1", "102", "W"),
    ]
    assert segs[4] == ["ZRC", "41", "57", bytes(range(32)).hex(), "bafkreiexample", "128^640"]
    whole = build_ack(
        header,
        code="CA",
        now=datetime(2026, 3, 15, 12, 0, tzinfo=UTC),
        receipt=Receipt(0, 1, b"\x00" * 32, "bafkreiwhole"),
    )
    assert whole.decode().split("\r")[2] == "ZRC|0|1|" + "00" * 32 + "|bafkreiwhole|"
