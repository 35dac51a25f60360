"""Witness logic: cosign checkpoints that extend what was cosigned before, refuse split views.

A :class:`Witness` remembers, per log origin, the largest checkpoint it cosigned. Given a new
signed checkpoint and the RFC 9162 consistency proof between the two tree sizes, it:

1. checks every signature of the new checkpoint (writer and cosigners: trusted, both Ed25519
   and ML-DSA-65, valid);
2. if it has cosigned nothing for that origin yet, accepts it (trust on first use);
3. if the sizes are equal, accepts it only with the same root;
4. otherwise checks the consistency proof from the smaller tree to the larger one;
5. cosigns, and remembers the new checkpoint when it is larger.

A checkpoint that fails 3 or 4 is evidence that the log presents different histories to
different parties: the witness raises :class:`ledger.errors.SplitViewError` carrying the pair
(the one it had cosigned, then the new one) and keeps the pair in its state, which serialises to
JSON so that it survives restarts and can be handed to an auditor.

Pure: no I/O; the caller persists :meth:`WitnessState.to_bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import rfc8785

from ledger.checkpoint import ALGORITHMS, Signature, SignedCheckpoint
from ledger.errors import (
    CheckpointError,
    CheckpointSignatureError,
    ConsistencyProofError,
    LedgerError,
    SplitViewError,
)
from ledger.keys import Signer, TrustedKeys, valid_cosigners, verify_signatures
from ledger.verify import verify_consistency

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Evidence:
    """Two signed checkpoints that cannot both be honest, and why."""

    reason: str
    first: SignedCheckpoint
    second: SignedCheckpoint

    def to_json(self) -> dict[str, Any]:
        """JSON object form. Raises nothing."""
        return {
            "reason": self.reason,
            "first": self.first.to_json(),
            "second": self.second.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Evidence:
        """Parse the JSON object form. Raises CheckpointError."""
        if not isinstance(obj, dict) or set(obj) != {"reason", "first", "second"}:
            raise CheckpointError("evidence must have exactly reason, first, second")
        return cls(
            str(obj["reason"]),
            SignedCheckpoint.from_json(obj["first"]),
            SignedCheckpoint.from_json(obj["second"]),
        )


@dataclass
class WitnessState:
    """What a witness remembers: the latest cosigned checkpoint per origin, and evidence."""

    latest: dict[str, SignedCheckpoint] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """RFC 8785 canonical JSON::

            {"evidence": [{"first": <signed>, "reason": "...", "second": <signed>}],
             "latest": {"<origin>": <signed>}, "v": 1}

        where ``<signed>`` is the JSON object form of a signed checkpoint. Raises nothing.
        """
        return rfc8785.dumps(
            {
                "v": STATE_VERSION,
                "latest": {origin: s.to_json() for origin, s in self.latest.items()},
                "evidence": [e.to_json() for e in self.evidence],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> WitnessState:
        """Parse :meth:`to_bytes` output. Raises CheckpointError."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError("witness state is not valid JSON") from err
        if not isinstance(obj, dict) or set(obj) != {"v", "latest", "evidence"}:
            raise CheckpointError("witness state must have exactly v, latest, evidence")
        if obj["v"] != STATE_VERSION:
            raise CheckpointError(f"unsupported witness state version {obj['v']!r}")
        if not isinstance(obj["latest"], dict) or not isinstance(obj["evidence"], list):
            raise CheckpointError("witness state: latest must be an object, evidence a list")
        return cls(
            latest={str(k): SignedCheckpoint.from_json(v) for k, v in obj["latest"].items()},
            evidence=[Evidence.from_json(e) for e in obj["evidence"]],
        )


class Witness:
    """An institution's witness over one or more logs (keyed by checkpoint origin)."""

    def __init__(
        self, signer: Signer, trusted: TrustedKeys, state: WitnessState | None = None
    ) -> None:
        self.signer = signer
        self.trusted = trusted
        self.state = state if state is not None else WitnessState()

    def latest(self, origin: str) -> SignedCheckpoint | None:
        """The largest checkpoint cosigned for ``origin``, or None. Raises nothing."""
        return self.state.latest.get(origin)

    def _refuse(
        self, reason: str, seen: SignedCheckpoint, new: SignedCheckpoint, cause: Exception | None
    ) -> SplitViewError:
        evidence = Evidence(reason, seen, new)
        if evidence not in self.state.evidence:
            self.state.evidence.append(evidence)
        err = SplitViewError(
            f"split view on {new.checkpoint.origin!r}: {reason} "
            f"(cosigned size {seen.checkpoint.size}, offered size {new.checkpoint.size})",
            evidence=(seen, new),
        )
        err.__cause__ = cause
        return err

    def cosign(self, new: SignedCheckpoint, proof: Sequence[bytes] = ()) -> SignedCheckpoint:
        """Verify ``new`` against the last cosigned checkpoint and return it cosigned.

        ``proof`` is the consistency proof between the last cosigned size and ``new``'s size
        (from the smaller to the larger; empty for equal sizes or the first checkpoint).
        Raises CheckpointSignatureError / CheckpointError when ``new`` itself is not validly
        signed, SplitViewError (keeping the evidence) when it conflicts with what was cosigned.
        """
        verify_signatures(new, self.trusted)
        cp = new.checkpoint
        seen = self.state.latest.get(cp.origin)
        if seen is not None:
            old = seen.checkpoint
            if cp.size == old.size:
                if cp.root != old.root:
                    raise self._refuse("same tree size, different root", seen, new, None)
            else:
                small, large = (old, cp) if old.size < cp.size else (cp, old)
                try:
                    verify_consistency(small.size, large.size, proof, small.root, large.root)
                except ConsistencyProofError as err:
                    raise self._refuse(
                        f"no valid consistency proof between sizes {small.size} and {large.size}",
                        seen,
                        new,
                        err,
                    ) from err
        cosigned = self.signer.cosign(new)
        if seen is None or cp.size > seen.checkpoint.size:
            self.state.latest[cp.origin] = cosigned
        return cosigned

    def record_evidence(
        self, reason: str, first: SignedCheckpoint, second: SignedCheckpoint
    ) -> SplitViewError:
        """Keep a conflicting pair found by a check outside this class (for instance against the
        tree the witness derives from the log itself) and return the error to raise.

        Raises nothing.
        """
        return self._refuse(reason, first, second, None)

    @property
    def evidence(self) -> list[Evidence]:
        """Every conflicting pair refused so far. Raises nothing."""
        return list(self.state.evidence)


def count_cosigners(signed: SignedCheckpoint, trusted: TrustedKeys) -> int:
    """How many institutions other than the writer validly cosigned (both algorithms).

    Returns 0 when the writer's own two signatures are not both present and valid.
    Raises nothing.
    """
    try:
        writer = signed.writer
        for alg in ALGORITHMS:
            sigs = [s for s in signed.signatures if s.key_name == writer and s.alg == alg]
            if len(sigs) != 1:
                return 0
            trusted.verify(writer, alg, sigs[0].sig, signed.body())
    except (CheckpointSignatureError, LedgerError):
        return 0
    return len(valid_cosigners(signed, trusted))


def is_final(signed: SignedCheckpoint, trusted: TrustedKeys, quorum: int) -> bool:
    """Whether at least ``quorum`` distinct trusted institutions other than the writer have
    validly cosigned ``signed`` (and the writer's own signatures are valid). Raises nothing."""
    return count_cosigners(signed, trusted) >= quorum


def merge_cosignatures(
    base: SignedCheckpoint, others: Sequence[SignedCheckpoint], trusted: TrustedKeys
) -> SignedCheckpoint:
    """``base`` with every valid cosignature pair found in ``others`` added.

    Signatures from other checkpoints' bodies, untrusted keys, invalid signatures and
    institutions without both algorithms are left out, so the result always passes
    :func:`ledger.checkpoint.verify_signatures` when ``base`` does. Raises nothing.
    """
    merged = base
    for other in others:
        if other.checkpoint != base.checkpoint:
            continue
        good = valid_cosigners(other, trusted) - set(merged.signers())
        if not good:
            continue
        extra: list[Signature] = []
        have: set[tuple[str, str]] = set()
        for s in other.signatures:
            if s.key_name not in good or (s.key_name, s.alg) in have:
                continue
            try:
                trusted.verify(s.key_name, s.alg, s.sig, base.body())
            except CheckpointSignatureError:
                continue
            have.add((s.key_name, s.alg))
            extra.append(s)
        merged = SignedCheckpoint(merged.checkpoint, merged.signatures + tuple(extra))
    return merged
