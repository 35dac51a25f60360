"""Pure unit tests of search value parsing: partial dates as ranges, offsets, prefixes, tokens,
escaped commas, and what the index keeps of a resource (no identifier or name in clear)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.crypto import pseudonym
from gateway.errors import InvalidInputError
from gateway.search.extract import ANY_SYSTEM, extract
from gateway.search.params import date_range, split_prefix, split_values, token


def _us(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def test_partial_dates_are_ranges() -> None:
    assert date_range("2024") == (
        _us(datetime(2024, 1, 1, tzinfo=UTC)),
        _us(datetime(2025, 1, 1, tzinfo=UTC)),
    )
    assert date_range("2024-12")[1] == _us(datetime(2025, 1, 1, tzinfo=UTC))
    lo, hi = date_range("2024-02-29", ZoneInfo("Asia/Shanghai"))
    assert lo == _us(datetime(2024, 2, 28, 16, tzinfo=UTC)) and hi - lo == 86_400_000_000
    assert date_range("2024-01-01T10:00:00+08:00") == date_range("2024-01-01T02:00:00Z")
    lo, hi = date_range("2024-01-01T02:00Z")
    assert hi - lo == 60_000_000
    lo, hi = date_range("2024-01-01T02:00:00.5Z")
    assert hi - lo == 100_000
    for bad in ("24", "2024-1", "2024-02-30", "2024-01-01T24:00", "soon", ""):
        with pytest.raises(InvalidInputError):
            date_range(bad)


def test_prefixes_tokens_and_commas() -> None:
    assert split_prefix("ge2024") == ("ge", "2024")
    assert split_prefix("2024") == ("eq", "2024")
    assert token("http://loinc.org|718-7") == ("http://loinc.org", "718-7")
    assert token("|718-7") == ("", "718-7")
    assert token("718-7") == (None, "718-7")
    assert token("http://loinc.org|") == ("http://loinc.org", None)
    assert split_values(r"a,b\,c") == ["a", "b,c"]


def test_index_entry_holds_no_identifier_or_name_in_clear() -> None:
    key = b"k" * 32
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:mrn", "value": "MRN-0098123"}],
        "name": [{"family": "Wang"}],
        "birthDate": "1958-04-17",
        "meta": {"lastUpdated": "2026-11-30T10:00:00Z", "security": [{"code": "R"}]},
    }
    e = extract(patient, custodian="c", record="r", version=1, patient="ps", key=key)
    text = repr(e)
    for clear in ("MRN-0098123", "Wang", "1958"):
        assert clear not in text
    assert ("identifier", "urn:mrn", pseudonym(key, "urn:mrn", "MRN-0098123")) in e.tokens
    assert ("identifier", ANY_SYSTEM, pseudonym(key, "", "MRN-0098123")) in e.tokens
    assert e.labels == ["|R"] and e.date_lo is None
