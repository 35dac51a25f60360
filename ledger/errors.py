"""Exceptions of the ledger package.

Everything the ledger raises on purpose derives from :class:`LedgerError`. Failed verifications
derive from :class:`VerificationError`, whose subclasses say what failed. Every error carries its
context (leaf index, tree size, key name, file and byte offset) as attributes and in its message,
never patient data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledger.checkpoint import SignedCheckpoint


class LedgerError(Exception):
    """Root of every error the ledger package raises."""


class LeafFormatError(LedgerError):
    """A leaf is not a well-formed, canonical leaf of a known kind.

    ``kind`` and ``field`` name the leaf kind and field at fault when known.
    """

    def __init__(self, message: str, *, kind: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field


class KeyFileError(LedgerError):
    """A signing-key file or trust file cannot be read, written or parsed. ``path`` names it."""

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = Path(path) if path is not None else None


class VerificationError(LedgerError):
    """A proof, checkpoint or stored structure does not verify."""


class LogConflictError(LedgerError):
    """A conditional append to the log lost the race: the log's last sequence is not the one
    expected (``expected``; ``actual`` when the log said). Log adapters raise it (or a
    subclass); the sequencer catches up and retries on top."""

    def __init__(self, expected: int, actual: int | None, *, log: str = "log") -> None:
        super().__init__(
            f"{log}: conditional append expected last sequence {expected}, log has {actual}"
        )
        self.expected = expected
        self.actual = actual


class LogUnavailableError(LedgerError):
    """The log cannot be reached or did not answer in time (a passing condition: the
    sequencer retries the same message for a while). Any other error of a log adapter is
    final for that append."""


class GroupCommitStoppedError(LedgerError):
    """A group commit was stopped (or never started): the submission was not carried out.
    ``name`` names the group commit."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} group commit is not running")
        self.name = name


class InclusionProofError(VerificationError):
    """An inclusion proof does not prove leaf ``index`` in the tree of ``tree_size``."""

    def __init__(self, message: str, *, index: int, tree_size: int) -> None:
        super().__init__(f"inclusion of leaf {index} in tree of size {tree_size}: {message}")
        self.index = index
        self.tree_size = tree_size


class ConsistencyProofError(VerificationError):
    """A consistency proof does not prove that tree ``first`` is a prefix of tree ``second``."""

    def __init__(self, message: str, *, first: int, second: int) -> None:
        super().__init__(f"consistency of tree size {first} with size {second}: {message}")
        self.first = first
        self.second = second


class CheckpointSignatureError(VerificationError):
    """A checkpoint signature is missing, from an unknown key, or invalid.

    ``key_name`` is the institution and ``alg`` the algorithm concerned (None when not known).
    """

    def __init__(
        self, message: str, *, key_name: str | None = None, alg: str | None = None
    ) -> None:
        who = f"signature {alg or '?'} of {key_name!r}: " if key_name is not None else ""
        super().__init__(who + message)
        self.key_name = key_name
        self.alg = alg


class CheckpointError(VerificationError):
    """A checkpoint is malformed (bad field, non-canonical encoding) or breaks the chain."""

    def __init__(self, message: str, *, size: int | None = None) -> None:
        super().__init__(f"checkpoint of size {size}: {message}" if size is not None else message)
        self.size = size


class SplitViewError(VerificationError):
    """Two checkpoints that cannot both be honest: same size and other root, or no extension.

    ``evidence`` holds both signed checkpoints, the earlier-accepted one first.
    """

    def __init__(
        self, message: str, *, evidence: tuple[SignedCheckpoint, SignedCheckpoint]
    ) -> None:
        super().__init__(message)
        self.evidence = evidence


class StoreCorruptionError(VerificationError):
    """Stored tree data is inconsistent. ``path`` and ``offset`` name the first bad byte range."""

    def __init__(self, message: str, *, path: Path | str, offset: int) -> None:
        super().__init__(f"{path} at byte offset {offset}: {message}")
        self.path = Path(path)
        self.offset = offset


class TreeRangeError(LedgerError, ValueError):
    """A leaf index or tree size is out of range for the tree asked about."""

    def __init__(self, message: str, *, index: int | None = None, tree_size: int | None = None):
        super().__init__(message)
        self.index = index
        self.tree_size = tree_size


class ProofFormatError(VerificationError):
    """A hash or proof in its wire form (hex) is malformed. ``what`` names the value."""

    def __init__(self, message: str, *, what: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
