"""RFC 9162 conformance of ledger.merkle, ledger.stored_tree and ledger.verify.

The reference code in this file is written from the RFC's text (section 2.1.1 MTH, 2.1.3.1 PATH,
2.1.3.2 inclusion verification, 2.1.4.1 PROOF/SUBPROOF, 2.1.4.2 consistency verification),
step by step, independently of the package's code, and every proof for every tree size from 1
to 300 (every leaf, every pair of sizes) is checked against it. Roots and inclusion proofs are
also cross-checked with pymerkle, whose hashing (security on, sha256) is RFC 9162's.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest

from ledger import merkle
from ledger.errors import ConsistencyProofError, InclusionProofError, TreeRangeError
from ledger.stored_tree import TreeStore
from ledger.verify import root_from_inclusion_proof, verify_consistency, verify_inclusion

MAX = 300


# ---- reference implementation, from RFC 9162's pseudo-code --------------------------------


def ref_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_k(n: int) -> int:
    """Largest power of two smaller than n (RFC 9162 2.1.1: k < n <= 2k)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(entries: list[bytes]) -> bytes:
    """MTH over the raw leaf data (2.1.1)."""
    n = len(entries)
    if n == 0:
        return ref_hash(b"")
    if n == 1:
        return ref_hash(b"\x00" + entries[0])
    k = ref_k(n)
    return ref_hash(b"\x01" + ref_mth(entries[:k]) + ref_mth(entries[k:]))


def ref_path(m: int, entries: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (2.1.3.1)."""
    n = len(entries)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, entries[:k]), ref_mth(entries[k:])]
    return [*ref_path(m - k, entries[k:]), ref_mth(entries[:k])]


def ref_subproof(m: int, entries: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (2.1.4.1)."""
    n = len(entries)
    if m == n:
        return [] if b else [ref_mth(entries)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, entries[:k], b), ref_mth(entries[k:])]
    return [*ref_subproof(m - k, entries[k:], False), ref_mth(entries[:k])]


def ref_verify_inclusion(
    leaf_index: int, tree_size: int, inclusion_path: list[bytes], hash_: bytes, root_hash: bytes
) -> bool:
    """2.1.3.2, step by step."""
    if leaf_index >= tree_size:
        return False
    fn = leaf_index
    sn = tree_size - 1
    r = hash_
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = ref_hash(b"\x01" + p + r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = ref_hash(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def ref_verify_consistency(
    first: int, second: int, consistency_path: list[bytes], first_hash: bytes, second_hash: bytes
) -> bool:
    """2.1.4.2, step by step (for 0 < first < second)."""
    if not consistency_path:
        return False
    path = list(consistency_path)
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    fn = first - 1
    sn = second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = ref_hash(b"\x01" + c + fr)
            sr = ref_hash(b"\x01" + c + sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = ref_hash(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


# ---- fixtures ------------------------------------------------------------------------------


def entries(n: int) -> list[bytes]:
    return [f"leaf {i}".encode() * (i % 3) for i in range(n)]


ENTRIES = entries(MAX)
HASHES = [merkle.leaf_hash(e) for e in ENTRIES]


@pytest.fixture(scope="module")
def store() -> TreeStore:
    s = TreeStore.memory()
    # Appended in uneven batches, as the sequencer does.
    pos = 0
    for step in (1, 2, 5, 13, 64, 7, 100):
        s.append(HASHES[pos : pos + step])
        pos += step
    s.append(HASHES[pos:])
    assert s.size == MAX
    return s


@pytest.fixture(scope="module")
def roots(store: TreeStore) -> list[bytes]:
    return [store.root(n) for n in range(MAX + 1)]


# ---- tests ---------------------------------------------------------------------------------


def test_known_vectors() -> None:
    assert merkle.EMPTY_ROOT.hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    # The eight-leaf test tree of the Certificate Transparency reference test data.
    ct_leaves = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    got = merkle.root([merkle.leaf_hash(x) for x in ct_leaves])
    assert got.hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    assert got == ref_mth(ct_leaves)


def test_roots_match_reference(roots: list[bytes]) -> None:
    for n in range(0, 65):
        assert roots[n] == ref_mth(ENTRIES[:n]), n
    for n in (127, 128, 129, 255, 256, 257, MAX):
        assert roots[n] == ref_mth(ENTRIES[:n]), n
    for n in range(MAX + 1):
        assert roots[n] == merkle.root(HASHES[:n]), n


def test_generation_matches_reference_paths(store: TreeStore) -> None:
    # The recursive reference is O(n) per proof: every leaf and pair up to 64, then samples.
    sizes = [*range(1, 65), 100, 255, 256, 257]
    for n in sizes:
        for m in range(n) if n <= 64 else (0, 1, n // 2, n - 2, n - 1):
            assert store.inclusion_proof(m, n) == ref_path(m, ENTRIES[:n]), (m, n)
        for m in range(1, n) if n <= 64 else (1, 2, 3, n // 2, n - 1):
            assert store.consistency_proof(m, n) == ref_subproof(m, ENTRIES[:n], True), (m, n)


def test_every_inclusion_proof_up_to_300(store: TreeStore, roots: list[bytes]) -> None:
    for n in range(1, MAX + 1):
        root = roots[n]
        for i in range(n):
            proof = store.inclusion_proof(i, n)
            assert ref_verify_inclusion(i, n, proof, HASHES[i], root), (i, n)
            verify_inclusion(HASHES[i], i, n, proof, root)
            if i + 1 < n:
                # The same proof must not prove another leaf hash.
                assert not ref_verify_inclusion(i, n, proof, HASHES[i + 1], root) or (
                    HASHES[i + 1] == HASHES[i]
                )


def test_every_consistency_proof_up_to_300(store: TreeStore, roots: list[bytes]) -> None:
    for n in range(1, MAX + 1):
        for m in range(1, n):
            proof = store.consistency_proof(m, n)
            assert ref_verify_consistency(m, n, proof, roots[m], roots[n]), (m, n)
            verify_consistency(m, n, proof, roots[m], roots[n])
        assert store.consistency_proof(n, n) == []
        verify_consistency(n, n, [], roots[n], roots[n])
        verify_consistency(0, n, [], merkle.EMPTY_ROOT, roots[n])


def test_reference_list_functions_agree_with_store(store: TreeStore) -> None:
    for n in (1, 2, 3, 7, 8, 9, 31, 33, 150, MAX):
        for i in (0, n // 3, n - 1):
            assert merkle.inclusion_proof(HASHES, i, n) == store.inclusion_proof(i, n)
        for m in (1, n // 2 or 1, n - 1 or 1):
            assert merkle.consistency_proof(HASHES, m, n) == store.consistency_proof(m, n)


def test_root_from_inclusion_proof(store: TreeStore, roots: list[bytes]) -> None:
    for n in (1, 5, 64, 299):
        for i in (0, n - 1):
            proof = store.inclusion_proof(i, n)
            assert root_from_inclusion_proof(HASHES[i], i, n, proof) == roots[n]


def test_pymerkle_cross_check(roots: list[bytes]) -> None:
    pymerkle = pytest.importorskip("pymerkle")
    # pymerkle (security on) prefixes 0x00 / 0x01 and splits at the largest power of two,
    # exactly RFC 9162. Its inclusion path is [leaf hash, siblings...] with the siblings in
    # RFC order. Its consistency proofs use their own layout (path plus rule/subset bits), so
    # for those only our roots are checked with pymerkle's own verifier.
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    for e in ENTRIES:
        tree.append_entry(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for n in range(1, MAX + 1):
            assert tree.get_root(n) == roots[n], n
            step = 1 if n <= 64 else 17
            for i in range(0, n, step):
                path = tree.prove_inclusion(i + 1, n).serialize()["path"]
                assert [bytes.fromhex(h) for h in path] == [
                    HASHES[i],
                    *merkle.inclusion_proof(HASHES, i, n),
                ], (i, n)
        for m, n in ((1, 2), (3, 7), (8, 9), (100, 300), (256, 300)):
            proof = tree.prove_consistency(m, n)
            pymerkle.verify_consistency(roots[m], roots[n], proof)


def test_out_of_range_raises(store: TreeStore, roots: list[bytes]) -> None:
    with pytest.raises(TreeRangeError):
        store.inclusion_proof(5, 5)
    with pytest.raises(TreeRangeError):
        store.inclusion_proof(0, MAX + 1)
    with pytest.raises(TreeRangeError):
        store.consistency_proof(6, 5)
    with pytest.raises(TreeRangeError):
        store.root(MAX + 1)
    with pytest.raises(InclusionProofError) as exc:
        verify_inclusion(HASHES[0], 3, 3, [], roots[3])
    assert exc.value.index == 3 and exc.value.tree_size == 3
    with pytest.raises(ConsistencyProofError) as cexc:
        verify_consistency(5, 4, [], roots[5], roots[4])
    assert (cexc.value.first, cexc.value.second) == (5, 4)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(3, 3, [], roots[3], roots[4])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(0, 3, [], roots[1], roots[3])
    with pytest.raises(ConsistencyProofError):
        verify_consistency(3, 5, [], roots[3], roots[5])
    with pytest.raises(ConsistencyProofError):
        # a proof of the right length for other sizes
        verify_consistency(3, 5, store.consistency_proof(3, 6), roots[3], roots[5])
    with pytest.raises(InclusionProofError):
        verify_inclusion(HASHES[1], 1, 5, [*store.inclusion_proof(1, 5), roots[5]], roots[5])
    with pytest.raises(InclusionProofError):
        verify_inclusion(HASHES[1], 1, 5, [b"short"] * 3, roots[5])
