"""Checkpoints: canonical body, hybrid signatures, cosignatures, key and trust files."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ledger.checkpoint import ED25519, MLDSA65, Checkpoint, Signature, SignedCheckpoint
from ledger.errors import CheckpointError, CheckpointSignatureError, KeyFileError, LedgerError
from ledger.keys import Signer, TrustedKeys, cosign
from ledger.merkle import EMPTY_ROOT
from ledger.verify import verify_checkpoint

ROOT = bytes(range(32))
CP = Checkpoint("alliance.example/ledger", 42, ROOT, bytes(32), 1_767_000_000_123)


def test_body_is_documented_text() -> None:
    b64root = base64.b64encode(ROOT).decode()
    assert (
        CP.body()
        == (
            f"alliance.example/ledger\n42\n{b64root}\nprev {'A' * 43}=\ntime 1767000000123\n"
        ).encode()
    )
    assert Checkpoint.from_body(CP.body()) == CP
    assert len(CP.body_hash()) == 32 and CP.body_hash() != CP.root


@pytest.mark.parametrize(
    "body",
    [
        b"o\n042\n"
        + base64.b64encode(EMPTY_ROOT)
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1\n",
        b"o\n42\n"
        + base64.b64encode(EMPTY_ROOT)
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1",
        b"o\n42\n"
        + base64.b64encode(EMPTY_ROOT)[:-4]
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1\n",
        b"o o\n42\n"
        + base64.b64encode(EMPTY_ROOT)
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1\n",
        b"o\n42\n"
        + base64.b64encode(EMPTY_ROOT)
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1\nextra\n",
        b"o\n-1\n"
        + base64.b64encode(EMPTY_ROOT)
        + b"\nprev "
        + base64.b64encode(bytes(32))
        + b"\ntime 1\n",
    ],
)
def test_malformed_bodies_rejected(body: bytes) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint.from_body(body)


def test_field_validation() -> None:
    with pytest.raises(CheckpointError):
        Checkpoint("", 1, ROOT, bytes(32), 0)
    with pytest.raises(CheckpointError):
        Checkpoint("o", -1, ROOT, bytes(32), 0)
    with pytest.raises(CheckpointError):
        Checkpoint("o", 1, ROOT[:31], bytes(32), 0)
    with pytest.raises(CheckpointError):
        Checkpoint("o", True, ROOT, bytes(32), 0)


def test_sign_verify_roundtrip(signers: dict[str, Signer], trusted: TrustedKeys) -> None:
    signed = signers["hosp-a"].sign(CP)
    assert [(s.key_name, s.alg) for s in signed.signatures] == [
        ("hosp-a", ED25519),
        ("hosp-a", MLDSA65),
    ]
    assert len(signed.signatures[1].sig) == 3309
    assert verify_checkpoint(signed, trusted) == CP
    again = SignedCheckpoint.from_bytes(signed.to_bytes())
    assert again == signed
    assert verify_checkpoint(again, trusted) == CP
    assert signed.writer == "hosp-a"
    assert signed.body_hash() == CP.body_hash()


def test_both_signatures_required(signers: dict[str, Signer], trusted: TrustedKeys) -> None:
    signed = signers["hosp-a"].sign(CP)
    for keep in (0, 1):
        only = SignedCheckpoint(CP, (signed.signatures[keep],))
        with pytest.raises(CheckpointSignatureError) as exc:
            verify_checkpoint(only, trusted)
        assert exc.value.key_name == "hosp-a"
        assert "both" in str(exc.value)
    with pytest.raises(CheckpointSignatureError):
        verify_checkpoint(SignedCheckpoint(CP, ()), trusted)
    dup = SignedCheckpoint(CP, (*signed.signatures, signed.signatures[0]))
    with pytest.raises(CheckpointSignatureError, match="duplicate"):
        verify_checkpoint(dup, trusted)


def test_untrusted_and_swapped_signatures(signers: dict[str, Signer], trusted: TrustedKeys) -> None:
    stranger = Signer.generate("stranger")
    with pytest.raises(CheckpointSignatureError) as exc:
        verify_checkpoint(stranger.sign(CP), trusted)
    assert exc.value.key_name == "stranger"
    # hosp-b's signatures presented under hosp-a's name
    b = signers["hosp-b"].sign(CP)
    forged = SignedCheckpoint(CP, tuple(Signature("hosp-a", s.alg, s.sig) for s in b.signatures))
    with pytest.raises(CheckpointSignatureError):
        verify_checkpoint(forged, trusted)
    # a signature over another checkpoint
    other = Checkpoint(CP.origin, CP.size + 1, CP.root, CP.prev, CP.time)
    moved = SignedCheckpoint(other, signers["hosp-a"].sign(CP).signatures)
    with pytest.raises(CheckpointSignatureError):
        verify_checkpoint(moved, trusted)
    bad_alg = SignedCheckpoint(CP, (Signature("hosp-a", "rsa", b"x"),))
    with pytest.raises(CheckpointSignatureError, match="unknown algorithm"):
        verify_checkpoint(bad_alg, trusted)


def test_cosign_and_merge(signers: dict[str, Signer], trusted: TrustedKeys) -> None:
    signed = signers["hosp-a"].sign(CP)
    b = cosign(signed, signers["hosp-b"])
    c = cosign(signed, signers["hosp-c"])
    assert b.signers() == ["hosp-a", "hosp-b"]
    assert cosign(b, signers["hosp-b"]) == b  # idempotent
    merged = b.merge(c)
    assert merged.signers() == ["hosp-a", "hosp-b", "hosp-c"]
    assert merged.writer == "hosp-a"
    assert verify_checkpoint(merged, trusted) == CP
    with pytest.raises(CheckpointError):
        b.merge(signers["hosp-a"].sign(Checkpoint("x", 1, ROOT, ROOT, 1)))


def test_from_bytes_strict(signers: dict[str, Signer]) -> None:
    signed = signers["hosp-a"].sign(CP)
    obj = json.loads(signed.to_bytes())
    with pytest.raises(CheckpointError, match="canonical"):
        SignedCheckpoint.from_bytes(json.dumps(obj, indent=1).encode())
    obj["extra"] = 1
    with pytest.raises(CheckpointError):
        SignedCheckpoint.from_bytes(json.dumps(obj).encode())
    with pytest.raises(CheckpointError):
        SignedCheckpoint.from_bytes(b"not json")
    assert isinstance(CheckpointError("x"), LedgerError)


def test_key_file_roundtrip(tmp_path: Path, trusted: TrustedKeys) -> None:
    signer = Signer.generate("hosp-x")
    path = tmp_path / "keys" / "hosp-x.key"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Signer.load(path)
    assert loaded.name == "hosp-x"
    assert loaded.public_keys() == signer.public_keys()
    tk = TrustedKeys.of([signer])
    verify_checkpoint(loaded.sign(CP), tk)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as exc:
        Signer.load(path)
    assert exc.value.path == path
    os.chmod(path, 0o600)
    path.write_text("{}")
    with pytest.raises(KeyFileError):
        Signer.load(path)
    with pytest.raises(KeyFileError):
        Signer.load(tmp_path / "missing.key")


def test_trust_file_roundtrip(tmp_path: Path, trusted: TrustedKeys) -> None:
    path = tmp_path / "trust.json"
    trusted.save(path)
    loaded = TrustedKeys.load(path)
    assert dict(loaded) == dict(trusted)
    assert loaded.digest() == trusted.digest()
    assert sorted(loaded) == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
    path.write_bytes(path.read_bytes().replace(b'"v":1', b'"v":2'))
    with pytest.raises(KeyFileError) as exc:
        TrustedKeys.load(path)
    assert exc.value.path == path
