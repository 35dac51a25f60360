"""HL7 v2 ingestion: one message's bytes in, its acknowledgement(s) out.

Used by the MLLP listener and by ``POST /hl7v2``. For each message: read the header, claim it
in the de-duplication state, parse and convert it (``mappings``, pure), then store the produced
resources plus the original message (an encrypted ``Binary`` linked by a ``Provenance``, so
nothing that was received is lost) through the record pipeline. ``AA`` is built only after the
pipeline returned, i.e. after every record is stored and durably anchored and is in the search
index (searchable when acknowledged; the index rows come from the conversion worker), and
carries the container's ledger receipt (``ZRC``). Local clinical codes the unified dictionary
cannot map follow the sender profile's ``unmapped_codes``: ``reject`` is ``AE`` 103 at the
code's segment and field; ``accept`` stores them as sent, the records carrying them tagged,
and counts them in the curation queue (source: the sending facility) before the ACK. A message
that cannot be parsed or is unsupported is answered ``AR``; one that is well formed but cannot
be processed ``AE``; a backend failure ``AE`` with ERR 207 (nothing was acknowledged; the
sender's retry is processed normally once the backend is back).

A message claimed as new whose original (the ``Binary`` with its stable id) is already anchored
was stored by a gateway that died before acknowledging it: the stored bytes are compared with
the re-sent ones; equal, it is answered AA with the stored container's receipt and not stored
again; different, AE 205 like any reused control id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from gateway.config import Settings
from gateway.errors import BackendError, GatewayError
from gateway.hl7.ack import (
    AckCode,
    ErrorLike,
    Header,
    Receipt,
    acks_to_send,
    build_ack,
    read_header,
)
from gateway.hl7.dedup import Conflict, Deduplicator, InProgress, New, Replay
from gateway.hl7.workers import ConversionWorkers, Converted, Failed, MessagePolicy, Outcome
from gateway.records import LinkReason
from gateway.runtime import Gateway
from ledger.errors import GroupCommitStoppedError, LedgerError
from ledger.groupcommit import GroupCommitter
from mappings.errors import MappingError
from mappings.v2.common import ConversionOptions, stable_id
from mappings.v2.parse import ParsedMessage, parse_header

log = logging.getLogger("gateway.hl7")


@dataclass(frozen=True, slots=True)
class _Internal:
    """An ERR for failures of our own (table 0357 code 207), located nowhere."""

    hl7_code: str = "207"
    segment: str | None = None
    segment_index: int | None = None
    field: int | None = None
    component: int | None = None
    repetition: int | None = None


def instance_id(settings: Settings) -> str:
    """This gateway's instance id: ``settings.instance_id``, else a digest of the institution,
    the host name and the data directory (stable across restarts). Raises nothing."""
    if settings.instance_id:
        return settings.instance_id
    where = f"{settings.institution}\x00{socket.gethostname()}\x00{settings.data_dir.resolve()}"
    return hashlib.sha256(where.encode()).hexdigest()[:32]


def sender_policy(settings: Settings, msg: ParsedMessage) -> MessagePolicy:
    """The conversion policy of a message's sender: the profile of ``MSH-3^MSH-4`` (their
    first components, or the second when the first is empty), else ``*^MSH-4``, else
    ``MSH-3^*``, else the default profile. Raises nothing."""
    app = msg.msh.text(3, 1) or msg.msh.text(3, 2)
    facility = msg.sending_facility_id
    profile = settings.sender_profile(f"{app}^{facility}", f"*^{facility}", f"{app}^*")
    return MessagePolicy(
        strict_types=profile.strict_types,
        reject_provisional=profile.missing_master_id == "reject",
        reject_unmapped=profile.unmapped_codes == "reject",
    )


class HL7Ingest:
    """Turns HL7 v2 messages into stored, anchored FHIR records and ACKs."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        s = gw.settings
        self.options = ConversionOptions(
            default_tz=s.default_tz,
            master_id_system=s.master_id_system,
            institution=s.institution,
            imaging_endpoint_base=s.imaging_endpoint_base,
            terminology=gw.terminology.terminology,
            authority_systems=dict(s.hl7_authority_systems),
            strict_codes=s.default_sender_profile.unmapped_codes == "reject",
            id_secret=hmac.new(gw.pseudonym_key, b"hl7-resource-ids", hashlib.sha256).digest(),
        )
        self.dedup = Deduplicator(gw.backends.state, instance=instance_id(s))
        self.converter = ConversionWorkers(
            self.options,
            pseudonym_key=gw.pseudonym_key,
            workers=s.hl7_convert_workers,
            index=s.search_index,
        )
        self._tz = ZoneInfo(s.default_tz)
        self._finishing: set[asyncio.Future[list[None]]] = set()
        # Unmapped codes of concurrent messages go to the curation queue in one write, counted.
        self._curation: GroupCommitter[tuple[str, str, str], None] = GroupCommitter(
            self._queue_unmapped, name="hl7-unmapped", max_items=4096, max_delay=0.0
        )

    async def start(self) -> None:
        """Start the conversion workers and the de-duplication state (its liveness lock and
        grouping). Raises BackendError when the state store is unreachable."""
        await self.converter.start()
        await self.dedup.start()
        self._curation.start()

    async def stop(self) -> None:
        """Stop them (after the listeners have closed and the last acceptances are recorded)."""
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=10)
        await self.dedup.stop()
        await self._curation.stop()
        await self.converter.stop()

    def _now(self) -> datetime:
        return datetime.now(self._tz)

    def _ack(
        self,
        header: Header,
        outcome: Literal["accept", "error", "reject"],
        error: Any = None,
        text: str = "",
        *,
        warnings: tuple[tuple[ErrorLike, str], ...] = (),
        receipt: Receipt | None = None,
    ) -> list[bytes]:
        """The acknowledgement messages (each to be framed on its own) for ``outcome``; an
        accepting one carries ``warnings`` (ERR of severity W) and ``receipt`` (ZRC)."""
        now = self._now()
        codes: list[AckCode] = acks_to_send(header, outcome)
        out = [
            build_ack(
                header,
                code=code,
                now=now,
                error=error if code not in ("AA", "CA") else None,
                text=text,
                gateway_facility=self.gw.settings.institution,
                warnings=warnings if code in ("AA", "CA") else (),
                receipt=receipt if code in ("AA", "CA") else None,
            )
            for code in codes
        ]
        for code in codes:
            self.gw.metrics.mllp_messages.labels(code).inc()
        return out

    def oversize_ack(self, head: bytes, limit: int) -> list[bytes]:
        """The AR for a message over the size limit (built from its first bytes). Never raises."""
        log.warning(
            "hl7 message over the size limit rejected",
            extra={"limit": limit, "control_id": read_header(head).control_id[:40]},
        )
        return self._ack(
            read_header(head),
            "reject",
            _Internal(),
            f"message exceeds the limit of {limit} bytes",
        )

    async def handle(self, raw: bytes, *, peer: str = "-") -> list[bytes] | None:
        """Process one message; return its acknowledgement messages, each to be sent alone.

        Usually one ACK; none when MSH-15/16 ask for none; a commit ACK then an application
        ACK in enhanced mode. Never raises for a bad message (a failure of the gateway's own
        code is answered AE with ERR 207 and logged); returns None only when no truthful
        answer can be given (the de-duplication state is unreachable), so the caller closes
        the connection and the sender retries.
        """
        header = read_header(raw)
        extra = {"control_id": header.control_id[:40], "peer": peer, "bytes": len(raw)}
        try:
            # The header only: the conversion worker parses the whole message (and answers AR
            # for what cannot be parsed there).
            msg = parse_header(raw)
        except MappingError as exc:
            log.info("hl7 message rejected", extra={**extra, "hl7_code": exc.hl7_code})
            return self._ack(header, "reject", exc, str(exc))
        except Exception as exc:  # a defect of the parser on odd input: still a rejection
            log.error(
                "hl7 parser failed unexpectedly", extra={**extra, "error": type(exc).__name__}
            )
            return self._ack(header, "reject", _Internal(), "message cannot be parsed")
        facility = msg.sending_facility_id or header.sending_facility
        digest = hashlib.sha256(raw).hexdigest()
        # The conversion (in a worker process) runs while the claim is made; for the rare
        # duplicate its result is simply dropped.
        conversion = self.converter.begin(raw, sender_policy(self.gw.settings, msg))
        try:
            decision = await self.dedup.begin(facility, msg.control_id, digest)
        except BackendError:
            conversion.cancel()
            log.error("hl7 de-duplication state unavailable", extra=extra)
            return None
        if not isinstance(decision, New):
            conversion.cancel()
        if isinstance(decision, Replay):
            log.info("hl7 duplicate: original ACK replayed", extra=extra)
            return list(decision.acks)
        if isinstance(decision, Conflict):
            log.warning("hl7 control id reused with different content: AE", extra=extra)
            return self._ack(
                header,
                "error",
                _Internal(hl7_code="205"),
                "control id already used by a different message from this facility",
            )
        if isinstance(decision, InProgress):
            log.info("hl7 copy of a message still being processed: AE", extra=extra)
            return self._ack(header, "error", _Internal(), "message is being processed; retry")
        try:
            found = await self._stored_before(msg, raw)
        except GatewayError as exc:
            conversion.cancel()
            await self._release(facility, msg.control_id)
            log.error(
                "hl7 stored original could not be read back",
                extra={**extra, "error": type(exc).__name__},
            )
            return self._ack(header, "error", _Internal(), "storage temporarily unavailable; retry")
        if found is not False:
            if found is None:
                conversion.cancel()
                await self._release(facility, msg.control_id)
                log.warning("hl7 control id of a stored message reused: AE", extra=extra)
                return self._ack(
                    header,
                    "error",
                    _Internal(hl7_code="205"),
                    "control id already used by a different message from this facility",
                )
            log.info("hl7 message stored before, not acknowledged: accepted again", extra=extra)
            # The same warnings as the first answer would have carried (rare path: waits for
            # the conversion already under way).
            converted = await conversion
            warnings = (
                tuple((w, w.text) for w in converted.warnings)
                if isinstance(converted, Converted)
                else ()
            )
            acks = self._ack(header, "accept", warnings=warnings, receipt=found)
            self._remember(facility, msg.control_id, digest, acks, extra)
            return acks
        try:
            acks, accepted = await self._process(header, extra, await conversion)
        except BaseException:
            await self._release(facility, msg.control_id)
            raise
        if accepted:
            # Recorded after the answer is built, off the answer's path. Until it lands a copy
            # of the message is never stored twice: at this gateway it gets the same ACKs
            # (from memory), at another worker "being processed" (AE, the sender retries). If
            # it cannot land, that is logged, as it would be in line.
            self._remember(facility, msg.control_id, digest, acks, extra)
        else:
            await self._release(facility, msg.control_id)
        return acks

    def _remember(
        self,
        facility: str,
        control_id: str,
        digest: str,
        acks: list[bytes],
        extra: dict[str, Any],
    ) -> None:
        def recorded(fut: asyncio.Future[list[None]]) -> None:
            self._finishing.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                log.error("hl7 accepted but could not record it for de-duplication", extra=extra)

        try:
            fut = self.dedup.record(facility, control_id, digest, acks)
        except GroupCommitStoppedError:
            log.error("hl7 accepted but could not record it for de-duplication", extra=extra)
            return
        self._finishing.add(fut)
        fut.add_done_callback(recorded)

    async def _stored_before(
        self, msg: ParsedMessage, raw: bytes
    ) -> Receipt | Literal[False] | None:
        """False when the message's original (its ``Binary``) is not anchored yet; else the
        stored container's receipt when the stored bytes are ``raw``, None when they differ.
        One in-memory index lookup for a new message. Raises GatewayError (BackendError,
        IntegrityError, KeyDestroyedError) when the stored original cannot be read."""
        facility = msg.sending_facility_id or "unknown"
        binary_id = stable_id(self.options, "Binary", facility, msg.control_id)
        anchor = self.gw.index.latest(self.gw.records.record_of("Binary", binary_id))
        if anchor is None:
            return False
        stored = await self.gw.pipeline.read_anchor(anchor)
        try:
            same = base64.b64decode(str(stored.get("data", "")), validate=True) == raw
        except (binascii.Error, ValueError):
            same = False
        if not same:
            return None
        latest = self.gw.ledger.latest
        size = latest.checkpoint.size if latest is not None else anchor.leaf_index + 1
        root = latest.checkpoint.root if latest is not None else self.gw.ledger.root(size)
        return Receipt(anchor.leaf_index, size, root, anchor.cid, anchor.byte_range)

    async def _queue_unmapped(self, items: list[tuple[str, str, str]]) -> list[None]:
        """Count the (source, system, code) of a group of messages into the curation queue,
        one update per distinct code."""
        counts = Counter(items)
        await self.gw.terminology.queue.record_counts(
            [(source, system, code, n) for (source, system, code), n in sorted(counts.items())]
        )
        return [None] * len(items)

    def _curate(self, result: Converted) -> asyncio.Future[list[None]] | None:
        """Queue a message's unmapped codes for curation (with its sending facility as the
        source); None when there are none or the gateway is stopping."""
        if not result.unmapped:
            return None
        try:
            fut = self._curation.enqueue([(result.source, s, c) for s, c in result.unmapped])
        except GroupCommitStoppedError:
            return None
        # Retrieved even when the message fails to store (no "never retrieved" noise).
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    async def _release(self, facility: str, control_id: str) -> None:
        try:
            await self.dedup.abort(facility, control_id)
        except BackendError:
            log.error("hl7 could not release a de-duplication claim")

    async def _process(
        self, header: Header, extra: dict[str, Any], result: Outcome
    ) -> tuple[list[bytes], bool]:
        if isinstance(result, Failed):
            outcome: Literal["error", "reject"] = "reject" if result.ack_code == "AR" else "error"
            log.info("hl7 message not processed", extra={**extra, "hl7_code": result.hl7_code})
            return self._ack(header, outcome, result, result.text), False
        if not isinstance(result, Converted):  # a defect, or a worker died: say so, stay up
            log.error("hl7 conversion failed unexpectedly", extra={**extra, "error": result.error})
            return self._ack(header, "error", _Internal(), "internal error in conversion"), False
        reason: LinkReason = "merge" if header.event == "A40" else "master-identifier"
        links = (
            [(alias, result.patient, reason) for alias in result.aliases]
            if reason == "merge" or not result.provisional
            else []
        )
        # Unmapped codes (unmapped_codes = "accept"; under "reject" the worker answered AE
        # 103) are counted for curation beside the store: a code seen is a code to map, and
        # the tag on the stored records is what `gateway dictionary remap` looks for.
        curated = self._curate(result)
        try:
            stored = await self.gw.records.store_message(
                result.entries,
                patient=result.patient,
                container_id=result.container_id,
                links=links,
                index=result.index or None,
            )
        except (BackendError, LedgerError) as exc:
            log.error(
                "hl7 message not stored: backend unavailable",
                extra={**extra, "error": f"{type(exc).__name__}: {exc}"},
            )
            return self._ack(
                header, "error", _Internal(), "storage temporarily unavailable; retry"
            ), False
        log.info(
            "hl7 message stored",
            extra={**extra, "records": len(stored), "last_leaf": stored[-1].leaf_index},
        )
        if curated is not None:
            try:
                await curated
            except (BackendError, GroupCommitStoppedError) as exc:
                # The records are stored and tagged (remap finds them); only the count is lost.
                log.error(
                    "hl7 unmapped codes not counted for curation",
                    extra={**extra, "error": type(exc).__name__},
                )
        first = stored[0]  # every record of the message is in the one container leaf
        receipt = Receipt(
            first.leaf_index, first.tree_size, first.root, first.cid, first.byte_range
        )
        warnings = tuple((w, w.text) for w in result.warnings)
        return self._ack(header, "accept", warnings=warnings, receipt=receipt), True
