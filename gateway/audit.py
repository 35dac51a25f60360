"""``gateway verify``'s engine: a full audit of the ledger, independent of the running gateway.

What is checked, in order (docs/ledger-format.md, "Verifying, step by step"):

1. every log message is read back (the log adapter checks its own framing, e.g. FileLog's
   per-record CRC, and names the file and byte offset of a damaged record);
2. every batch is decoded, its writer-signed checkpoint parsed strictly and **both** signatures
   (Ed25519 and ML-DSA-65) of the writer and of every cosigner verified against the trust file;
3. the Merkle tree is re-derived leaf by leaf; each checkpoint's size, root, origin, batch id
   and ``prev`` link to the previous checkpoint must match what the log gives;
4. every leaf is decoded and validated (canonical RFC 8785 form, known kind, whitelisted
   fields of the right shapes);
5. the trust file in use must be anchored by a ``key`` leaf of action ``trust``, and every
   ``record`` leaf's dictionary version by an earlier ``dictionary`` leaf; every record an
   ``erasure`` leaf lists must have been anchored before it by the same custodian, under the
   same patient (a ``key`` leaf of action ``restrict`` is checked for its shape like any);
   and every access-log container (a ``record`` leaf of type ``AuditEvent``) must come right
   after its ``access`` leaves, one per AuditEvent it contains, of the same source;
6. the node's stored tree files are checked (CRC of every entry, every node re-hashed from its
   children) and compared with the re-derived tree;
7. with ``blobs=True``, every stored ciphertext is re-hashed against its ``record`` leaf, and
   every sealed Consent is fetched; given the alliance consent key, it is opened (its
   associated data binds the leaf's consent id, version and patient) and the SHA-256 of its
   plaintext (salt || RFC 8785 bytes) checked against its ``consent`` leaf.

Findings name the log message, leaf index or range, CID, or file and byte offset. The audit
never raises for a finding; it returns an :class:`AuditReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.protocols import Backends
from gateway.consents import open_consent
from gateway.crypto import sha256_hex
from gateway.errors import BackendError, BlobNotFoundError, IntegrityError
from gateway.packing import cut
from gateway.views import ACCESS_LOG_TYPE, RecordAnchor, anchor_of_leaf
from ledger.errors import LeafFormatError, LedgerError
from ledger.keys import Signer, TrustedKeys
from ledger.leaves import ConsentLeaf, RecordLeaf, decode_leaf
from ledger.sequencer import Ledger
from ledger.stored_tree import TreeStore

MAX_LEAF_PROBLEMS = 20


@dataclass
class AuditReport:
    """What the audit found; ``ok`` when nothing."""

    leaves: int = 0
    batches: int = 0
    log_messages: int = 0
    root: bytes = b""
    records_checked: int = 0
    consents_checked: int = 0
    records_erased: int = 0
    restrictions: int = 0
    access_leaves: int = 0
    signatures_checked: int = 0
    trust_anchored: bool = False
    saved_checkpoint_size: int | None = None
    problems: list[str] = field(default_factory=list)
    tree: TreeStore | None = None

    @property
    def ok(self) -> bool:
        """True when the audit found nothing wrong."""
        return not self.problems


async def audit(
    backends: Backends,
    *,
    trusted: TrustedKeys,
    origin: str,
    signer: Signer,
    stored_tree: TreeStore | None = None,
    blobs: bool = False,
    progress: Callable[[int, int], None] | None = None,
    consent_key: bytes | None = None,
) -> AuditReport:
    """Audit the ledger in ``backends.log`` (and its blobs; sealed Consents are opened with
    ``consent_key`` when given). Never raises for a finding."""
    report = AuditReport()
    anchors: list[RecordAnchor] = []
    consents: list[tuple[ConsentLeaf, int]] = []
    leaf_problems = 0
    dictionaries: set[str] = set()  # versions anchored by a dictionary leaf so far
    unanchored: dict[str, list[int]] = {}  # dictionary version -> record leaves naming it
    # hash((custodian, record id as sealed, patient)) of every record leaf so far, to check
    # what erasure leaves name: 64-bit hashes (a few dozen MB for a million leaves), where a
    # collision could only hide a wrong erasure leaf, never report a right one
    sealed: set[int] = set()
    ledger = Ledger(
        log=backends.log,
        tree=TreeStore.memory(),
        signer=signer,
        trusted=trusted,
        origin=origin,
    )
    try:
        total = await backends.log.last_seq()
    except BackendError as exc:
        report.problems.append(f"log unreadable: {exc}")
        return report
    report.log_messages = total

    def on_batch(first: int, leaves: Sequence[bytes], seq: int) -> None:
        nonlocal leaf_problems
        report.batches += 1
        if ledger.latest is not None:
            report.signatures_checked += len(ledger.latest.signatures)
        decoded: list[dict[str, Any] | None] = []
        for offset, raw in enumerate(leaves):
            try:
                leaf = decode_leaf(raw)
            except LeafFormatError as exc:
                leaf_problems += 1
                decoded.append(None)
                if leaf_problems <= MAX_LEAF_PROBLEMS:
                    report.problems.append(f"log message {seq}, leaf {first + offset}: {exc}")
                continue
            decoded.append(leaf)
            if leaf["kind"] == "access":
                report.access_leaves += 1
            if _unpaired_access_log(leaf, decoded[:-1]):
                report.problems.append(
                    f"log message {seq}, leaf {first + offset}: access-log container of "
                    f"{len(leaf['contains'])} AuditEvents is not right after its "
                    f"{len(leaf['contains'])} access leaves of {leaf['source']}"
                )
            if leaf["kind"] == "dictionary":
                dictionaries.add(str(leaf["version"]))
            elif leaf["kind"] == "erasure":
                _check_erasure(report, leaf, first + offset, sealed)
            elif leaf["kind"] == "key" and leaf["action"] == "restrict":
                report.restrictions += 1
            elif leaf["kind"] == "record":
                sealed.add(hash((leaf["source"], leaf["record"], leaf["patient"])))
                if leaf["dictionary"] not in dictionaries:
                    unanchored.setdefault(str(leaf["dictionary"]), []).append(first + offset)
                if blobs:
                    anchors.append(anchor_of_leaf(RecordLeaf.from_leaf(leaf), first + offset))
            elif leaf["kind"] == "consent" and blobs:
                consents.append((ConsentLeaf.from_leaf(leaf), first + offset))
        if progress is not None:
            progress(seq, total)

    ledger.add_listener(on_batch)
    try:
        await ledger.catch_up()
    except (LedgerError, BackendError) as exc:
        report.problems.append(str(exc) + _file_position(backends, ledger.applied_seq + 1))
    if progress is not None:
        progress(total, total)
    if leaf_problems > MAX_LEAF_PROBLEMS:
        report.problems.append(f"... and {leaf_problems - MAX_LEAF_PROBLEMS} more bad leaves")
    report.leaves = ledger.size
    report.tree = ledger.tree
    report.root = ledger.root() if ledger.size else b""
    report.trust_anchored = trusted.digest().hex() in ledger.trust_anchors
    if ledger.size and not report.trust_anchored and report.ok:
        report.problems.append(
            f"the trust file in use (SHA-256 {trusted.digest().hex()}) is not anchored by any "
            "key leaf of action 'trust'"
        )
    for version, indexes in unanchored.items():
        later = " (anchored only later)" if version in dictionaries else ""
        report.problems.append(
            f"{len(indexes)} record leaf/leaves name dictionary version {version!r} with no "
            f"earlier dictionary leaf{later}: first at leaf {indexes[0]}"
        )
    if stored_tree is not None:
        _check_stored(report, stored_tree, ledger)
    if blobs:
        await _check_blobs(report, backends, anchors)
        await _check_consents(report, backends, consents, consent_key)
    return report


async def _check_consents(
    report: AuditReport,
    backends: Backends,
    consents: Sequence[tuple[ConsentLeaf, int]],
    key: bytes | None,
) -> None:
    """Fetch every sealed Consent; with the consent key, open it and check it against its
    leaf (appends problems to ``report``)."""
    for leaf, index in consents:
        report.consents_checked += 1
        where = f"consent {leaf.consent} v{leaf.version} (leaf {index})"
        try:
            block = await backends.blobs.get(leaf.cid)
        except BlobNotFoundError:
            report.problems.append(f"{where}: sealed Consent {leaf.cid} missing")
            continue
        except BackendError as exc:
            report.problems.append(f"blob store: {exc}")
            return
        if key is None:
            if cut(block, leaf.byte_range) is None:
                report.problems.append(f"{where}: range runs past the end of block {leaf.cid}")
            continue
        try:
            open_consent(block, leaf, key=key)
        except IntegrityError as exc:
            report.problems.append(f"{where}: {exc}")


def _check_erasure(
    report: AuditReport, leaf: dict[str, object], index: int, sealed: set[int]
) -> None:
    """An ``erasure`` leaf may list only records its custodian anchored earlier under its
    patient. Appends problems to ``report``."""
    source, patient = leaf["source"], leaf["patient"]
    records = leaf["records"]
    assert isinstance(records, list)
    report.records_erased += len(records)
    for rec in records:
        if hash((source, rec, patient)) not in sealed:
            report.problems.append(
                f"leaf {index}: erasure by {source} lists record {rec}, which {source} did not "
                "anchor before it under the patient the leaf names"
            )


def _unpaired_access_log(leaf: dict[str, Any], before: Sequence[dict[str, Any] | None]) -> bool:
    """Whether ``leaf`` is an access-log container (docs/ledger-format.md, ``access``) whose
    AuditEvents' ``access`` leaves are not the leaves right before it in its batch."""
    if leaf["kind"] != "record" or leaf["type"] != ACCESS_LOG_TYPE or "contains" not in leaf:
        return False
    n = len(leaf["contains"])
    prior = before[len(before) - n :] if n <= len(before) else None
    return prior is None or any(
        x is None or x["kind"] != "access" or x["source"] != leaf["source"] for x in prior
    )


def _file_position(backends: Backends, seq: int) -> str:
    """`` (<file> at byte offset N)`` for log message ``seq`` of a file-backed log, else ''."""
    records = getattr(backends.log, "records", None)
    path = getattr(backends.log, "path", None)
    if records is None or path is None:
        return ""
    try:
        infos = records()
        info = infos[seq - 1] if 0 < seq <= len(infos) else None
    except (OSError, BackendError, IndexError, TypeError):
        return ""
    if info is None:
        return ""
    return f" ({path} at byte offset {info.offset})"


def _check_stored(report: AuditReport, stored: TreeStore, ledger: Ledger) -> None:
    try:
        stored.check()
    except LedgerError as exc:
        report.problems.append(f"stored tree: {exc}")
        return
    n = min(stored.size, ledger.size)
    if n and stored.root(n) != ledger.root(n):
        # Name the first differing leaf hash (file and offset of level 0).
        lo, hi = 0, n
        while lo < hi:  # first size whose root differs
            mid = (lo + hi) // 2
            if mid and stored.root(mid) != ledger.root(mid):
                hi = mid
            else:
                lo = mid + 1
        bad = max(lo - 1, 0)
        report.problems.append(
            f"stored tree: leaf {bad} (level-00.bin at byte offset {32 * bad}) does not match "
            "the tree derived from the log"
        )


async def _check_blobs(
    report: AuditReport, backends: Backends, anchors: Sequence[RecordAnchor]
) -> None:
    # The records of one pack are anchored next to each other: keep the last block fetched.
    last: tuple[str, bytes] | None = None
    for anchor in anchors:
        report.records_checked += 1
        where = f"record {anchor.record} v{anchor.version} (leaf {anchor.leaf_index})"
        try:
            if last is None or last[0] != anchor.cid:
                last = (anchor.cid, await backends.blobs.get(anchor.cid))
        except BlobNotFoundError:
            report.problems.append(f"{where}: ciphertext {anchor.where} missing")
            continue
        except BackendError as exc:
            report.problems.append(f"blob store: {exc}")
            break
        data = cut(last[1], anchor.byte_range)
        if data is None or sha256_hex(data) != anchor.sha256:
            report.problems.append(
                f"{where}: ciphertext {anchor.where} does not match its anchored SHA-256"
            )
