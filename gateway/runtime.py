"""Assembly of a running gateway: secrets, backends for the profile, ledger, views, pipeline.

:class:`Gateway` is what the HTTP app, the MLLP listener, ``gateway demo`` and ``gateway verify``
share. Backends may be injected (tests); otherwise :func:`build_backends` picks them for the
profile. Raises ConfigurationError for missing secrets, BackendError when a service is down.
"""

from __future__ import annotations

import hashlib
import logging
import secrets as pysecrets
from pathlib import Path

import httpx

from gateway.access import AllowAll
from gateway.access_log import AuditLog
from gateway.backends.protocols import Backends
from gateway.config import Settings
from gateway.consents import ConsentService, ConsentView, consent_key
from gateway.datadir import DataDir
from gateway.erasure import ErasureService, ErasureView, retention_rules
from gateway.errors import ConfigurationError
from gateway.observability import Metrics
from gateway.pipeline import RecordPipeline
from gateway.records import RecordService
from gateway.terminology_service import TerminologyService
from gateway.views import RecordIndex
from gateway.witness_service import WitnessService, parse_peers
from ledger.durable import PRIVATE, write_durably
from ledger.keys import Signer, TrustedKeys
from ledger.sequencer import Ledger
from ledger.stored_tree import TreeStore
from mappings.terminology import DictionaryError, Terminology

log = logging.getLogger("gateway.runtime")


def _secret_file(path: Path) -> bytes:
    """Read a 32-byte secret from ``path``, creating it (mode 0600, fsynced) on first use.

    Raises ConfigurationError when the file does not hold 32 bytes in hex or cannot be
    read or written.
    """
    if not path.exists():
        value = pysecrets.token_bytes(32)
        try:
            write_durably(path, value.hex().encode() + b"\n", mode=PRIVATE, exclusive=True)
            return value
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError as exc:
            raise ConfigurationError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        data = bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"{path} must hold 32 bytes in hex") from exc
    if len(data) != 32:
        raise ConfigurationError(f"{path} must hold 32 bytes in hex")
    return data


def load_secrets(settings: Settings) -> tuple[bytes, bytes]:
    """(pseudonym key, master key) from settings, else from files under ``data_dir/secrets``.

    Raises ConfigurationError when a configured value is not 32 bytes of hex.
    """
    out = []
    for name, configured in (
        ("pseudonym", settings.pseudonym_key),
        ("master", settings.master_key),
    ):
        if configured is not None:
            try:
                value = bytes.fromhex(configured.get_secret_value())
            except ValueError as exc:
                raise ConfigurationError(f"{name}_key must be hex") from exc
            if len(value) != 32:
                raise ConfigurationError(f"{name}_key must be 32 bytes")
            out.append(value)
        else:
            out.append(_secret_file(DataDir.of(settings).secret(name)))
    return out[0], out[1]


def load_consent_key(settings: Settings, pseudonym_key: bytes) -> bytes:
    """The alliance consent key: ``settings.consent_key``, else derived from the pseudonym key.

    Raises ConfigurationError when a configured value is not 32 bytes of hex."""
    if settings.consent_key is None:
        return consent_key(pseudonym_key)
    try:
        value = bytes.fromhex(settings.consent_key.get_secret_value())
    except ValueError as exc:
        raise ConfigurationError("consent_key must be hex") from exc
    if len(value) != 32:
        raise ConfigurationError("consent_key must be 32 bytes")
    return value


def build_backends(settings: Settings, *, master_key: bytes) -> Backends:
    """The adapters of the settings' profile (not yet connected). Raises nothing."""
    d = DataDir.of(settings)
    if settings.profile == "embedded":
        from gateway.backends.blobs_local import LocalBlobStore
        from gateway.backends.keys_file import FileKeyStore
        from gateway.backends.log_file import FileLog
        from gateway.backends.state_memory import MemoryStateStore

        return Backends(
            blobs=LocalBlobStore(directory=d.blocks),
            log=FileLog(path=d.log),
            state=MemoryStateStore(),
            keys=FileKeyStore(path=d.keystore, master_key=master_key),
        )
    from gateway.backends.blobs_kubo import KuboBlobStore
    from gateway.backends.keys_redis import RedisKeyStore
    from gateway.backends.log_jetstream import JetStreamLog
    from gateway.backends.state_redis import RedisStateStore

    prefix = settings.redis_prefix or f"gw:{settings.institution}:"
    return Backends(
        blobs=KuboBlobStore(base_url=settings.kubo_url, timeout=settings.backend_timeout),
        log=JetStreamLog(
            servers=settings.nats_servers,
            stream=settings.nats_stream,
            replicas=settings.nats_replicas,
            timeout=settings.backend_timeout,
        ),
        state=RedisStateStore(url=settings.redis_url, prefix=prefix),
        keys=RedisKeyStore(url=settings.redis_url, prefix=prefix, master_key=master_key),
    )


def load_signer(settings: Settings) -> Signer:
    """This institution's checkpoint signer, created under ``data_dir/keys`` on first start.

    Raises KeyFileError when the signer file cannot be read or written.
    """
    path = DataDir.of(settings).signer
    if path.exists():
        return Signer.load(path)
    signer = Signer.generate(settings.institution)
    signer.save(path)
    return signer


def load_trust(settings: Settings, signer: Signer) -> TrustedKeys:
    """The alliance's trusted institution keys; this institution's own key is always in it.

    Raises KeyFileError when the trust file cannot be read or written.
    """
    path = settings.trust_file or DataDir.of(settings).trust
    trusted = TrustedKeys.load(path) if path.exists() else TrustedKeys()
    if signer.name not in trusted:
        trusted.add(signer.name, signer.public_keys())
        if settings.trust_file is None:
            trusted.save(path)
    return trusted


def dictionary_version() -> str:
    """Version of the unified dictionary in use (a hash of its files), or 'none'."""
    try:
        from mappings.terminology import Terminology

        return Terminology.load_default().version
    except (ImportError, AttributeError, OSError):
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent.parent / "mappings" / "dictionary"
        for p in sorted(root.glob("*.json")) if root.exists() else []:
            h.update(p.read_bytes())
        return h.hexdigest()[:16]


def build_terminology(settings: Settings, backends: Backends) -> TerminologyService:
    """The dictionary service: ``settings.dictionary_dir`` or the shipped dictionary.

    Raises ConfigurationError naming the file and element when the dictionary is invalid.
    """
    try:
        if settings.dictionary_dir is not None:
            term = Terminology.load(settings.dictionary_dir)
        else:
            term = Terminology.load_default()
    except DictionaryError as exc:
        raise ConfigurationError(f"invalid unified dictionary: {exc}") from exc
    return TerminologyService(
        terminology=term, state=backends.state, institution=settings.institution
    )


class Gateway:
    """One institution's running gateway."""

    def __init__(
        self,
        settings: Settings,
        *,
        backends: Backends | None = None,
        witness_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.pseudonym_key, master_key = load_secrets(settings)
        self.backends = backends or build_backends(settings, master_key=master_key)
        self.metrics = Metrics()
        self.signer = load_signer(settings)
        self.trusted = load_trust(settings, self.signer)
        self.index = RecordIndex()
        self.terminology = build_terminology(settings, self.backends)
        self.paths = paths = DataDir.of(settings)
        tree_dir = paths.tree
        self.ledger = Ledger(
            log=self.backends.log,
            tree=TreeStore.open(tree_dir),
            signer=self.signer,
            trusted=self.trusted,
            origin=settings.ledger_origin,
            max_leaves=settings.batch_max_leaves,
            max_delay=settings.batch_max_delay_ms / 1000.0,
            on_batch=self.metrics.ledger_batch.observe,
        )
        self.ledger.add_listener(self.index.on_batch)
        self.ledger.add_listener(self.terminology.anchors.on_batch)
        self.consent_view = ConsentView(self.index.links)
        self.ledger.add_listener(self.consent_view.on_batch)
        self.ledger.add_listener(
            lambda first, leaves, seq: self.metrics.ledger_size.set(first + len(leaves))
        )
        self.pipeline = RecordPipeline(
            backends=self.backends,
            ledger=self.ledger,
            index=self.index,
            pseudonym_key=self.pseudonym_key,
            institution=settings.institution,
            dictionary_version=self.terminology.version,
            on_blob_batch=self.metrics.blob_batch.observe,
        )
        self.witness = WitnessService(
            ledger=self.ledger,
            signer=self.signer,
            trusted=self.trusted,
            state_path=paths.witness_state,
            final_path=paths.final_checkpoint,
            quorum=settings.witness_quorum,
            peers=parse_peers(settings.witness_peers),
            timeout=settings.witness_timeout,
            interval=settings.witness_interval_ms / 1000.0,
            transport=witness_transport,
        )
        self.access_log = AuditLog(
            backends=self.backends,
            ledger=self.ledger,
            pipeline=self.pipeline,
            institution=settings.institution,
            metrics=self.metrics,
            queue_path=paths.break_glass_queue,
        )
        self.ledger.add_listener(self.access_log.view.on_batch)
        self.records = RecordService(
            pipeline=self.pipeline,
            index=self.index,
            ledger=self.ledger,
            witness=self.witness,
            policy=AllowAll(),
            metrics=self.metrics,
            institution=settings.institution,
            receipt_wait_final_ms=settings.receipt_wait_final_ms,
            labeller=self.terminology.labels,
        )
        self.consents = ConsentService(
            ledger=self.ledger,
            view=self.consent_view,
            blobs=self.backends.blobs,
            log=self.backends.log,
            pseudonym_key=self.pseudonym_key,
            key=load_consent_key(settings, self.pseudonym_key),
            institution=settings.institution,
            master_system=settings.master_id_system,
            patient_of=lambda rid: self.records.patient_of("Patient", rid),
            fresh_timeout=settings.backend_timeout,
        )
        # Erasure (gateway/erasure.py): restrictions and shredded records from the ledger
        # (after the index, whose links it reads), and the job that shreds.
        self.erasure_view = ErasureView(self.index)
        self.ledger.add_listener(self.erasure_view.on_batch)
        self.records.shredded = self.erasure_view.shredded
        self.erasure = ErasureService(
            view=self.erasure_view,
            index=self.index,
            pipeline=self.pipeline,
            keys=self.backends.keys,
            ledger=self.ledger,
            institution=settings.institution,
            rules=retention_rules(
                settings.retention_years,
                settings.retention_classes,
                settings.retention_default_class,
                settings.retention_inpatient_codes,
            ),
            interval=settings.erasure_interval_s,
        )
        self.erasure_view.on_restrict(self._forget_patient)
        self.started = False

    def _forget_patient(self, pseudonyms: frozenset[str]) -> None:
        """A restriction was applied: drop the consents and the record metadata held in
        memory for the patient."""
        for pseudonym in pseudonyms:
            self.consents.forget(pseudonym)
        self.records.forget(pseudonyms)

    async def start(self) -> None:
        """Connect the backends, replay the ledger, start the writers.

        Raises BackendError when a backend is unreachable, LedgerError if the log does not verify.
        """
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        for b in (self.backends.blobs, self.backends.log, self.backends.state, self.backends.keys):
            await b.ping()
        follow = settings.ledger_follow_interval_ms / 1000.0
        await self.ledger.start(follow_interval=follow or None)
        if settings.anchor_trust:
            await self.ledger.ensure_trust_anchored(self.trusted, source=settings.institution)
        await self.terminology.ensure_anchored(self.ledger)  # before any record names it
        await self.consents.start()  # this institution's administrative default Consent
        await self.witness.start()
        self.pipeline.start()
        self.access_log.start()
        self.records.start()
        self.erasure.start()
        self.started = True
        log.info(
            "gateway started",
            extra={
                "profile": settings.profile,
                "institution": settings.institution,
                "ledger_size": self.ledger.size,
            },
        )

    async def stop(self) -> None:
        """Stop writers and close the backends."""
        if self.started:
            await self.erasure.stop()
            await self.consents.stop()
            await self.records.stop()
            await self.access_log.stop()
            await self.pipeline.stop()
            await self.witness.stop()
            await self.ledger.stop()
        self.ledger.close()
        await self.backends.close()
        self.started = False
