"""Containers are assembled from serialised resources: the bytes must be the JSON they claim."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline import container_json, with_meta

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(
    st.lists(
        st.dictionaries(st.text().filter(lambda k: k != "meta"), _json, min_size=1, max_size=5),
        min_size=1,
        max_size=6,
    ),
    st.text(min_size=1, max_size=20),
)
def test_assembled_container_is_the_json_of_its_parts(
    bodies: list[dict[str, object]], bundle_id: str
) -> None:
    meta = b'"meta":{"lastUpdated":"2026-11-29T07:00:00.000Z","versionId":"%d"}'
    entries = [
        (f"T/{i}", with_meta(orjson.dumps(body), meta % (i + 1))) for i, body in enumerate(bodies)
    ]
    bundle = orjson.loads(container_json(bundle_id, meta % 9, entries))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    assert bundle["id"] == bundle_id and bundle["meta"]["versionId"] == "9"
    for i, (entry, body) in enumerate(zip(bundle["entry"], bodies, strict=True)):
        assert entry["fullUrl"] == f"T/{i}"
        resource = dict(entry["resource"])
        assert resource.pop("meta") == {
            "lastUpdated": "2026-11-29T07:00:00.000Z",
            "versionId": str(i + 1),
        }
        assert resource == body


@pytest.mark.parametrize("body", [b"{}", b"[1]", b'"x"', b'{"a":1'])
def test_with_meta_refuses_what_is_not_an_object_with_members(body: bytes) -> None:
    with pytest.raises(ValueError):
        with_meta(body, b'"meta":{}')
