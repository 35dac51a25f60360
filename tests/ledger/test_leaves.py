"""Leaf kinds: canonical encoding, field whitelist and shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import rfc8785

from ledger.errors import LeafFormatError
from ledger.leaves import KINDS, ConsentLeaf, RecordLeaf, decode_leaf, encode_leaf

HEX = "ab" * 32
T = "2026-11-28T19:41:38Z"

GOOD: dict[str, dict[str, Any]] = {
    "record": {
        "record": "3f2a9c",
        "version": 1,
        "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        "sha256": HEX,
        "patient": HEX,
        "type": "Observation",
        "source": "hosp-a",
        "dictionary": "2026.1",
        "time": T,
    },
    "consent": {
        "consent": "c-1",
        "version": 2,
        "action": "revoke",
        "sha256": HEX,
        "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        "patient": HEX,
        "source": "hosp-a",
        "time": T,
    },
    "access": {
        "patient": HEX,
        "decision": "permit",
        "sha256": "ef" * 32,
        "source": "hosp-a",
        "time": "2026-11-28T19:41:38.123Z",
    },
    "key": {"action": "erasure", "key_id": "kek-9", "patient": HEX, "source": "a", "time": T},
    "dictionary": {
        "version": "2026.2",
        "sha256": HEX,
        "files": [{"name": "ConceptMap-lab.json", "sha256": HEX}],
        "source": "hosp-a",
        "time": T,
    },
    "link": {"from": HEX, "to": "cd" * 32, "reason": "merge", "source": "hosp-a", "time": T},
    "erasure": {"patient": HEX, "records": ["3f2a9c", "8d1e"], "source": "hosp-a", "time": T},
}


ENTRY = {"record": "a", "type": "Patient", "version": 1}
CONTAINER = {
    **GOOD["record"],
    "range": [9216, 8190],
    "type": "Bundle",
    "contains": [
        {"record": "8d1e", "type": "Patient", "version": 3},
        {"record": "77aa", "type": "Observation", "version": 1},
    ],
}


def test_all_kinds_covered() -> None:
    assert set(GOOD) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_roundtrip_canonical(kind: str) -> None:
    data = encode_leaf(kind, GOOD[kind])
    # The first decode in the encoding process returns the remembered object, the second
    # parses and checks the bytes: both give the same.
    remembered, parsed = decode_leaf(data), decode_leaf(data)
    assert remembered == parsed == {"v": 1, "kind": kind, **GOOD[kind]}
    # RFC 8785: sorted keys, no whitespace
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert b" " not in data and b"\n" not in data


@pytest.mark.parametrize(
    ("kind", "fields"), [*sorted(GOOD.items()), ("record", CONTAINER)], ids=str
)
def test_encoding_is_exactly_rfc8785(kind: str, fields: dict[str, Any]) -> None:
    """The fast encoder gives the bytes of the reference RFC 8785 implementation."""
    assert encode_leaf(kind, fields) == rfc8785.dumps({"v": 1, "kind": kind, **fields})
    assert decode_leaf(encode_leaf(kind, fields))["kind"] == kind


def test_non_canonical_rejected() -> None:
    data = encode_leaf("record", GOOD["record"])
    pretty = json.dumps(json.loads(data), indent=2).encode()
    with pytest.raises(LeafFormatError, match="canonical"):
        decode_leaf(pretty)


@pytest.mark.parametrize(
    ("kind", "change", "field"),
    [
        ("record", {"name": "Jane Doe"}, "name"),
        ("record", {"patient": "Jane Doe"}, "patient"),
        ("record", {"patient": "AB" * 32}, "patient"),
        ("record", {"birthDate": "1980-01-01"}, "birthDate"),
        ("record", {"version": 0}, "version"),
        ("record", {"version": True}, "version"),
        ("record", {"version": "1"}, "version"),
        ("record", {"time": "2026-11-28 19:41:38"}, "time"),
        ("record", {"time": "2026-13-28T19:41:38Z"}, "time"),
        ("record", {"time": "2026-11-28T19:41:38+01:00"}, "time"),
        ("record", {"record": "has space"}, "record"),
        ("record", {"type": "observation"}, "type"),
        ("record", {"cid": "Qm123"}, "cid"),
        ("record", {"contains": []}, "contains"),
        ("record", {"contains": [{"record": "a", "type": "Patient"}]}, "contains"),
        ("record", {"contains": [{"record": "a", "type": "Patient", "version": 0}]}, "contains"),
        (
            "record",
            {"contains": [{"record": "a", "type": "Patient", "version": 1, "name": "Li"}]},
            "contains",
        ),
        ("record", {"contains": [{**ENTRY, "record": "Wu Li"}]}, "contains"),
        ("record", {"contains": [ENTRY] * 201}, "contains"),
        ("record", {"range": [0]}, "range"),
        ("record", {"range": [-1, 10]}, "range"),
        ("record", {"range": [0, 0]}, "range"),
        ("record", {"range": [0, True]}, "range"),
        ("record", {"range": [0, "10"]}, "range"),
        ("record", {"range": [2 * 1024 * 1024, 1]}, "range"),
        ("access", {"decision": "maybe"}, "decision"),
        ("access", {"sha256": "AB" * 32}, "sha256"),
        ("access", {"patient": "Wu Li"}, "patient"),
        # The access leaf is exactly {v, kind, patient, decision, sha256, source, time}: what
        # the old leaf carried (actor, purpose, records, consent, break-glass) is refused.
        ("access", {"actor": "hosp-b/practitioner/77"}, "actor"),
        ("access", {"purpose": "ETREAT"}, "purpose"),
        ("access", {"records": ["3f2a9c"]}, "records"),
        ("access", {"consent": "c-1"}, "consent"),
        ("access", {"emergency": True}, "emergency"),
        ("access", {"query": HEX}, "query"),
        ("key", {"new_key_id": "k2"}, "new_key_id"),
    ],
)
def test_bad_fields_rejected(kind: str, change: dict[str, Any], field: str) -> None:
    fields = {**GOOD[kind], **change}
    with pytest.raises(LeafFormatError) as exc:
        encode_leaf(kind, fields)
    assert exc.value.field == field
    assert exc.value.kind == kind


def test_missing_and_conditional_fields() -> None:
    rec = dict(GOOD["record"])
    del rec["cid"]
    with pytest.raises(LeafFormatError, match="missing field 'cid'"):
        encode_leaf("record", rec)
    for name in GOOD["access"]:
        acc = {k: v for k, v in GOOD["access"].items() if k != name}
        with pytest.raises(LeafFormatError, match=f"missing field '{name}'"):
            encode_leaf("access", acc)
    with pytest.raises(LeafFormatError, match="needs 'new_key_id'"):
        encode_leaf("key", {"action": "rotation", "key_id": "k", "source": "a", "time": T})
    assert (
        decode_leaf(
            encode_leaf("key", {"action": "trust", "sha256": HEX, "source": "a", "time": T})
        )["action"]
        == "trust"
    )


def test_unknown_kind_and_bad_bytes() -> None:
    with pytest.raises(LeafFormatError):
        encode_leaf("patient", {})
    with pytest.raises(LeafFormatError):
        encode_leaf("record", {**GOOD["record"], "kind": "consent"})
    for raw in (b"", b"[]", b"{}", b'{"v":2,"kind":"record"}', b"\xff\xfe"):
        with pytest.raises(LeafFormatError):
            decode_leaf(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b'"kind":"record"', b'"kind":"\\u0072ecord"'),  # escaped letter
        lambda d: d.replace(b'"version":1', b'"version":1.0'),  # number form
        lambda d: d.replace(b'"version":1', b'"version":1e0'),
        lambda d: d.replace(b'{"cid"', b'{ "cid"'),  # whitespace
        lambda d: b'{"v":1,' + d[1:].replace(b',"v":1', b""),  # key order
        lambda d: d[:-1] + b',"v":1}',  # duplicate key
    ],
)
def test_non_canonical_variants_rejected_by_the_fast_path(mutate: Any) -> None:
    data = encode_leaf("record", GOOD["record"])
    bad = mutate(data)
    assert bad != data
    with pytest.raises(LeafFormatError):
        decode_leaf(bad)


def test_link_to_itself_is_refused() -> None:
    with pytest.raises(LeafFormatError, match="same"):
        encode_leaf("link", {**GOOD["link"], "to": HEX})


@pytest.mark.parametrize("fields", [GOOD["record"], CONTAINER], ids=["alone", "container"])
def test_record_leaf_round_trips_through_its_typed_form(fields: dict[str, Any]) -> None:
    raw = encode_leaf("record", fields)
    typed = RecordLeaf.from_leaf(json.loads(raw))
    assert typed.encode() == raw
    assert typed.fields() == fields


def test_typed_record_leaf_refuses_another_kind() -> None:
    with pytest.raises(LeafFormatError):
        RecordLeaf.from_leaf({"kind": "consent", **GOOD["consent"]})


def test_consent_leaf_has_exactly_its_fields_and_round_trips_typed() -> None:
    fields = GOOD["consent"]
    leaf = ConsentLeaf.from_leaf(decode_leaf(encode_leaf("consent", fields)))
    assert leaf.fields() == fields
    assert ConsentLeaf.from_leaf(decode_leaf(leaf.encode())) == leaf
    # an institution's administrative default has no patient; a packed one has a range
    default = {k: v for k, v in fields.items() if k != "patient"} | {"range": [0, 90]}
    typed = ConsentLeaf.from_leaf(decode_leaf(encode_leaf("consent", default)))
    assert typed.patient is None and typed.byte_range == (0, 90)
    for missing in ("consent", "version", "action", "sha256", "cid", "source", "time"):
        with pytest.raises(LeafFormatError, match=missing):
            encode_leaf("consent", {k: v for k, v in fields.items() if k != missing})
    for extra in ({"type": "Consent"}, {"salt": HEX}, {"identifier": "H-1"}):
        with pytest.raises(LeafFormatError, match="unknown field"):
            encode_leaf("consent", {**fields, **extra})
    with pytest.raises(LeafFormatError, match="action"):
        encode_leaf("consent", {**fields, "action": "inactive"})
    with pytest.raises(LeafFormatError):
        ConsentLeaf.from_leaf({"kind": "record", **GOOD["record"]})
