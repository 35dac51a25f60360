"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing and proof generation. Pure.

Hashes follow RFC 9162 section 2.1.1: a leaf hashes as ``SHA-256(0x00 || leaf)``, an interior
node as ``SHA-256(0x01 || left || right)``, and the empty tree as ``SHA-256()``. A tree of ``n``
leaves splits at ``k``, the largest power of two smaller than ``n``.

Two layers:

* the generic algorithms (:func:`subtree_root`, :func:`tree_root`, :func:`inclusion_path`,
  :func:`consistency_path`) take a ``NodeGetter``: a function returning the stored hash of a
  *complete* subtree (``level``, ``index`` -> hash of leaves ``[index*2^level,
  (index+1)*2^level)``). Every node of an RFC 9162 tree is either complete or a right edge made
  of at most log2(n) complete subtrees, so with stored complete subtrees (see
  :mod:`ledger.stored_tree`) a root or a proof costs O(log n) lookups;
* the reference functions (:func:`root`, :func:`inclusion_proof`, :func:`consistency_proof`)
  take a plain list of leaf hashes and build the complete subtrees first, O(n).

Proofs are lists of 32-byte hashes in RFC 9162 order (section 2.1.3.1 PATH and 2.1.4.1 PROOF).
Functions raise :class:`ledger.errors.TreeRangeError` (a ValueError) for out-of-range sizes
or indexes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from ledger.errors import TreeRangeError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeGetter = Callable[[int, int], bytes]
"""``(level, index) -> hash`` of the complete subtree over leaves [i*2^level, (i+1)*2^level)."""

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data). Raises nothing."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right). Raises nothing."""
    return _sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_root(get: NodeGetter, start: int, end: int) -> bytes:
    """Hash of the RFC 9162 node over leaves [start, end).

    ``start`` must be a multiple of the largest power of two not above ``end - start`` (true of
    every node of an RFC 9162 tree). The range is covered by complete subtrees of decreasing
    size, folded from the right. Raises TreeRangeError for an empty range.
    """
    if end <= start:
        raise TreeRangeError(f"empty leaf range [{start}, {end})")
    hashes: list[bytes] = []
    pos = start
    while pos < end:
        level = (end - pos).bit_length() - 1
        hashes.append(get(level, pos >> level))
        pos += 1 << level
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


def tree_root(get: NodeGetter, size: int) -> bytes:
    """Root hash of the first ``size`` leaves (EMPTY_ROOT for 0). Raises TreeRangeError."""
    if size < 0:
        raise TreeRangeError(f"negative tree size {size}")
    if size == 0:
        return EMPTY_ROOT
    return subtree_root(get, 0, size)


def inclusion_path(get: NodeGetter, index: int, size: int) -> list[bytes]:
    """RFC 9162 inclusion proof (PATH) of leaf ``index`` in the tree of ``size`` leaves.

    Raises TreeRangeError unless 0 <= index < size.
    """
    if not 0 <= index < size:
        raise TreeRangeError(f"leaf index {index} out of range for tree size {size}")
    path: list[bytes] = []
    start, n, m = 0, size, index
    while n > 1:
        k = _largest_power_of_two_below(n)
        if m < k:
            path.append(subtree_root(get, start + k, start + n))
            n = k
        else:
            path.append(subtree_root(get, start, start + k))
            start, m, n = start + k, m - k, n - k
    path.reverse()
    return path


def consistency_path(get: NodeGetter, first: int, second: int) -> list[bytes]:
    """RFC 9162 consistency proof (PROOF) between tree sizes ``first`` and ``second``.

    Empty when ``first`` is 0 or equals ``second``.
    Raises TreeRangeError unless 0 <= first <= second.
    """
    if not 0 <= first <= second:
        raise TreeRangeError(f"no consistency proof from tree size {first} to {second}")
    if first in (0, second):
        return []
    path: list[bytes] = []
    start, m, n, whole = 0, first, second, True
    while m != n:
        k = _largest_power_of_two_below(n)
        if m <= k:
            path.append(subtree_root(get, start + k, start + n))
            n = k
        else:
            path.append(subtree_root(get, start, start + k))
            start, m, n, whole = start + k, m - k, n - k, False
    if not whole:
        path.append(subtree_root(get, start, start + n))
    path.reverse()
    return path


def complete_levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """All complete-subtree hashes: level 0 is the leaf hashes, level k+1 pairs level k. Pure."""
    levels: list[list[bytes]] = [list(leaf_hashes)]
    while len(levels[-1]) >= 2:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
    return levels


def _getter(leaf_hashes: Sequence[bytes]) -> NodeGetter:
    levels = complete_levels(leaf_hashes)

    def get(level: int, index: int) -> bytes:
        return levels[level][index]

    return get


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Root hash (RFC 9162 MTH) of a list of leaf hashes. Raises nothing."""
    if not leaf_hashes:
        return EMPTY_ROOT
    return tree_root(_getter(leaf_hashes), len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, tree_size: int) -> list[bytes]:
    """Inclusion proof of leaf ``index`` in the tree of the first ``tree_size`` leaf hashes.

    Raises TreeRangeError unless 0 <= index < tree_size <= len(leaf_hashes).
    """
    if tree_size > len(leaf_hashes):
        raise TreeRangeError(f"tree size {tree_size} exceeds the {len(leaf_hashes)} leaves given")
    return inclusion_path(_getter(leaf_hashes[:tree_size]), index, tree_size)


def consistency_proof(leaf_hashes: Sequence[bytes], first: int, second: int) -> list[bytes]:
    """Consistency proof between the trees of the first ``first`` and ``second`` leaf hashes.

    Raises TreeRangeError unless 0 <= first <= second <= len(leaf_hashes).
    """
    if second > len(leaf_hashes):
        raise TreeRangeError(f"tree size {second} exceeds the {len(leaf_hashes)} leaves given")
    return consistency_path(_getter(leaf_hashes[:second]), first, second)
