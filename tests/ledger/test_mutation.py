"""Mutation: every single-bit change to a proof, a root, a leaf, a checkpoint body or a
signature makes verification raise."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from functools import partial

import pytest

from ledger import merkle
from ledger.checkpoint import ED25519, MLDSA65, Checkpoint, Signature, SignedCheckpoint
from ledger.errors import LedgerError, VerificationError
from ledger.keys import Signer, TrustedKeys
from ledger.leaves import encode_leaf
from ledger.stored_tree import TreeStore
from ledger.verify import verify_checkpoint, verify_consistency, verify_inclusion

HEX = "cd" * 32
LEAVES = [
    encode_leaf(
        "record",
        {
            "record": f"rec{i}",
            "version": 1,
            "cid": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
            "sha256": HEX,
            "patient": HEX,
            "type": "Observation",
            "source": "hosp-a",
            "dictionary": "2026.1",
            "time": "2026-11-28T19:41:38Z",
        },
    )
    for i in range(21)
]
HASHES = [merkle.leaf_hash(x) for x in LEAVES]
CASES = [(0, 1), (0, 2), (5, 21), (20, 21), (8, 16), (13, 17)]


@pytest.fixture(scope="module")
def store() -> TreeStore:
    s = TreeStore.memory()
    s.append(HASHES)
    return s


def flips(data: bytes) -> Iterator[bytes]:
    for i in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[i // 8] ^= 1 << (i % 8)
        yield bytes(mutated)


def one_flip_per_byte(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 1 << (i % 8)
        yield bytes(mutated)


def must_raise(check: Callable[[], object], what: str) -> None:
    with pytest.raises(VerificationError):
        check()
    del what


@pytest.mark.parametrize(("index", "size"), CASES)
def test_inclusion_mutations(store: TreeStore, index: int, size: int) -> None:
    proof, root, lh = store.inclusion_proof(index, size), store.root(size), HASHES[index]
    verify_inclusion(lh, index, size, proof, root)
    for pos in range(len(proof)):
        for m in flips(proof[pos]):
            p = [*proof[:pos], m, *proof[pos + 1 :]]
            must_raise(partial(verify_inclusion, lh, index, size, p, root), "proof")
    for m in flips(root):
        must_raise(partial(verify_inclusion, lh, index, size, proof, m), "root")
    for m in flips(lh):
        must_raise(partial(verify_inclusion, m, index, size, proof, root), "leaf hash")
    for m in flips(LEAVES[index]):
        h = merkle.leaf_hash(m)
        must_raise(partial(verify_inclusion, h, index, size, proof, root), "leaf")
    # Each bit of the index's low byte, and a dropped or extra proof element. (The tree size
    # is not bound by an inclusion proof alone, per RFC 9162: the signed checkpoint binds it.)
    for bit in range(8):
        i2 = index ^ (1 << bit)
        must_raise(partial(verify_inclusion, lh, i2, size, proof, root), "index")
    if proof:
        must_raise(lambda: verify_inclusion(lh, index, size, proof[:-1], root), "short")
    must_raise(lambda: verify_inclusion(lh, index, size, [*proof, root], root), "long")


@pytest.mark.parametrize(("first", "second"), [(1, 2), (1, 21), (4, 21), (7, 16), (13, 21)])
def test_consistency_mutations(store: TreeStore, first: int, second: int) -> None:
    proof = store.consistency_proof(first, second)
    r1, r2 = store.root(first), store.root(second)
    verify_consistency(first, second, proof, r1, r2)
    for pos in range(len(proof)):
        for m in flips(proof[pos]):
            p = [*proof[:pos], m, *proof[pos + 1 :]]
            must_raise(partial(verify_consistency, first, second, p, r1, r2), "proof")
    for m in flips(r1):
        must_raise(partial(verify_consistency, first, second, proof, m, r2), "first root")
    for m in flips(r2):
        must_raise(partial(verify_consistency, first, second, proof, r1, m), "second root")
    must_raise(lambda: verify_consistency(first, second, proof[:-1], r1, r2), "short")


@pytest.fixture(scope="module")
def signed(signers: dict[str, Signer], store: TreeStore) -> SignedCheckpoint:
    cp = Checkpoint("alliance.example/ledger", 21, store.root(21), bytes(range(32)), 1_700_000)
    return signers["hosp-a"].sign(cp).merge(signers["hosp-b"].cosign(signers["hosp-a"].sign(cp)))


def _verify_body(body: bytes, sigs: tuple[Signature, ...], trusted: TrustedKeys) -> None:
    verify_checkpoint(SignedCheckpoint(Checkpoint.from_body(body), sigs), trusted)


def test_checkpoint_body_mutations(signed: SignedCheckpoint, trusted: TrustedKeys) -> None:
    verify_checkpoint(signed, trusted)
    body = signed.body()
    for m in flips(body):
        must_raise(partial(_verify_body, m, signed.signatures, trusted), "body")


def _with_sig(signed: SignedCheckpoint, pos: int, sig: bytes) -> SignedCheckpoint:
    s = signed.signatures[pos]
    sigs = list(signed.signatures)
    sigs[pos] = Signature(s.key_name, s.alg, sig)
    return SignedCheckpoint(signed.checkpoint, tuple(sigs))


def test_ed25519_signature_every_bit(signed: SignedCheckpoint, trusted: TrustedKeys) -> None:
    for pos, s in enumerate(signed.signatures):
        if s.alg != ED25519:
            continue
        for m in flips(s.sig):
            bad = _with_sig(signed, pos, m)
            must_raise(partial(verify_checkpoint, bad, trusted), "ed25519")


def test_mldsa_signature_every_byte(signed: SignedCheckpoint, trusted: TrustedKeys) -> None:
    # One flipped bit in every byte (the bit position cycles), checked directly against the
    # key as verify_checkpoint does; every bit through verify_checkpoint is in the slow test.
    body = signed.body()
    for s in signed.signatures:
        if s.alg != MLDSA65:
            continue
        for m in one_flip_per_byte(s.sig):
            must_raise(partial(trusted.verify, s.key_name, s.alg, m, body), "ml-dsa-65")


@pytest.mark.slow
def test_mldsa_signature_every_bit(signed: SignedCheckpoint, trusted: TrustedKeys) -> None:
    s = signed.signatures[1]
    assert s.alg == MLDSA65
    for m in flips(s.sig):
        bad = _with_sig(signed, 1, m)
        must_raise(partial(verify_checkpoint, bad, trusted), "ml-dsa-65")


def test_serialised_checkpoint_mutations(signed: SignedCheckpoint, trusted: TrustedKeys) -> None:
    """A flipped bit in the stored signed checkpoint: parsing or verification raises. Every bit
    outside the signature values; inside them (covered bit by bit above), every 16th byte."""
    data = signed.to_bytes()
    sig_spans = []
    for s in signed.signatures:
        text = base64.b64encode(s.sig)
        start = data.index(text)
        sig_spans.append(range(start, start + len(text)))
    count = 0
    for i in range(len(data)):
        in_sig = any(i in span for span in sig_spans)
        if in_sig and i % 16:
            continue
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            with pytest.raises(LedgerError):
                verify_checkpoint(SignedCheckpoint.from_bytes(bytes(mutated)), trusted)
            count += 1
    assert count > 8 * 600
