"""Every gateway's witness, and the collection of cosignatures that makes checkpoints final.

Two roles, both in :class:`WitnessService`:

* **Witness** (answers ``POST /ledger/witness``): verifies an offered signed checkpoint, checks it
  against the tree this gateway derives from the shared log (when its log reaches that size) and
  the RFC 9162 consistency proof from the last checkpoint it cosigned, then cosigns it. Its state
  (the latest cosigned checkpoint per origin, and every split-view evidence pair) is written to
  ``data_dir/ledger/witness-state.json`` with fsync *before* a cosignature leaves the process, so
  a restarted witness can never cosign a checkpoint that conflicts with one it already signed.
* **Collector** (a background task): after every applied batch it takes the ledger's latest
  checkpoint (coalescing: only the newest one matters, at most one round in flight, at most one
  round per ``interval``), has its own witness cosign it, asks every configured peer witness
  concurrently, merges the valid cosignatures, and once ``quorum`` institutions other than the
  writer have cosigned, records it as the latest *final* checkpoint (``Ledger.final``, persisted
  in ``data_dir/ledger/final-checkpoint-<profile>.json``).

The acknowledgement path never waits for witnesses: a receipt carries the writer's checkpoint
(final by itself when the quorum is 0); a sender who needs finality asks ``GET /ledger/receipt``
later, which proves the leaf against the latest final checkpoint. See docs/ledger-format.md,
"Witness protocol".

Raises :class:`WitnessProofNeededError` when a witness needs a consistency proof it cannot make,
:class:`ledger.errors.SplitViewError` on a conflict (evidence kept), ledger verification errors
for badly signed checkpoints, and :class:`gateway.errors.ConfigurationError` for a damaged state
file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from gateway.errors import ConfigurationError, GatewayError
from ledger.checkpoint import SignedCheckpoint
from ledger.durable import write_durably
from ledger.errors import LedgerError, SplitViewError
from ledger.keys import Signer, TrustedKeys, verify_signatures
from ledger.sequencer import Ledger
from ledger.verify import proof_from_hex, proof_to_hex
from ledger.witness import (
    Evidence,
    Witness,
    WitnessState,
    count_cosigners,
    is_final,
    merge_cosignatures,
)

log = logging.getLogger("gateway.witness")


class WitnessProofNeededError(GatewayError):
    """The witness needs a consistency proof from ``cosigned_size`` that it cannot compute."""

    def __init__(self, cosigned_size: int) -> None:
        super().__init__(f"need a consistency proof from tree size {cosigned_size}")
        self.cosigned_size = cosigned_size


def parse_peers(text: str) -> list[str]:
    """Peer witness base URLs from a comma-separated setting (trailing slashes removed).

    Raises ConfigurationError for an entry that is not an http(s) URL.
    """
    out = []
    for item in text.split(","):
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"witness peer {url!r} is not an http(s) URL")
        out.append(url)
    return out


class WitnessService:
    """This gateway's witness and cosignature collector."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        signer: Signer,
        trusted: TrustedKeys,
        state_path: Path,
        final_path: Path,
        quorum: int = 0,
        peers: Sequence[str] = (),
        timeout: float = 2.0,
        interval: float = 0.2,
        retry_delay: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Raises ConfigurationError when the state file exists but cannot be parsed."""
        if quorum < 0:
            raise ConfigurationError("witness quorum must be >= 0")
        self.ledger = ledger
        self.trusted = trusted
        self.quorum = quorum
        self.peers = list(peers)
        self._state_path = state_path
        self._final_path = final_path
        # The latest checkpoint known to be final (cosigned by the quorum); this service owns it.
        self._final: SignedCheckpoint | None = None
        self._timeout = timeout
        self._interval = interval
        self._retry_delay = retry_delay
        self.witness = Witness(signer, trusted, self._load_state(state_path))
        self.cosigned: SignedCheckpoint | None = None  # latest checkpoint with merged cosigs
        self.peer_evidence: list[Evidence] = []  # conflicts reported by peers (409 answers)
        self._peer_sizes: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._final_changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._transport = transport
        self.rounds = 0

    # ---- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def _load_state(path: Path) -> WitnessState:
        if not path.exists():
            return WitnessState()
        try:
            return WitnessState.from_bytes(path.read_bytes())
        except (OSError, LedgerError) as exc:
            raise ConfigurationError(
                f"witness state {path} is unreadable ({exc}); refusing to start a witness "
                "that could forget what it cosigned"
            ) from exc

    def _load_final(self) -> None:
        if not self._final_path.exists():
            return
        try:
            signed = SignedCheckpoint.from_bytes(self._final_path.read_bytes())
            verify_signatures(signed, self.trusted)
        except (OSError, LedgerError) as exc:
            log.warning("ignoring unreadable final checkpoint", extra={"error": str(exc)})
            return
        cp = signed.checkpoint
        if (
            cp.origin == self.ledger.origin
            and 0 < cp.size <= self.ledger.size
            and self.ledger.root(cp.size) == cp.root
            and is_final(signed, self.trusted, self.quorum)
        ):
            self._final = signed
            self.cosigned = signed

    async def start(self) -> None:
        """Load the last final checkpoint, start the collector. Call after the ledger started.

        Raises nothing.
        """
        self._load_final()
        self.ledger.add_listener(self._on_batch)
        if self.peers:
            self._client = httpx.AsyncClient(timeout=self._timeout, transport=self._transport)
        self._task = asyncio.create_task(self._collect_loop(), name="witness-collector")
        self._wake.set()

    async def stop(self) -> None:
        """Stop the collector and close the HTTP client. Raises nothing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- witness role ----------------------------------------------------------------------

    def _persist_state(self) -> None:
        try:
            write_durably(self._state_path, self.witness.state.to_bytes())
        except OSError as exc:
            raise GatewayError(f"cannot write witness state {self._state_path}: {exc}") from exc

    def final_checkpoint(self) -> SignedCheckpoint | None:
        """The latest final checkpoint (with quorum 0: the ledger's latest). Raises nothing."""
        if self.quorum == 0:
            return self.ledger.latest
        return self._final

    async def cosign(
        self,
        signed: SignedCheckpoint,
        *,
        proof_from: int | None = None,
        proof: Sequence[bytes] = (),
    ) -> SignedCheckpoint:
        """Witness ``signed``: verify, check against the local log and the last cosigned
        checkpoint, cosign, persist, and return it with this institution's cosignature.

        ``proof`` is the consistency proof between tree size ``proof_from`` and the checkpoint's
        size (from the smaller to the larger); it is needed only when this gateway's own log does
        not reach both sizes. Raises CheckpointSignatureError/CheckpointError for a checkpoint
        that is not validly signed, SplitViewError (evidence kept and persisted) on a conflict,
        WitnessProofNeededError when a proof from the last cosigned size is missing.
        """
        async with self._lock:
            verify_signatures(signed, self.trusted)
            await self._check_against_log(signed)
            cp = signed.checkpoint
            seen = self.witness.latest(cp.origin)
            use: Sequence[bytes] = ()
            if seen is not None and seen.checkpoint.size != cp.size:
                small, large = sorted((seen.checkpoint.size, cp.size))
                if proof_from == seen.checkpoint.size and proof:
                    use = proof
                elif cp.origin == self.ledger.origin and large <= self.ledger.size:
                    use = self.ledger.consistency_proof(small, large)
                else:
                    raise WitnessProofNeededError(seen.checkpoint.size)
            before = (seen, len(self.witness.state.evidence))
            try:
                cosigned = self.witness.cosign(signed, use)
            except SplitViewError:
                self._persist_state()
                raise
            after = (self.witness.latest(cp.origin), len(self.witness.state.evidence))
            if after != before:
                self._persist_state()
            return cosigned

    async def _check_against_log(self, signed: SignedCheckpoint) -> None:
        cp = signed.checkpoint
        if cp.origin != self.ledger.origin or cp.size == 0:
            return
        if cp.size > self.ledger.size:
            try:
                await self.ledger.catch_up()
            except Exception as exc:  # the log is down: fall back to the proof checks
                log.warning("witness could not catch up", extra={"error": str(exc)})
        if cp.size > self.ledger.size or self.ledger.root(cp.size) == cp.root:
            return
        ours = await self.ledger.checkpoint_at(cp.size) or self.ledger.latest
        assert ours is not None  # the ledger has at least cp.size leaves
        reason = (
            "same tree size, different root"
            if ours.checkpoint.size == cp.size
            else f"root at size {cp.size} differs from the tree derived from the log"
        )
        err = self.witness.record_evidence(reason, ours, signed)
        self._persist_state()
        raise err

    def evidence(self) -> list[Evidence]:
        """Every split-view pair found by this witness, then those reported by peers.

        Raises nothing.
        """
        return self.witness.evidence + self.peer_evidence

    # ---- collector role --------------------------------------------------------------------

    def _on_batch(self, first: int, leaves: Sequence[bytes], seq: int) -> None:
        self._wake.set()

    async def _set_final(self, signed: SignedCheckpoint) -> None:
        current = self._final
        if current is not None:
            if signed.checkpoint.size < current.checkpoint.size:
                return
            if signed.checkpoint == current.checkpoint and len(signed.signatures) <= len(
                current.signatures
            ):
                return
        self._final = signed
        try:
            await asyncio.to_thread(write_durably, self._final_path, signed.to_bytes())
        except OSError as exc:
            log.warning("cannot persist final checkpoint", extra={"error": str(exc)})
        async with self._final_changed:
            self._final_changed.notify_all()

    async def wait_final(self, size: int, timeout: float) -> SignedCheckpoint:
        """Wait until a checkpoint of at least ``size`` leaves is final; return it.

        Raises TimeoutError.
        """

        def ready() -> bool:
            final = self.final_checkpoint()
            return final is not None and final.checkpoint.size >= size

        async with asyncio.timeout(timeout), self._final_changed:
            await self._final_changed.wait_for(ready)
        final = self.final_checkpoint()
        assert final is not None
        return final

    async def _collect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            target = self.ledger.latest
            if target is None:
                continue
            final = self._final
            if final is not None and final.checkpoint.size >= target.checkpoint.size:
                continue
            if self.quorum == 0:
                # Alone, the latest checkpoint is final as soon as it is written (see
                # final_checkpoint). Its record on disk, which `gateway verify` holds the log
                # against, is refreshed at most once an interval rather than after every batch
                # (a durable file write each: four fsyncs on the disk the log also uses).
                await self._set_final(target)
                await asyncio.sleep(self._interval)
                continue
            try:
                merged = await self.collect(target)
            except Exception:
                log.exception("cosignature round failed")
                merged = None
            self.rounds += 1
            if merged is None or not is_final(merged, self.trusted, self.quorum):
                loop.call_later(self._retry_delay, self._wake.set)
            await asyncio.sleep(self._interval)

    async def collect(self, target: SignedCheckpoint) -> SignedCheckpoint:
        """One round: own cosignature plus every peer's, merged; marks it final at quorum.

        Never waits longer than the configured timeout for a peer. Raises nothing on a peer's
        failure (logged); raises LedgerError only if ``target`` itself does not verify.
        """
        merged = target
        try:
            own = await self.cosign(target)
            merged = merge_cosignatures(merged, [own], self.trusted)
        except (LedgerError, GatewayError) as exc:
            log.error("own witness refused the ledger's checkpoint", extra={"error": str(exc)})
        if is_final(merged, self.trusted, self.quorum):
            await self._set_final(merged)
        tasks = [asyncio.create_task(self._ask(peer, target)) for peer in self.peers]
        for fut in asyncio.as_completed(tasks):
            got = await fut
            if got is None:
                continue
            merged = merge_cosignatures(merged, [got], self.trusted)
            if is_final(merged, self.trusted, self.quorum):
                await self._set_final(merged)
        self.cosigned = merged
        return merged

    async def _ask(self, peer: str, target: SignedCheckpoint) -> SignedCheckpoint | None:
        assert self._client is not None
        size = target.checkpoint.size
        body: dict[str, Any] = {"checkpoint": target.to_json()}
        for _attempt in range(2):
            hint = self._peer_sizes.get(peer)
            if hint is not None and hint != size and max(hint, size) <= self.ledger.size:
                small, large = sorted((hint, size))
                body["proof_from"] = hint
                body["proof"] = proof_to_hex(self.ledger.consistency_proof(small, large))
            try:
                resp = await self._client.post(f"{peer}/ledger/witness", json=body)
                data = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("witness peer unreachable", extra={"peer": peer, "error": str(exc)})
                return None
            if resp.status_code == 200:
                try:
                    cosigned = SignedCheckpoint.from_json(data["checkpoint"])
                except (LedgerError, KeyError, TypeError) as exc:
                    log.warning("bad witness answer", extra={"peer": peer, "error": str(exc)})
                    return None
                self._peer_sizes[peer] = max(size, hint or 0)
                return cosigned
            if resp.status_code == 412 and isinstance(data, dict):
                self._peer_sizes[peer] = int(data.get("cosigned_size", 0))
                continue
            if resp.status_code == 409 and isinstance(data, dict):
                try:
                    ev = Evidence.from_json(data.get("evidence"))
                except LedgerError:
                    ev = None
                if ev is not None and ev not in self.peer_evidence:
                    self.peer_evidence.append(ev)
                log.error("peer witness reports a split view", extra={"peer": peer})
                return None
            log.warning("witness peer refused", extra={"peer": peer, "status": resp.status_code})
            return None
        return None

    def status(self) -> dict[str, Any]:
        """A JSON summary: quorum, peers, latest cosigned and final sizes. Raises nothing."""
        final = self.final_checkpoint()
        return {
            "institution": self.witness.signer.name,
            "quorum": self.quorum,
            "peers": self.peers,
            "cosigned": {
                origin: s.checkpoint.size for origin, s in self.witness.state.latest.items()
            },
            "final_size": final.checkpoint.size if final is not None else None,
            "final_cosigners": count_cosigners(final, self.trusted) if final is not None else 0,
            "evidence": len(self.evidence()),
        }


def proof_arg(items: object) -> list[bytes]:
    """Parse the ``proof`` of a witness request (list of hex). Raises ProofFormatError."""
    return proof_from_hex(items if items is not None else [])
