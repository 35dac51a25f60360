"""De-duplication of HL7 v2 messages by (sending facility, MSH-10).

A message whose control id was already accepted from the same facility gets its original ACK
replayed and is not stored again; the same control id with different content is a conflict
(answered AE and logged). State lives in the StateStore (Redis in production, shared by every
worker; process memory in the embedded profile). Keys hash the facility and control id, so
nothing of the message appears in them. A second copy arriving while the first is still being
processed is told so (the sender retries) rather than processed twice.

The claims and the acceptances of concurrent messages are grouped: one Redis round trip
(a pipeline of ``SET NX GET``, or of ``SET``) for all the messages that arrive together.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from gateway.backends.protocols import StateItem, StateStore
from ledger.groupcommit import GroupCommitter

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
    """Begin/finish/abort around the processing of one message. Raises BackendError.

    :meth:`start` (inside the running loop) before use, :meth:`stop` after.
    """

    def __init__(self, state: StateStore) -> None:
        self._state = state
        # Acceptances being recorded right now (key -> (content hash, ACKs)): a copy arriving
        # meanwhile at this gateway is answered from here rather than told to retry.
        self._recording: dict[str, tuple[str, tuple[bytes, ...]]] = {}
        self._claims: GroupCommitter[StateItem, bytes | None] = GroupCommitter(
            state.claim_many, name="dedup-claims", max_delay=0.0005, concurrency=2
        )
        self._accepts: GroupCommitter[StateItem, None] = GroupCommitter(
            self._set_many, name="dedup-accepts", max_delay=0.0005, concurrency=2
        )

    async def _set_many(self, items: list[StateItem]) -> list[None]:
        await self._state.set_many(items)
        return [None] * len(items)

    def start(self) -> None:
        """Start the grouping tasks."""
        self._claims.start()
        self._accepts.start()

    async def stop(self) -> None:
        """Stop the grouping tasks."""
        await self._claims.stop()
        await self._accepts.stop()

    async def begin(self, facility: str, control_id: str, content_hash: str) -> Decision:
        """Claim the message, or say why not."""
        claim = orjson.dumps({"h": content_hash, "s": "busy"})
        (raw,) = await self._claims.submit([(_key(facility, control_id), claim, IN_PROGRESS_TTL_S)])
        if raw is None:
            return New()
        record = orjson.loads(raw)
        if record["h"] != content_hash:
            return Conflict()
        if record["s"] == "busy":
            return InProgress()
        return Replay(tuple(bytes.fromhex(a) for a in record["acks"]))

    def record(
        self, facility: str, control_id: str, content_hash: str, acks: Sequence[bytes]
    ) -> asyncio.Future[list[None]]:
        """Start recording the accepted message and its ACKs (for replays): a future that
        fails with the store's error. Until it is done, a copy of the message gets the same
        ACKs from memory. Raises RuntimeError when stopped."""
        key = _key(facility, control_id)
        record = {"h": content_hash, "s": "done", "acks": [a.hex() for a in acks]}
        encoded = orjson.dumps(record)
        self._recording[key] = (content_hash, tuple(acks))
        try:
            fut = self._accepts.enqueue([(key, encoded, ACCEPTED_TTL_S)])
        except RuntimeError:
            self._recording.pop(key, None)
            raise
        fut.add_done_callback(lambda _: self._recording.pop(key, None))
        return fut

    async def abort(self, facility: str, control_id: str) -> None:
        """Release the claim of a message that was not accepted, so a retry is processed."""
        await self._state.delete(_key(facility, control_id))
