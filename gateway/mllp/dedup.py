"""De-duplication of HL7 v2 messages by (sending facility, MSH-10).

A message whose control id was already accepted from the same facility gets its original ACK
replayed and is not stored again; the same control id with different content is a conflict
(answered AE and logged). State lives in the StateStore (Redis in production, shared by every
worker; process memory in the embedded profile). Keys hash the facility and control id, so
nothing of the message appears in them. A second copy arriving while the first is still being
processed is told so (the sender retries) rather than processed twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.backends.protocols import StateStore

IN_PROGRESS_TTL_S = 120.0
ACCEPTED_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class New:
    """First time: process it."""


@dataclass(frozen=True, slots=True)
class Replay:
    """Accepted before: send these ACKs again."""

    acks: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Conflict:
    """Same control id, different content."""


@dataclass(frozen=True, slots=True)
class InProgress:
    """The same message is being processed right now."""


Decision = New | Replay | Conflict | InProgress


def _key(facility: str, control_id: str) -> str:
    digest = hashlib.sha256(f"{facility}\x00{control_id}".encode()).hexdigest()[:40]
    return f"hl7dedup:{digest}"


class Deduplicator:
    """Begin/finish/abort around the processing of one message. Raises BackendError."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    async def begin(self, facility: str, control_id: str, content_hash: str) -> Decision:
        """Claim the message, or say why not."""
        key = _key(facility, control_id)
        claim = json.dumps({"h": content_hash, "s": "busy"}).encode()
        if await self._state.set_if_absent(key, claim, ttl=IN_PROGRESS_TTL_S):
            return New()
        raw = await self._state.get(key)
        if raw is None:  # expired between the two calls
            return await self.begin(facility, control_id, content_hash)
        record = json.loads(raw)
        if record["h"] != content_hash:
            return Conflict()
        if record["s"] == "busy":
            return InProgress()
        return Replay(tuple(bytes.fromhex(a) for a in record["acks"]))

    async def finish(
        self, facility: str, control_id: str, content_hash: str, acks: Sequence[bytes]
    ) -> None:
        """Record the accepted message and its ACKs (for replays)."""
        record = {"h": content_hash, "s": "done", "acks": [a.hex() for a in acks]}
        encoded = json.dumps(record).encode()
        await self._state.set(_key(facility, control_id), encoded, ttl=ACCEPTED_TTL_S)

    async def abort(self, facility: str, control_id: str) -> None:
        """Release the claim of a message that was not accepted, so a retry is processed."""
        await self._state.delete(_key(facility, control_id))
