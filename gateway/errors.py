"""The gateway's exception tree.

Every error the gateway raises on purpose derives from :class:`GatewayError`. Errors carry the
context an operator needs (a record id, a CID, a leaf index, a message control id) but never
patient data: the message of an error may be logged and may be sent to another institution.
Third-party exceptions are translated at the adapter boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ledger import errors as ledger_errors


class GatewayError(Exception):
    """Root of every error raised on purpose by the gateway."""


class ConfigurationError(GatewayError):
    """The settings are inconsistent or a required file is missing."""


class BackendError(GatewayError):
    """A backend (blob store, log, state store, key store) failed or is unreachable.

    ``backend`` names which one, so that readiness checks and error reports can say it.
    """

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend


class BlobNotFoundError(BackendError):
    """The blob store has no block with this CID."""

    def __init__(self, cid: str, *, backend: str) -> None:
        super().__init__(f"block {cid} not found", backend=backend)
        self.cid = cid


class LogConflictError(BackendError, ledger_errors.LogConflictError):
    """A conditional append lost the race: the log's last sequence is not the expected one.
    Also the ledger's :class:`ledger.errors.LogConflictError`, which the sequencer handles."""

    def __init__(self, expected: int, actual: int | None, *, backend: str) -> None:
        Exception.__init__(
            self,
            f"{backend}: conditional append expected last sequence {expected}, log has {actual}",
        )
        self.backend = backend
        self.expected = expected
        self.actual = actual


class LogUnavailableError(BackendError, ledger_errors.LogUnavailableError):
    """The log cannot be reached or did not answer in time; the sequencer retries. Also the
    ledger's :class:`ledger.errors.LogUnavailableError`."""


class KeyDestroyedError(GatewayError):
    """The key-encryption key was destroyed (crypto-shredding): the record cannot be decrypted."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"key-encryption key {key_id} has been destroyed")
        self.key_id = key_id


class KeyNotFoundError(GatewayError):
    """The key store has no key for this id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key {key_id} in the key store")
        self.key_id = key_id


class IntegrityError(GatewayError):
    """Stored data does not match its anchor on the ledger (tampering or corruption).

    Names the record and the CID, never the data itself.
    """

    def __init__(self, message: str, *, record: str | None = None, cid: str | None = None) -> None:
        super().__init__(message)
        self.record = record
        self.cid = cid


@dataclass(frozen=True)
class InputIssue:
    """One problem of a sender's input: what (``message``), where (``location``, FHIRPath-like)
    and its FHIR issue type (``code``: invalid, structure, not-supported ...)."""

    message: str
    location: str | None = None
    code: str = "invalid"


class InvalidInputError(GatewayError):
    """Input from a sender is invalid. ``location`` names the element (FHIRPath-like).

    ``issues`` lists every problem found (each with its own location and issue type); an error
    raised with a single message has that one issue. ``code`` decides the HTTP status of the
    whole error (gateway/app.py).
    """

    def __init__(
        self,
        message: str,
        *,
        location: str | None = None,
        code: str = "invalid",
        issues: Sequence[InputIssue] = (),
    ) -> None:
        super().__init__(message)
        self.location = location
        self.code = code
        self.issues: tuple[InputIssue, ...] = tuple(issues) or (
            InputIssue(message, location, code),
        )

    @classmethod
    def from_issues(cls, issues: Sequence[InputIssue], *, code: str) -> InvalidInputError:
        """One error for several problems: its message and location are the first one's."""
        first = issues[0]
        more = len(issues) - 1
        message = first.message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
        return cls(message, location=first.location, code=code, issues=issues)


class NotFoundError(GatewayError):
    """The requested resource does not exist on this gateway."""


class GoneError(GatewayError):
    """The requested resource (or version) was deleted: its tombstone is on the ledger."""


class PreconditionFailedError(GatewayError):
    """A conditional write's precondition does not hold (HTTP 412): ``If-Match`` names a
    version that is not the current one, or a condition matches more than one resource."""


class ConflictError(GatewayError):
    """The write conflicts with what is stored (HTTP 409), e.g. a conditional update that
    matched nothing names an id that already holds another resource."""
