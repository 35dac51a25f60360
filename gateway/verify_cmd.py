"""The body of ``gateway verify``: run the audit and print a report.

Returns the exit code: 0 when everything checks out, 1 with a report naming what is wrong.
Raises GatewayError (exit 2) when the backends cannot be opened at all.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from gateway.audit import AuditReport, audit
from gateway.config import Settings
from gateway.datadir import DataDir
from gateway.runtime import (
    build_backends,
    load_consent_key,
    load_secrets,
    load_signer,
    load_trust,
)
from ledger.checkpoint import SignedCheckpoint
from ledger.errors import CheckpointError, LedgerError
from ledger.keys import TrustedKeys
from ledger.stored_tree import TreeStore
from ledger.verify import verify_checkpoint, verify_consistency
from ledger.witness import WitnessState


def _progress(
    stream: TextIO, *, label: str = "log", unit: str = "messages"
) -> Callable[[int, int], None]:
    """A progress bar on ``stream``: redrawn in place on a terminal, otherwise one line per
    tenth of the log (so that CI logs show progress without flooding)."""
    tty = stream.isatty()
    last = [0.0, -1.0]

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        width = 30
        filled = int(width * frac)
        bar = f"  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}"
        if tty:
            now = time.monotonic()
            if now - last[0] < 0.1 and done != total:
                return
            last[0] = now
            stream.write("\r" + bar + ("\n" if done == total else ""))
        else:
            step = int(frac * 10) / 10
            if step <= last[1]:
                return
            last[1] = step
            stream.write(bar + "\n")
        stream.flush()

    return show


def load_saved_checkpoint(path: Path) -> SignedCheckpoint:
    """A checkpoint saved by an auditor: the signed checkpoint's canonical JSON, its base64, or
    the JSON answer of ``GET /ledger/checkpoint`` (its ``checkpoint`` field).

    Raises OSError when unreadable, LedgerError when it is none of these.
    """
    raw = path.read_bytes().strip()
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("checkpoint"), str):
        raw = obj["checkpoint"].encode()
    elif isinstance(obj, dict):
        return SignedCheckpoint.from_bytes(raw)
    try:
        decoded = base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise CheckpointError(f"{path} is neither a signed checkpoint nor its base64") from exc
    return SignedCheckpoint.from_bytes(decoded)


async def run_verify(settings: Settings, *, blobs: bool, from_checkpoint: Path | None) -> int:
    """Audit the ledger of ``settings``; print the report; return the exit code."""
    pkey, master_key = load_secrets(settings)
    backends = build_backends(settings, master_key=master_key)
    signer = load_signer(settings)
    trusted = load_trust(settings, signer)
    tree_dir = DataDir.of(settings).tree
    stored = TreeStore.open(tree_dir, read_only=True) if tree_dir.exists() else None
    show = _progress(sys.stderr)
    started = time.monotonic()
    try:
        report: AuditReport = await audit(
            backends,
            trusted=trusted,
            origin=settings.ledger_origin,
            signer=signer,
            stored_tree=stored,
            blobs=blobs,
            progress=show,
            consent_key=load_consent_key(settings, pkey),
        )
        if report.tree is not None:
            _check_node_checkpoints(report, settings, trusted)
        if from_checkpoint is not None:
            _check_saved(report, from_checkpoint, trusted, settings.ledger_origin)
    finally:
        if stored is not None:
            stored.close()
        await backends.close()
    elapsed = time.monotonic() - started
    print(
        f"ledger: {report.leaves} leaves in {report.batches} batches "
        f"({report.log_messages} log messages), root {report.root.hex() or '(empty)'}"
    )
    print(
        f"checkpoints: {report.batches} verified, {report.signatures_checked} signatures "
        f"(Ed25519 + ML-DSA-65); trust file anchored: {'yes' if report.trust_anchored else 'no'}"
    )
    if report.restrictions or report.records_erased:
        print(
            f"erasure: {report.restrictions} restriction(s), {report.records_erased} record(s) "
            "crypto-shredded (their ciphertexts stay and are still re-hashed)"
        )
    print(
        f"access leaves: {report.access_leaves}, each access-log container checked to come "
        "right after its access leaves"
    )
    if blobs:
        print(
            f"blobs: {report.records_checked} ciphertexts re-hashed, "
            f"{report.consents_checked} sealed Consents opened and checked"
        )
    if report.saved_checkpoint_size is not None:
        print(
            f"saved checkpoint: tree size {report.saved_checkpoint_size} is a prefix of the "
            "current tree (consistency proof verified)"
        )
    if report.ok:
        print(f"verify: OK ({elapsed:.1f} s)")
        return 0
    print(f"verify: FAILED ({len(report.problems)} problem(s))")
    for p in report.problems:
        print(f"  - {p}")
    return 1


def _check_saved(report: AuditReport, path: Path, trusted: TrustedKeys, origin: str) -> None:
    """Check a checkpoint saved by an auditor against the re-derived tree (appends problems to
    ``report``); see :func:`_check_against_tree`."""
    try:
        saved = load_saved_checkpoint(path)
    except (OSError, ValueError, LedgerError) as exc:
        report.problems.append(f"saved checkpoint {path}: {exc}")
        return
    if _check_against_tree(report, saved, f"saved checkpoint {path}", trusted, origin):
        report.saved_checkpoint_size = saved.checkpoint.size


def _check_node_checkpoints(report: AuditReport, settings: Settings, trusted: TrustedKeys) -> None:
    """The node's own records of the ledger are saved checkpoints too: the latest final
    checkpoint it served and the latest checkpoint its witness cosigned. A log rewritten or
    truncated behind the node's back contradicts them. Split-view evidence held by the witness
    is reported as well."""
    paths = DataDir.of(settings)
    final = paths.final_checkpoint
    if final.exists():
        try:
            signed = SignedCheckpoint.from_bytes(final.read_bytes())
        except (OSError, LedgerError) as exc:
            report.problems.append(f"final checkpoint {final}: {exc}")
        else:
            _check_against_tree(report, signed, f"final checkpoint {final}", trusted, "")
    state_path = paths.witness_state
    if state_path.exists():
        try:
            state = WitnessState.from_bytes(state_path.read_bytes())
        except (OSError, LedgerError) as exc:
            report.problems.append(f"witness state {state_path}: {exc}")
            return
        cosigned = state.latest.get(settings.ledger_origin)
        if cosigned is not None:
            label = f"checkpoint cosigned by this node's witness ({state_path})"
            _check_against_tree(report, cosigned, label, trusted, "")
        for ev in state.evidence:
            report.problems.append(
                f"witness state {state_path} holds split-view evidence: {ev.reason} (sizes "
                f"{ev.first.checkpoint.size} and {ev.second.checkpoint.size}, writer "
                f"{ev.second.signers()[0] if ev.second.signatures else '?'})"
            )


def _check_against_tree(
    report: AuditReport, saved: SignedCheckpoint, label: str, trusted: TrustedKeys, origin: str
) -> bool:
    """Check one signed checkpoint against the re-derived tree; True when it is a prefix.

    Its signatures must verify; its tree must be a prefix of the tree the log gives now: a
    larger size means the log was truncated, another root at its size (checked with an RFC 9162
    consistency proof from its tree to the current one) means history was rewritten. An empty
    ``origin`` skips the origin check. Appends problems to ``report``; raises nothing.
    """
    try:
        cp = verify_checkpoint(saved, trusted)
    except LedgerError as exc:
        report.problems.append(f"{label}: {exc}")
        return False
    if origin and cp.origin != origin:
        report.problems.append(f"{label} is of log {cp.origin!r}, not of {origin!r}")
        return False
    if cp.size > report.leaves:
        report.problems.append(
            f"{label} has tree size {cp.size} but the log now gives only {report.leaves} "
            f"leaves: history was truncated (or the log is unreadable past leaf {report.leaves})"
        )
        return False
    if report.tree is None or cp.size == 0:
        return True
    proof = report.tree.consistency_proof(cp.size, report.leaves)
    try:
        verify_consistency(cp.size, report.leaves, proof, cp.root, report.tree.root())
    except LedgerError:
        report.problems.append(
            f"{label} (tree size {cp.size}, root {cp.root.hex()}) is not consistent with the "
            f"log's tree of size {report.leaves}: history was rewritten"
        )
        return False
    return True
