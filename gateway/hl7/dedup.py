"""De-duplication of HL7 v2 messages by (sending facility, MSH-10).

A message whose control id was already accepted from the same facility gets its original ACK
replayed and is not stored again; the same control id with different content is a conflict
(answered AE and logged). State lives in the StateStore (Redis in production, shared by every
worker; process memory in the embedded profile). Keys hash the facility and control id, so
nothing of the message appears in them. A second copy arriving while the first is still being
processed is told so (the sender retries) rather than processed twice; one arriving while the
first's acceptance is being recorded gets the first's ACKs from memory.

A claim names its owner: the gateway's instance id (stable across restarts) and boot epoch (new
at each start). Each running gateway holds a liveness lock for its (instance, epoch) in the
same store, a key with a short TTL refreshed by a heartbeat. A busy claim whose owner is this
instance under an older epoch (this gateway before a crash), or whose owner's liveness lock is
gone, belonged to a dead process: it is taken over at once, atomically (compare-and-set guarded
by the lock's absence), instead of blocking the sender's retries until the claim expires.

The claims and the acceptances of concurrent messages are grouped: one Redis round trip
(a pipeline of ``SET NX GET``, or of ``SET``) for all the messages that arrive together; only
a takeover (after a crash) costs one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from gateway.backends.protocols import StateItem, StateStore
from gateway.errors import BackendError
from ledger.errors import GroupCommitStoppedError
from ledger.groupcommit import GroupCommitter

log = logging.getLogger("gateway.hl7")

IN_PROGRESS_TTL_S = 120.0
ACCEPTED_TTL_S = 7 * 24 * 3600.0
#: Lifetime of a liveness lock; the heartbeat refreshes it three times as often.
LIVENESS_TTL_S = 6.0


@dataclass(frozen=True, slots=True)
class New:
    """First time (or a claim taken over from a dead process): process it."""

    taken_over: bool = False


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


def liveness_key(instance: str, epoch: int) -> str:
    """The StateStore key of the liveness lock of gateway ``instance`` booted at ``epoch``."""
    digest = hashlib.sha256(instance.encode()).hexdigest()[:24]
    return f"hl7live:{digest}:{epoch}"


def new_epoch() -> int:
    """A boot epoch: nanoseconds since 1970, so a later start of an instance has a larger one."""
    return time.time_ns()


class Deduplicator:
    """Begin/finish/abort around the processing of one message. Raises BackendError.

    ``instance`` names this gateway (the same after a restart; distinct for every gateway
    process running at the same time), ``epoch`` this start of it. :meth:`start` (inside the
    running loop) before use, :meth:`stop` after.
    """

    def __init__(
        self,
        state: StateStore,
        *,
        instance: str = "gateway",
        epoch: int | None = None,
        liveness_ttl: float = LIVENESS_TTL_S,
    ) -> None:
        self._state = state
        self.instance = instance
        self.epoch = new_epoch() if epoch is None else epoch
        self._live_key = liveness_key(instance, self.epoch)
        self._liveness_ttl = liveness_ttl
        self._heartbeat: asyncio.Task[None] | None = None
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

    async def start(self) -> None:
        """Take the liveness lock, then start the heartbeat and the grouping tasks.
        Raises BackendError when the store is unreachable."""
        await self._state.set(self._live_key, b"1", ttl=self._liveness_ttl)
        self._heartbeat = asyncio.create_task(self._beat(), name="dedup-liveness")
        self._claims.start()
        self._accepts.start()

    async def _beat(self) -> None:
        """Refresh the liveness lock until cancelled; a failed refresh is logged and retried."""
        while True:
            await asyncio.sleep(self._liveness_ttl / 3)
            try:
                await self._state.set(self._live_key, b"1", ttl=self._liveness_ttl)
            except BackendError as exc:
                log.error("hl7 de-duplication liveness lock not refreshed: %s", exc)

    async def stop(self) -> None:
        """Stop the grouping tasks and the heartbeat, and drop the liveness lock (claims left
        behind can be taken over at once). Raises nothing for an unreachable store."""
        await self._claims.stop()
        await self._accepts.stop()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        try:
            await self._state.delete(self._live_key)
        except BackendError:
            log.warning("hl7 de-duplication liveness lock not released (it expires)")

    def _from_memory(self, key: str, content_hash: str) -> Decision | None:
        """The answer for a copy of a message whose acceptance is being recorded, if any."""
        recording = self._recording.get(key)
        if recording is None:
            return None
        if recording[0] != content_hash:
            return Conflict()
        return Replay(recording[1])

    async def begin(self, facility: str, control_id: str, content_hash: str) -> Decision:
        """Claim the message, or say why not. Raises BackendError."""
        key = _key(facility, control_id)
        remembered = self._from_memory(key, content_hash)
        if remembered is not None:
            return remembered
        claim = orjson.dumps({"h": content_hash, "s": "busy", "i": self.instance, "e": self.epoch})
        (raw,) = await self._claims.submit([(key, claim, IN_PROGRESS_TTL_S)])
        if raw is None:
            return New()
        record = orjson.loads(raw)
        if record["s"] != "busy":
            if record["h"] != content_hash:
                return Conflict()
            return Replay(tuple(bytes.fromhex(a) for a in record["acks"]))
        # Being recorded here since the check above: answered from memory.
        remembered = self._from_memory(key, content_hash)
        if remembered is not None:
            return remembered
        owner, epoch = record.get("i"), record.get("e")
        if not isinstance(owner, str) or not isinstance(epoch, int):
            return InProgress() if record["h"] == content_hash else Conflict()
        if owner == self.instance and epoch < self.epoch:
            guard = None  # this gateway before a restart: certainly dead
        elif owner == self.instance and epoch == self.epoch:
            return InProgress() if record["h"] == content_hash else Conflict()
        else:
            guard = liveness_key(owner, epoch)
        if await self._state.replace_if(
            key, raw, claim, ttl=IN_PROGRESS_TTL_S, unless_exists=guard
        ):
            log.info("hl7 de-duplication claim of a dead gateway process taken over")
            return New(taken_over=True)
        return InProgress() if record["h"] == content_hash else Conflict()

    def record(
        self, facility: str, control_id: str, content_hash: str, acks: Sequence[bytes]
    ) -> asyncio.Future[list[None]]:
        """Start recording the accepted message and its ACKs (for replays): a future that
        fails with the store's error. Until it is done, a copy of the message gets the same
        ACKs from memory. Raises GroupCommitStoppedError when stopped."""
        key = _key(facility, control_id)
        record = {"h": content_hash, "s": "done", "acks": [a.hex() for a in acks]}
        encoded = orjson.dumps(record)
        self._recording[key] = (content_hash, tuple(acks))
        try:
            fut = self._accepts.enqueue([(key, encoded, ACCEPTED_TTL_S)])
        except GroupCommitStoppedError:
            self._recording.pop(key, None)
            raise
        fut.add_done_callback(lambda _: self._recording.pop(key, None))
        return fut

    async def abort(self, facility: str, control_id: str) -> None:
        """Release the claim of a message that was not accepted, so a retry is processed.
        Raises BackendError."""
        await self._state.delete(_key(facility, control_id))
