"""Chain links and the hex wire form of hashes and proofs."""

from __future__ import annotations

import pytest

from ledger import merkle
from ledger.checkpoint import Checkpoint
from ledger.errors import CheckpointError, ProofFormatError, VerificationError
from ledger.verify import (
    hash_from_hex,
    proof_from_hex,
    proof_to_hex,
    verify_chain_link,
    verify_inclusion,
)

ROOT = merkle.leaf_hash(b"r")


def test_chain_link() -> None:
    first = Checkpoint("o", 3, ROOT, bytes(32), 10)
    verify_chain_link(None, first)
    second = Checkpoint("o", 5, ROOT, first.body_hash(), 11)
    verify_chain_link(first, second)
    with pytest.raises(CheckpointError, match="does not link"):
        verify_chain_link(None, second)
    with pytest.raises(CheckpointError, match="does not link"):
        verify_chain_link(second, Checkpoint("o", 6, ROOT, first.body_hash(), 12))
    with pytest.raises(CheckpointError, match="origin"):
        verify_chain_link(first, Checkpoint("p", 5, ROOT, first.body_hash(), 11))
    with pytest.raises(CheckpointError, match="shrank") as exc:
        verify_chain_link(first, Checkpoint("o", 2, ROOT, first.body_hash(), 11))
    assert exc.value.size == 2


def test_hex_roundtrip_and_rejects() -> None:
    hashes = [merkle.leaf_hash(b"%d" % i) for i in range(7)]
    proof = merkle.inclusion_proof(hashes, 3, 7)
    wire = proof_to_hex(proof)
    assert all(len(h) == 64 and h == h.lower() for h in wire)
    back = proof_from_hex(wire)
    verify_inclusion(hashes[3], 3, 7, back, merkle.root(hashes))
    assert hash_from_hex(ROOT.hex()) == ROOT
    for bad in (ROOT.hex().upper(), ROOT.hex()[:-2], "zz" * 32, 5, None):
        with pytest.raises(ProofFormatError):
            hash_from_hex(bad, "root")
    with pytest.raises(ProofFormatError) as exc:
        proof_from_hex([wire[0], "00"])
    assert exc.value.what == "proof[1]"
    assert isinstance(exc.value, VerificationError)
    with pytest.raises(ProofFormatError):
        proof_from_hex("abcd")
    with pytest.raises(ProofFormatError):
        proof_from_hex([wire[0]] * 129)
