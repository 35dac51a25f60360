"""Witness: cosigning extensions, catching split views with evidence, quorum."""

from __future__ import annotations

import pytest

from ledger import merkle
from ledger.checkpoint import Checkpoint, SignedCheckpoint
from ledger.errors import CheckpointSignatureError, SplitViewError
from ledger.keys import Signer, TrustedKeys
from ledger.stored_tree import TreeStore
from ledger.witness import Witness, WitnessState, count_cosigners, is_final

ORIGIN = "alliance.example/ledger"


def checkpoint(store: TreeStore, size: int, prev: bytes = bytes(32)) -> Checkpoint:
    return Checkpoint(ORIGIN, size, store.root(size), prev, 1_000 + size)


@pytest.fixture
def honest() -> TreeStore:
    store = TreeStore.memory()
    store.append([merkle.leaf_hash(b"%d" % i) for i in range(50)])
    return store


def test_cosigns_extensions(
    signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore
) -> None:
    writer, w = signers["hosp-a"], Witness(signers["hosp-b"], trusted)
    first = w.cosign(writer.sign(checkpoint(honest, 10)))
    assert first.signers() == ["hosp-a", "hosp-b"]
    second = w.cosign(writer.sign(checkpoint(honest, 30)), honest.consistency_proof(10, 30))
    assert w.latest(ORIGIN) == second
    # same size, same root: fine (idempotent)
    w.cosign(writer.sign(checkpoint(honest, 30)))
    # an older one, with the proof from it to the latest
    w.cosign(writer.sign(checkpoint(honest, 20)), honest.consistency_proof(20, 30))
    assert w.latest(ORIGIN) is not None and w.latest(ORIGIN).checkpoint.size == 30  # type: ignore[union-attr]
    assert w.evidence == []


def test_split_view_same_size_caught(
    signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore
) -> None:
    """A writer shows two different trees of the same size to two witnesses; when the views
    meet (the checkpoint cosigned by one is offered to the other), the conflict is caught."""
    writer = signers["hosp-a"]
    forked = honest.snapshot()
    forked.truncate(20)
    forked.append([merkle.leaf_hash(b"forged %d" % i) for i in range(30)])
    view_b = writer.sign(checkpoint(honest, 50))
    view_c = writer.sign(checkpoint(forked, 50))
    wb, wc = Witness(signers["hosp-b"], trusted), Witness(signers["hosp-c"], trusted)
    cos_b = wb.cosign(view_b)
    wc.cosign(view_c)
    with pytest.raises(SplitViewError) as exc:
        wc.cosign(cos_b)
    first, second = exc.value.evidence
    assert first.checkpoint.root == forked.root(50)
    assert second.checkpoint.root == honest.root(50)
    assert "same tree size" in str(exc.value)
    # The evidence survives serialisation.
    restored = WitnessState.from_bytes(wc.state.to_bytes())
    assert len(restored.evidence) == 1
    ev = restored.evidence[0]
    assert ev.first == first and ev.second.checkpoint == second.checkpoint
    assert ev.first.checkpoint.size == ev.second.checkpoint.size == 50
    assert ev.first.checkpoint.root != ev.second.checkpoint.root
    # The witness did not move to the conflicting view.
    assert wc.latest(ORIGIN) is not None
    assert wc.latest(ORIGIN).checkpoint.root == forked.root(50)  # type: ignore[union-attr]


def test_split_view_not_an_extension(
    signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore
) -> None:
    writer = signers["hosp-a"]
    w = Witness(signers["hosp-b"], trusted)
    w.cosign(writer.sign(checkpoint(honest, 20)))
    rewritten = TreeStore.memory()
    rewritten.append([merkle.leaf_hash(b"other %d" % i) for i in range(40)])
    bad = writer.sign(checkpoint(rewritten, 40))
    for proof in ([], honest.consistency_proof(20, 40), rewritten.consistency_proof(20, 40)):
        with pytest.raises(SplitViewError) as exc:
            w.cosign(bad, proof)
        assert exc.value.evidence[1] == bad
    assert len(w.evidence) == 1  # the same pair is kept once
    assert w.latest(ORIGIN).checkpoint.size == 20  # type: ignore[union-attr]


def test_state_persists_across_restarts(
    signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore
) -> None:
    writer = signers["hosp-a"]
    w = Witness(signers["hosp-b"], trusted)
    w.cosign(writer.sign(checkpoint(honest, 25)))
    w2 = Witness(signers["hosp-b"], trusted, WitnessState.from_bytes(w.state.to_bytes()))
    forked = TreeStore.memory()
    forked.append([merkle.leaf_hash(b"x%d" % i) for i in range(25)])
    with pytest.raises(SplitViewError):
        w2.cosign(writer.sign(checkpoint(forked, 25)))


def test_refuses_badly_signed(
    signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore
) -> None:
    w = Witness(signers["hosp-b"], trusted)
    stranger = Signer.generate("stranger")
    with pytest.raises(CheckpointSignatureError):
        w.cosign(stranger.sign(checkpoint(honest, 5)))
    assert w.latest(ORIGIN) is None


def test_quorum(signers: dict[str, Signer], trusted: TrustedKeys, honest: TreeStore) -> None:
    signed = signers["hosp-a"].sign(checkpoint(honest, 40))
    assert count_cosigners(signed, trusted) == 0
    assert is_final(signed, trusted, 0) and not is_final(signed, trusted, 1)
    merged = signed
    for name in ("hosp-b", "hosp-c", "hosp-b"):
        merged = merged.merge(Witness(signers[name], trusted).cosign(signed))
    assert count_cosigners(merged, trusted) == 2
    assert is_final(merged, trusted, 2) and not is_final(merged, trusted, 3)
    # an institution with only one valid signature does not count
    d = signers["hosp-d"].cosign(signed)
    half = SignedCheckpoint(d.checkpoint, d.signatures[:3])
    assert count_cosigners(half, trusted) == 0
    # a cosignature by an untrusted institution does not count
    stranger = Signer.generate("stranger")
    assert count_cosigners(stranger.cosign(signed), trusted) == 0
    # the writer's own signature broken: nothing is final
    broken = SignedCheckpoint(
        merged.checkpoint, (merged.signatures[1], merged.signatures[0], *merged.signatures[2:])
    )
    assert count_cosigners(broken, trusted) == 2  # order within the writer's pair is free
    tampered = SignedCheckpoint(
        Checkpoint(ORIGIN, 41, honest.root(41), bytes(32), 1), merged.signatures
    )
    assert not is_final(tampered, trusted, 1)
