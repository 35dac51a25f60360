"""ledger.canonical.canonical_json against the reference RFC 8785 encoder (the ``rfc8785``
package, an oracle not written here), on both of its paths."""

from __future__ import annotations

from typing import Any

import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from ledger.canonical import canonical_json

_INT = st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
_SCALAR = st.none() | st.booleans() | _INT | st.text()
_JSON: st.SearchStrategy[Any] = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_the_bytes_are_those_of_the_reference_encoder(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


def test_both_paths_are_taken() -> None:
    plain = {"b": 1, "a": ["x", 2]}
    assert canonical_json(plain) == b'{"a":["x",2],"b":1}'
    escaped = {"é": "\n", "z": '"'}
    assert canonical_json(escaped) == rfc8785.dumps(escaped)
    assert canonical_json({"\U0001f600": 1, "\uff61": 2}) == rfc8785.dumps(
        {"\U0001f600": 1, "\uff61": 2}
    )
