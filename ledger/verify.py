"""Verification of RFC 9162 proofs and signed checkpoints. Pure functions that raise.

Nothing here returns ``False``: a check either returns (a value, or None) or raises a
:class:`ledger.errors.VerificationError` subclass naming what failed and where.

The proof checks work from the shape of the tree: for leaf ``index`` in a tree of ``size``
leaves, the first ``inner`` proof hashes (``inner`` = bit length of ``index XOR (size-1)``) are
siblings inside the complete subtree shared with the last leaf, on the side given by the bits
of ``index``; the remaining ``border`` hashes (one per set bit of ``index >> inner``) are left
siblings on the tree's right border. This is equivalent to the RFC 9162 sections 2.1.3.2 and
2.1.4.2 algorithms (the tests check both against each other).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ledger.errors import (
    CheckpointError,
    ConsistencyProofError,
    InclusionProofError,
    ProofFormatError,
)
from ledger.merkle import EMPTY_ROOT, HASH_SIZE, node_hash

if TYPE_CHECKING:
    from ledger.checkpoint import Checkpoint, SignedCheckpoint
    from ledger.keys import TrustedKeys

ZERO_HASH = bytes(HASH_SIZE)


def _decompose(index: int, size: int) -> tuple[int, int]:
    """(inner, border) lengths of the inclusion proof of ``index`` in a tree of ``size``."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(h, seed) if (index >> i) & 1 else node_hash(seed, h)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _check_hashes(proof: Sequence[bytes]) -> str | None:
    for i, h in enumerate(proof):
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            return f"proof element {i} is not a {HASH_SIZE}-byte hash"
    return None


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` implies for leaf hash ``leaf_hash`` at ``index`` in ``tree_size``.

    Raises InclusionProofError when the index is out of range or the proof has the wrong shape.
    """
    if not 0 <= index < tree_size:
        raise InclusionProofError("leaf index out of range", index=index, tree_size=tree_size)
    if len(leaf_hash) != HASH_SIZE:
        raise InclusionProofError("leaf hash is not 32 bytes", index=index, tree_size=tree_size)
    problem = _check_hashes(proof)
    if problem:
        raise InclusionProofError(problem, index=index, tree_size=tree_size)
    inner, border = _decompose(index, tree_size)
    if len(proof) != inner + border:
        raise InclusionProofError(
            f"proof has {len(proof)} hashes, expected {inner + border}",
            index=index,
            tree_size=tree_size,
        )
    h = _chain_inner(leaf_hash, proof[:inner], index)
    return _chain_border_right(h, proof[inner:])


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    Raises InclusionProofError when it is not.
    """
    computed = root_from_inclusion_proof(leaf_hash, index, tree_size, proof)
    if not hmac.compare_digest(computed, root):
        raise InclusionProofError(
            "proof does not lead to the given root", index=index, tree_size=tree_size
        )


def verify_consistency(
    first_size: int,
    second_size: int,
    proof: Sequence[bytes],
    first_root: bytes,
    second_root: bytes,
) -> None:
    """Check that the tree (``first_size``, ``first_root``) is a prefix of (``second_size``,
    ``second_root``), by the RFC 9162 consistency proof ``proof``.

    Equal sizes need an empty proof and equal roots; size 0 needs an empty proof and the empty
    root. Raises ConsistencyProofError when the proof does not hold.
    """

    def fail(message: str) -> ConsistencyProofError:
        return ConsistencyProofError(message, first=first_size, second=second_size)

    if not 0 <= first_size <= second_size:
        raise fail("sizes out of order")
    if len(first_root) != HASH_SIZE or len(second_root) != HASH_SIZE:
        raise fail("roots must be 32-byte hashes")
    problem = _check_hashes(proof)
    if problem:
        raise fail(problem)
    if first_size == second_size:
        if proof:
            raise fail("proof between equal sizes must be empty")
        if not hmac.compare_digest(first_root, second_root):
            raise fail("same size, different roots")
        return
    if first_size == 0:
        if proof:
            raise fail("proof from the empty tree must be empty")
        if not hmac.compare_digest(first_root, EMPTY_ROOT):
            raise fail("first root is not the empty tree's root")
        return
    if not proof:
        raise fail("empty proof")
    inner, border = _decompose(first_size - 1, second_size)
    shift = (first_size & -first_size).bit_length() - 1
    inner -= shift
    # When the first tree is a complete subtree, its root is the seed and is not in the proof.
    if first_size == 1 << shift:
        seed, rest = first_root, list(proof)
    else:
        seed, rest = proof[0], list(proof[1:])
    if len(rest) != inner + border:
        raise fail(f"proof has {len(proof)} hashes, wrong for these sizes")
    mask = (first_size - 1) >> shift
    h1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(h1, first_root):
        raise fail("proof does not lead to the first root")
    h2 = _chain_border_right(_chain_inner(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(h2, second_root):
        raise fail("proof does not lead to the second root")


def verify_checkpoint(signed: SignedCheckpoint, trusted: TrustedKeys) -> Checkpoint:
    """Check every signature of a signed checkpoint and return its checkpoint.

    The writer (the first signature's key name) must be trusted and must have signed with both
    Ed25519 and ML-DSA-65; every cosigner likewise with both; every signature must verify.
    Raises CheckpointSignatureError or CheckpointError.
    """
    from ledger.keys import verify_signatures

    verify_signatures(signed, trusted)
    return signed.checkpoint


def verify_chain_link(previous: Checkpoint | None, current: Checkpoint) -> None:
    """Check that ``current`` directly follows ``previous`` (None: it is the first checkpoint).

    ``current.prev`` must be the SHA-256 of ``previous``'s body (32 zero bytes for the first),
    the origin must not change, and the size must not shrink. Raises CheckpointError.
    """
    expected = previous.body_hash() if previous is not None else ZERO_HASH
    if not hmac.compare_digest(current.prev, expected):
        raise CheckpointError(
            "previous-checkpoint hash does not link to the chain", size=current.size
        )
    if previous is not None and current.origin != previous.origin:
        raise CheckpointError(
            f"origin changed from {previous.origin!r} to {current.origin!r}", size=current.size
        )
    if previous is not None and current.size < previous.size:
        raise CheckpointError(f"tree shrank from size {previous.size}", size=current.size)


def hash_from_hex(text: object, what: str = "hash") -> bytes:
    """Parse a 64-character lowercase hex hash. Raises ProofFormatError naming ``what``."""
    if not isinstance(text, str) or len(text) != 2 * HASH_SIZE:
        raise ProofFormatError(f"must be {2 * HASH_SIZE} hex characters", what=what)
    try:
        value = bytes.fromhex(text)
    except ValueError as err:
        raise ProofFormatError("is not hex", what=what) from err
    if value.hex() != text:
        raise ProofFormatError("must be lowercase hex", what=what)
    return value


def proof_to_hex(proof: Sequence[bytes]) -> list[str]:
    """Wire form of a proof: a list of lowercase hex hashes. Raises nothing."""
    return [h.hex() for h in proof]


def proof_from_hex(items: object, what: str = "proof") -> list[bytes]:
    """Parse a proof's wire form (a list of hex hashes, at most 128 of them).

    Raises ProofFormatError naming the bad element.
    """
    if not isinstance(items, list | tuple) or len(items) > 128:
        raise ProofFormatError("must be a list of at most 128 hex hashes", what=what)
    return [hash_from_hex(h, f"{what}[{i}]") for i, h in enumerate(items)]
