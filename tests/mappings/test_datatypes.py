"""HL7 v2 data types -> FHIR: DTM/TS precision and zones, names, telecom, quantities."""

from __future__ import annotations

import pytest

from mappings.errors import MessageContentError
from mappings.v2 import datatypes as dt


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2026", "Asia/Shanghai", "2026"),
        ("202603", "Asia/Shanghai", "2026-03"),
        ("20260315", "Asia/Shanghai", "2026-03-15"),
        ("2026031508", "Asia/Shanghai", "2026-03-15T08:00:00+08:00"),
        ("202603150830", "Asia/Shanghai", "2026-03-15T08:30:00+08:00"),
        ("20260315083015", "Asia/Shanghai", "2026-03-15T08:30:15+08:00"),
        ("20260315083015.1234", "Asia/Shanghai", "2026-03-15T08:30:15.1234+08:00"),
        ("20260315083015-0500", "Asia/Shanghai", "2026-03-15T08:30:15-05:00"),
        ("202603150830+0000", "Asia/Shanghai", "2026-03-15T08:30:00+00:00"),
        ("20260715120000", "Europe/Berlin", "2026-07-15T12:00:00+02:00"),
        ("20260115120000", "Europe/Berlin", "2026-01-15T12:00:00+01:00"),
        ("20260315+0800", "Asia/Shanghai", "2026-03-15"),
    ],
)
def test_dtm_to_datetime(value: str, tz: str, expected: str) -> None:
    assert dt.to_datetime(value, default_tz=tz) == expected


@pytest.mark.parametrize(
    "value",
    ["2026-03-15", "20261301", "20260230", "2026031525", "20260315086", "x", "20260315+2500"],
)
def test_invalid_dtm(value: str) -> None:
    with pytest.raises(MessageContentError) as info:
        dt.to_datetime(value, default_tz="Asia/Shanghai")
    assert info.value.hl7_code == "102" and info.value.ack_code == "AE"


def test_instant_and_date() -> None:
    assert dt.to_instant("20260315", default_tz="UTC") is None
    assert dt.to_instant("202603150830", default_tz="UTC") == "2026-03-15T08:30:00+00:00"
    assert dt.to_date("19850505123000") == "1985-05-05"
    assert dt.to_date("198505") == "1985-05"


def test_human_name_and_display() -> None:
    name = dt.human_name([["Smith"], ["John"], ["Paul Q"], ["Jr"], ["Dr"], [""], ["L"]])
    assert name == {
        "use": "official",
        "family": "Smith",
        "given": ["John", "Paul", "Q"],
        "prefix": ["Dr"],
        "suffix": ["Jr"],
    }
    assert dt.human_name([[""]]) is None
    assert dt.name_display("张", ["三"]) == "张三"
    assert dt.name_display("Smith", ["John"]) == "John Smith"


def test_contact_points() -> None:
    assert dt.contact_point([[""], ["NET"], ["Internet"], ["a@b.cn"]]) == {
        "system": "email",
        "value": "a@b.cn",
    }
    assert dt.contact_point([["555"], ["WPN"], ["FX"]]) == {
        "system": "fax",
        "value": "555",
        "use": "work",
    }
    assert dt.contact_point([[""]]) is None


def test_identifier_without_authority_is_facility_scoped() -> None:
    ident = dt.identifier([["42"]], facility="医院 A", systems={})
    assert ident == {"system": "urn:alliance:facility:%E5%8C%BB%E9%99%A2%20A:id", "value": "42"}
    oid = dt.identifier([["42"], [""], [""], ["", "1.2.3", "ISO"]], facility="F", systems={})
    assert oid is not None and oid["system"] == "urn:oid:1.2.3"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7.8", 7.8), ("+5", 5), ("-0.5", -0.5), (".5", 0.5), ("007", 7), ("5.", 5)],
)
def test_decimal(value: str, expected: float) -> None:
    assert dt.decimal(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "1.2.3", "1e5", "--1"])
def test_decimal_rejects(value: str) -> None:
    with pytest.raises(MessageContentError):
        dt.decimal(value)


def test_quantity_ucum() -> None:
    assert dt.quantity("5", [["10^9/L"]]) == {
        "value": 5,
        "unit": "10^9/L",
        "system": "http://unitsofmeasure.org",
        "code": "10*9/L",
    }
    assert dt.quantity("5", [["无单位"]]) == {"value": 5, "unit": "无单位"}


def test_structured_numeric() -> None:
    assert dt.sn_value([["<"], ["0.5"]], None) == (
        "valueQuantity",
        {"value": 0.5, "comparator": "<"},
    )
    assert dt.sn_value([[""], ["1"], [":"], ["64"]], None)[0] == "valueRatio"
    assert dt.sn_value([[""], ["0"], ["-"], ["2"]], None)[0] == "valueRange"
    assert dt.sn_value([["<>"], ["3"]], None) == ("valueString", "<>3")


def test_reference_range() -> None:
    assert dt.reference_range("3.5 - 5.5", None) == {"low": {"value": 3.5}, "high": {"value": 5.5}}
    assert dt.reference_range("<10", None) == {"high": {"value": 10}, "text": "<10"}
    assert dt.reference_range("阴性", None) == {"text": "阴性"}


def test_interpretation_and_status() -> None:
    assert dt.interpretation("HH")["coding"][0]["system"].endswith("ObservationInterpretation")
    assert dt.interpretation("ZZ")["coding"][0]["system"].endswith("v2-0078")
    assert dt.observation_status("C") == "corrected"
    assert dt.observation_status("W") == "entered-in-error"
    assert dt.observation_status("Q") is None
