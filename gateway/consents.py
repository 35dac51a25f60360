"""Consents as data: sealed under the alliance consent key, anchored by ``consent`` leaves,
derived into a view every gateway rebuilds from the shared ledger, compiled per patient.

A patient's FHIR R4 ``Consent`` (scope ``patient-privacy``) may be recorded at any member's
gateway and must be enforced by every custodian, so it is data of the alliance, not a record of
one custodian:

- **Sealing**: AES-256-GCM under the *alliance consent key* (every member holds it, nobody
  else): HKDF-SHA256 of the alliance pseudonym key with its own ``info``
  (:func:`consent_key`), or ``GATEWAY_CONSENT_KEY``. The plaintext is a fresh random 32-byte
  salt followed by the Consent's RFC 8785 bytes; the associated data binds the opaque consent
  id, the version and the patient pseudonym, so a sealed Consent cannot be replayed as another
  consent, version or patient. The ciphertext is one block in the blob store (Kubo), by CID.
- **Anchoring**: one ``consent`` leaf per version (:class:`ledger.leaves.ConsentLeaf`):
  ``consent`` (HMAC of the Consent's logical id under the pseudonym key: the versions of one
  Consent share it and it says nothing), ``version``, ``action`` (``grant`` for an active
  Consent, ``revoke`` otherwise), ``sha256`` = SHA-256(salt || RFC 8785 bytes) (the SHA-256 of
  the plaintext: the salt stays inside the sealed block, so the hash cannot be tested against
  guesses), ``cid``, ``patient`` (absent only for an institution's administrative default),
  ``source``, ``time``.
- **The view** (:class:`ConsentView`, a ledger listener): per pseudonym the consent leaves, the
  administrative defaults, ``version(patient)`` (ledger index of the patient's latest consent
  leaf under every linked pseudonym, 0 for none) and the consented patients. Versions of one
  consent must follow each other (1, 2, ...) and stay with one patient: a leaf that does not
  (two gateways wrote the same version at once) is ignored by every view alike, and its writer
  answers 409.
- **The service** (:class:`ConsentService`): ``record`` (validate with the patient's other
  consents and every default, seal, store, anchor), ``policy_for`` (fetch, open, compile; cached
  per set of consent versions, opened blobs cached), ``fresh`` (revocation before the next
  read: the log's last sequence, then catch up to it, bounded; concurrent callers share one
  lookup), ``consented_patients``; at start the institution's administrative default
  (:func:`gateway.consent.default_consent`) is anchored if it is not yet.

Raises :class:`gateway.errors.InvalidInputError` (located, code ``processing``: 422; code
``conflict``: 409), :class:`gateway.auth.errors.ForbiddenError` (a patient token acting for
another patient), :class:`gateway.errors.IntegrityError` (a sealed Consent that does not match
its leaf), :class:`ConsentUnavailableError` (freshness could not be established in time),
:class:`gateway.errors.BackendError` and :class:`ledger.errors.LedgerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import rfc8785
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway import consent as consent_core
from gateway.auth.caller import Caller
from gateway.auth.errors import ForbiddenError
from gateway.backends.protocols import BlobStore
from gateway.errors import BackendError, IntegrityError, InvalidInputError, NotFoundError
from gateway.identity import fhir_identifiers, patient_identity
from gateway.packing import cut
from gateway.views import PatientLinks
from ledger.checkpoint import SignedCheckpoint
from ledger.errors import LedgerError
from ledger.leaves import ConsentLeaf, decode_leaf
from ledger.sequencer import Ledger

if TYPE_CHECKING:
    from gateway.fhir import PreparedBundle

log = logging.getLogger("gateway.consents")

#: HKDF ``info`` of the alliance consent key (distinct from every other use of the pseudonym key).
CONSENT_KEY_INFO = b"alliance-gateway/consent-key/v1"
SALT_BYTES = 32
NONCE_BYTES = 12
_MAGIC = b"AGC1"
#: Opened Consents and compiled policies kept in memory (least recently used dropped first).
CACHE_MAX = 4096


def consent_key(pseudonym_key: bytes) -> bytes:
    """The alliance consent key derived from the alliance pseudonym key (HKDF-SHA256, 32 bytes,
    info :data:`CONSENT_KEY_INFO`). Raises nothing."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CONSENT_KEY_INFO).derive(
        pseudonym_key
    )


def consent_token(pseudonym_key: bytes, consent_id: str) -> str:
    """The opaque ledger id of the Consent with logical id ``consent_id`` (hex, 32 digits):
    alliance-wide, the same for all its versions, saying nothing. Raises nothing."""
    return hmac.digest(pseudonym_key, f"consent|{consent_id}".encode(), "sha256").hex()[:32]


def consent_aad(token: str, version: int, patient: str | None) -> bytes:
    """Associated data of a sealed Consent: its opaque id, version and patient (RFC 8785)."""
    return rfc8785.dumps({"consent": token, "patient": patient or "", "version": version})


def seal_consent(
    resource: Mapping[str, Any], *, key: bytes, token: str, version: int, patient: str | None
) -> tuple[bytes, str]:
    """Seal a Consent: (block, hex SHA-256 of the plaintext, i.e. of salt || RFC 8785 bytes).
    Raises nothing for a JSON-serialisable resource."""
    plaintext = os.urandom(SALT_BYTES) + rfc8785.dumps(dict(resource))
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, consent_aad(token, version, patient))
    return _MAGIC + nonce + sealed, hashlib.sha256(plaintext).hexdigest()


def open_consent(block: bytes, leaf: ConsentLeaf, *, key: bytes) -> tuple[bytes, dict[str, Any]]:
    """Open the sealed Consent a leaf anchors (``block`` is its whole block): (salt, Consent).

    Raises IntegrityError naming the consent id, version and CID when the block does not
    decrypt under the key and the leaf's id, version and patient, or its plaintext does not
    hash to the leaf's ``sha256``."""
    where = f"consent {leaf.consent} version {leaf.version} (block {leaf.cid})"
    data = cut(block, leaf.byte_range)
    if data is None or not data.startswith(_MAGIC) or len(data) < 4 + NONCE_BYTES + 16:
        raise IntegrityError(f"{where}: not a sealed Consent", cid=leaf.cid)
    try:
        plaintext = AESGCM(key).decrypt(
            data[4 : 4 + NONCE_BYTES],
            data[4 + NONCE_BYTES :],
            consent_aad(leaf.consent, leaf.version, leaf.patient),
        )
    except InvalidTag as exc:
        raise IntegrityError(f"{where}: failed authentication", cid=leaf.cid) from exc
    if hashlib.sha256(plaintext).hexdigest() != leaf.sha256:
        raise IntegrityError(f"{where}: does not match the leaf's SHA-256", cid=leaf.cid)
    resource = orjson.loads(plaintext[SALT_BYTES:])
    if not isinstance(resource, dict):
        raise IntegrityError(f"{where}: not a Consent", cid=leaf.cid)
    return plaintext[:SALT_BYTES], resource


class ConsentUnavailableError(BackendError):
    """This gateway could not make sure its ledger view is fresh in time (fail closed: 503)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, backend="ledger")


# --------------------------------------------------------------------------------------------
# the view


class ConsentEntry(NamedTuple):
    """One accepted version of a Consent: its leaf and where the leaf is."""

    leaf: ConsentLeaf
    leaf_index: int


class ConsentView:
    """The ledger's consent leaves: per consent its versions, per pseudonym its consents, the
    institutions' administrative defaults. Every gateway derives the same view from the log
    (a ledger listener, like :class:`gateway.views.RecordIndex`). Raises nothing."""

    def __init__(self, links: PatientLinks) -> None:
        self.links = links
        self._versions: dict[str, list[ConsentEntry]] = {}
        self._by_patient: dict[str, set[str]] = defaultdict(set)
        self._defaults: dict[str, str] = {}  # consent token -> institution that anchored it
        self._accepted: set[int] = set()
        self._ignored: set[int] = set()
        self._consented: tuple[tuple[int, int], frozenset[str]] | None = None
        self._link_leaves = 0
        self.leaves = 0

    def on_batch(self, first_index: int, leaves: Sequence[bytes], seq: int) -> None:
        """Ledger listener: take the consent leaves of an applied batch."""
        for offset, raw in enumerate(leaves):
            if b'"kind":"link"' in raw:
                self._link_leaves += 1  # applied to the links by RecordIndex, before this view
                continue
            if b'"kind":"consent"' not in raw:
                continue
            data = decode_leaf(raw)
            if data["kind"] != "consent":
                continue
            self.leaves += 1
            leaf = ConsentLeaf.from_leaf(data)
            index = first_index + offset
            versions = self._versions.get(leaf.consent, [])
            first = versions[0].leaf if versions else None
            # Versions follow each other and stay with one patient (or stay a default): a leaf
            # that does not lost a race with another writer and is ignored, by every view.
            if leaf.version != len(versions) + 1 or (
                first is not None and first.patient != leaf.patient
            ):
                self._ignored.add(index)
                continue
            self._versions.setdefault(leaf.consent, []).append(ConsentEntry(leaf, index))
            self._accepted.add(index)
            if leaf.patient is None:
                self._defaults[leaf.consent] = leaf.source
            else:
                self._by_patient[leaf.patient].add(leaf.consent)

    def accepted(self, leaf_index: int) -> bool | None:
        """Whether the consent leaf at ``leaf_index`` was taken (False: it lost a race), None
        when this view has not seen it."""
        if leaf_index in self._accepted:
            return True
        if leaf_index in self._ignored:
            return False
        return None

    def latest(self, token: str) -> ConsentEntry | None:
        """The latest accepted version of a consent, or None."""
        versions = self._versions.get(token)
        return versions[-1] if versions else None

    def history(self, token: str) -> list[ConsentEntry]:
        """Every accepted version of a consent, oldest first."""
        return list(self._versions.get(token, ()))

    def current_of(self, patient: str) -> list[ConsentEntry]:
        """The latest version of each consent of a patient, under every linked pseudonym, in
        ledger order."""
        tokens = self.tokens_of(patient)
        return sorted((self._versions[t][-1] for t in tokens), key=lambda e: e.leaf_index)

    def tokens_of(self, patient: str) -> frozenset[str]:
        """The opaque ids of a patient's consents, under every linked pseudonym."""
        return frozenset(t for p in self.links.all_of(patient) for t in self._by_patient.get(p, ()))

    def defaults(self) -> list[ConsentEntry]:
        """The latest version of every institution's administrative default, in ledger order."""
        return sorted((self._versions[t][-1] for t in self._defaults), key=lambda e: e.leaf_index)

    def version(self, patient: str) -> int:
        """Ledger index of the patient's latest consent leaf (every linked pseudonym), 0 for
        none."""
        latest = [
            self._versions[t][-1].leaf_index
            for p in self.links.all_of(patient)
            for t in self._by_patient.get(p, ())
        ]
        return max(latest, default=0)

    def consented_patients(self) -> frozenset[str]:
        """Pseudonyms with at least one consent leaf, and every pseudonym linked to one
        (computed again only when a consent or a link was added)."""
        key = (len(self._accepted), self._link_leaves)
        if self._consented is None or self._consented[0] != key:
            found = frozenset(q for p in self._by_patient for q in self.links.all_of(p))
            self._consented = (key, found)
        return self._consented[1]


# --------------------------------------------------------------------------------------------
# the service


class PatientPolicy(NamedTuple):
    """A patient's compiled consents (every linked pseudonym's, and every institution's
    administrative default) and the consent version they were compiled at."""

    policy: consent_core.Policy
    version: int


@dataclass(frozen=True, slots=True)
class StoredConsent:
    """A recorded Consent version: the resource as stored (``meta.versionId`` set), where its
    leaf landed (index, tree, signed checkpoint) and where its sealed block is."""

    resource: dict[str, Any]
    consent_id: str
    token: str
    version: int
    action: str
    patient: str | None
    leaf_index: int
    tree_size: int
    root: bytes
    checkpoint: SignedCheckpoint
    cid: str
    byte_range: tuple[int, int] | None
    last_updated: str
    created: bool


@dataclass(frozen=True, slots=True)
class ReadConsent:
    """An opened Consent version with its entry in the view."""

    resource: dict[str, Any]
    entry: ConsentEntry


def _now() -> tuple[str, str]:
    """(``meta.lastUpdated`` with milliseconds, leaf time in seconds), both UTC."""
    iso = datetime.now(UTC).isoformat(timespec="milliseconds")
    return iso[:23] + "Z", iso[:19] + "Z"


def _as_processing(exc: InvalidInputError) -> InvalidInputError:
    """A Consent the evaluator refuses is unprocessable (422), with the same location."""
    return InvalidInputError(str(exc), location=exc.location, code="processing")


class ConsentService:
    """Records, reads and compiles consents (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        view: ConsentView,
        blobs: BlobStore,
        log: Any,
        pseudonym_key: bytes,
        key: bytes,
        institution: str,
        master_system: str,
        patient_of: Callable[[str], str | None],
        fresh_timeout: float = 10.0,
    ) -> None:
        self.ledger = ledger
        self.view = view
        self._blobs = blobs
        self._log = log
        self._pkey = pseudonym_key
        self._key = key
        self.institution = institution
        self.master_system = master_system
        self._patient_of = patient_of
        self.fresh_timeout = fresh_timeout
        self._opened: OrderedDict[int, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._policies: OrderedDict[tuple[int, ...], consent_core.Policy] = OrderedDict()
        self._compiling: dict[tuple[int, ...], asyncio.Future[consent_core.Policy]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fresh_next: asyncio.Future[None] | None = None
        self._fresh_task: asyncio.Task[None] | None = None
        self.fresh_lookups = 0
        self.retry_interval = 2.0
        self._default_task: asyncio.Task[None] | None = None

    # ---- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Anchor this institution's administrative default unless the ledger already has it.
        While the blob store or the log is down the gateway still starts: the default is
        anchored by a background retry (every ``retry_interval`` s) once they are back.
        Raises nothing."""
        try:
            await self.ensure_default()
        except (BackendError, LedgerError) as exc:
            log.warning(
                "administrative default Consent not anchored yet; retrying",
                extra={"error": type(exc).__name__},
            )
            self._default_task = asyncio.create_task(self._retry_default(), name="consent-default")

    async def _retry_default(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.ensure_default()
                return
            except (BackendError, LedgerError):
                continue

    async def stop(self) -> None:
        """Stop the background retry, if any. Raises nothing."""
        task, self._default_task = self._default_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ensure_default(self) -> StoredConsent | None:
        """Anchor this institution's administrative default unless the ledger already has it;
        return what was anchored (None: it was there). Raises BackendError, LedgerError."""
        default = consent_core.default_consent(self.institution)
        token = consent_token(self._pkey, str(default["id"]))
        if self.view.latest(token) is not None:
            return None
        try:
            return await self._anchor(default, token=token, patient=None, action="grant")
        except InvalidInputError as exc:
            if exc.code == "conflict":  # another process of this institution anchored it
                return None
            raise

    # ---- identity --------------------------------------------------------------------------

    def patient_of_consent(self, consent: Mapping[str, Any]) -> str:
        """The pseudonym of the patient a Consent names: ``Consent.patient.identifier`` under
        the alliance master system (gateway/identity.py), or a reference to a Patient stored
        here. Raises InvalidInputError (422, located at ``Consent.patient``)."""
        ref = consent.get("patient")
        if not isinstance(ref, Mapping):
            raise InvalidInputError(
                "a Consent must name its patient", location="Consent.patient", code="processing"
            )
        reference = ref.get("reference")
        if isinstance(reference, str) and reference:
            if not reference.startswith("Patient/"):
                raise InvalidInputError(
                    "Consent.patient.reference must be Patient/{id}",
                    location="Consent.patient.reference",
                    code="processing",
                )
            found = self._patient_of(reference.split("/", 1)[1])
            if found is None:
                raise InvalidInputError(
                    "Consent.patient references a Patient that is not stored on this gateway",
                    location="Consent.patient.reference",
                    code="processing",
                )
            return found
        identifiers = fhir_identifiers(dict(ref))
        if not any(system == self.master_system for system, _v in identifiers):
            raise InvalidInputError(
                f"Consent.patient.identifier must be the alliance master identifier "
                f"(system {self.master_system})",
                location="Consent.patient.identifier",
                code="processing",
            )
        return patient_identity(
            self._pkey,
            identifiers,
            master_system=self.master_system,
            facility=self.institution,
        ).pseudonym

    def patient_of_master_id(self, value: str) -> str:
        """The pseudonym of the patient with master identifier ``value`` (identity.py)."""
        return patient_identity(
            self._pkey,
            [(self.master_system, value)],
            master_system=self.master_system,
            facility=self.institution,
        ).pseudonym

    def patient_of_stored(self, patient_id: str) -> str | None:
        """The pseudonym of the Patient with id ``patient_id`` stored here, or None."""
        return self._patient_of(patient_id)

    def token_of(self, consent_id: str) -> str:
        """The opaque ledger id of a Consent's logical id."""
        return consent_token(self._pkey, consent_id)

    def _same_person(self, caller_patient: str | None, patient: str) -> bool:
        return caller_patient is not None and self.view.links.linked(caller_patient, patient)

    def check_caller(self, caller: object | None, patient: str) -> None:
        """Refuse a patient token acting on another patient's consents (under every linked
        pseudonym). Raises ForbiddenError."""
        if (
            isinstance(caller, Caller)
            and caller.kind == "patient"
            and not self._same_person(caller.patient, patient)
        ):
            raise ForbiddenError(
                "a patient token reaches only that patient's own consents", reason="patient"
            )

    # ---- recording -------------------------------------------------------------------------

    async def record(self, consent: Mapping[str, Any], caller: object | None) -> StoredConsent:
        """Record a new version of a Consent (its ``id`` is the logical id; one is assigned when
        absent) for the patient it names, on behalf of ``caller``.

        A patient token may record only its own patient's consents; a system client acts on the
        patient's behalf and must then give ``performer`` and ``sourceAttachment`` or
        ``sourceReference`` (the signed form). The Consent is compiled together with the
        patient's other consents and every institution's default, so a bad provision or one
        consent too many is refused with its location. ``status: active`` anchors a ``grant``,
        anything else (``inactive``: a revocation) a ``revoke``. Returns once the leaf is
        durable and applied to this gateway's view.

        Raises InvalidInputError (422 located; 409 when another gateway wrote the same version
        at once), ForbiddenError, BackendError, LedgerError.
        """
        resource = dict(consent)
        resource.setdefault("id", uuid.uuid4().hex)
        patient = self.patient_of_consent(resource)
        self.check_caller(caller, patient)
        if isinstance(caller, Caller) and caller.kind != "patient":
            _require_on_behalf(resource)
        await self.fresh()  # the versions and the other consents as the whole alliance has them
        token = self.token_of(str(resource["id"]))
        existing = self.view.latest(token)
        if existing is not None and (
            existing.leaf.patient is None
            or not self.view.links.linked(existing.leaf.patient, patient)
        ):
            raise ForbiddenError(
                "this Consent id belongs to another patient's consent", reason="patient"
            )
        others = [e for e in self.view.current_of(patient) if e.leaf.consent != token]
        defaults = self.view.defaults()
        opened = [r for _s, r in await self._open_all([*others, *defaults])]
        try:
            consent_core.compile_policy([*opened, resource])
        except InvalidInputError as exc:
            raise _as_processing(exc) from exc
        action = "grant" if resource.get("status") == "active" else "revoke"
        return await self._anchor(resource, token=token, patient=patient, action=action)

    async def _anchor(
        self, resource: dict[str, Any], *, token: str, patient: str | None, action: str
    ) -> StoredConsent:
        """Seal, store and anchor the next version of consent ``token`` (one at a time per
        consent on this gateway). Raises InvalidInputError (409: lost a race with another
        gateway), BackendError, LedgerError."""
        lock = self._locks.setdefault(token, asyncio.Lock())
        async with lock:
            latest = self.view.latest(token)
            version = latest.leaf.version + 1 if latest is not None else 1
            last_updated, leaf_time = _now()
            meta = {k: v for k, v in (resource.get("meta") or {}).items() if k != "versionId"}
            resource["meta"] = {**meta, "versionId": str(version), "lastUpdated": last_updated}
            block, digest = seal_consent(
                resource, key=self._key, token=token, version=version, patient=patient
            )
            (cid,) = await self._blobs.put_many([block])
            leaf = ConsentLeaf(
                consent=token,
                version=version,
                action=action,
                sha256=digest,
                cid=cid,
                source=self.institution,
                time=leaf_time,
                patient=patient,
            )
            (result,) = await self.ledger.append([leaf.encode()])
            if self.view.accepted(result.index) is False:
                raise InvalidInputError(
                    f"Consent {resource['id']} was changed at the same time elsewhere; "
                    "read it again and retry",
                    location="Consent.id",
                    code="conflict",
                )
        return StoredConsent(
            resource=resource,
            consent_id=str(resource["id"]),
            token=token,
            version=version,
            action=action,
            patient=patient,
            leaf_index=result.index,
            tree_size=result.tree_size,
            root=result.root,
            checkpoint=result.checkpoint,
            cid=cid,
            byte_range=None,
            last_updated=last_updated,
            created=version == 1,
        )

    # ---- reading ---------------------------------------------------------------------------

    async def _open(self, entry: ConsentEntry) -> tuple[bytes, dict[str, Any]]:
        """(salt, Consent) of one version, cached. Raises IntegrityError, BackendError."""
        found = self._opened.get(entry.leaf_index)
        if found is not None:
            self._opened.move_to_end(entry.leaf_index)
            return found
        block = await self._blobs.get(entry.leaf.cid)
        found = open_consent(block, entry.leaf, key=self._key)
        self._opened[entry.leaf_index] = found
        while len(self._opened) > CACHE_MAX:
            self._opened.popitem(last=False)
        return found

    async def _open_all(
        self, entries: Sequence[ConsentEntry]
    ) -> list[tuple[bytes, dict[str, Any]]]:
        return list(await asyncio.gather(*(self._open(e) for e in entries)))

    async def read(self, consent_id: str, version: int | None = None) -> ReadConsent:
        """A Consent's latest (or given) version, opened. Raises NotFoundError, IntegrityError,
        BackendError."""
        token = self.token_of(consent_id)
        versions = self.view.history(token)
        if not versions:
            raise NotFoundError(f"Consent/{consent_id} is not known")
        if version is None:
            entry = versions[-1]
        elif 1 <= version <= len(versions):
            entry = versions[version - 1]
        else:
            raise NotFoundError(f"Consent/{consent_id} has no version {version}")
        _salt, resource = await self._open(entry)
        return ReadConsent(resource, entry)

    async def history(self, consent_id: str) -> list[ReadConsent]:
        """Every version of a Consent, newest first. Raises NotFoundError, IntegrityError,
        BackendError."""
        versions = self.view.history(self.token_of(consent_id))
        if not versions:
            raise NotFoundError(f"Consent/{consent_id} is not known")
        opened = await self._open_all(versions)
        return [
            ReadConsent(r, e) for e, (_s, r) in reversed(list(zip(versions, opened, strict=True)))
        ]

    async def consents_of(self, patient: str) -> list[ReadConsent]:
        """The latest version of each of a patient's consents (every linked pseudonym), in
        ledger order. Raises IntegrityError, BackendError."""
        entries = self.view.current_of(patient)
        opened = await self._open_all(entries)
        return [ReadConsent(r, e) for e, (_s, r) in zip(entries, opened, strict=True)]

    # ---- for enforcement (gateway/consent_policy.py) ---------------------------------------

    async def policy_for(self, patient: str) -> PatientPolicy:
        """The patient's compiled policy: every consent under every pseudonym linked to it, and
        every institution's administrative default; compiled once per set of consent versions
        (cached), opened blocks cached. ``version`` is the ledger index of the patient's latest
        consent leaf (0: none). Raises IntegrityError, BackendError, InvalidInputError (a stored
        consent set the evaluator refuses: never, since each was compiled when recorded)."""
        entries = [*self.view.current_of(patient), *self.view.defaults()]
        version = self.view.version(patient)
        key = tuple(sorted(e.leaf_index for e in entries))
        policy = self._policies.get(key)
        if policy is not None:
            self._policies.move_to_end(key)
            return PatientPolicy(policy, version)
        pending = self._compiling.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._compiling[key] = pending
            try:
                opened = await self._open_all(entries)
                policy = consent_core.compile_policy([r for _s, r in opened])
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: waiters (if any) get it from their await
                raise
            finally:
                self._compiling.pop(key, None)
            pending.set_result(policy)
            self._policies[key] = policy
            while len(self._policies) > CACHE_MAX:
                self._policies.popitem(last=False)
            return PatientPolicy(policy, version)
        return PatientPolicy(await asyncio.shield(pending), version)

    def consented_patients(self) -> frozenset[str]:
        """Pseudonyms with at least one consent leaf (and those linked to them)."""
        return self.view.consented_patients()

    def version(self, patient: str) -> int:
        """The patient's consent version (see :meth:`ConsentView.version`)."""
        return self.view.version(patient)

    async def fresh(self) -> None:
        """Return once this gateway's ledger view holds every leaf the log acknowledged before
        the call: look up the log's last sequence, then catch up to it (bounded by
        ``fresh_timeout``). Concurrent callers share one lookup (a caller arriving while one
        runs joins the next, which starts after its call). The ledger's follower only makes it
        sooner. Raises ConsentUnavailableError (fail closed), BackendError, LedgerError."""
        fut = self._fresh_next
        if fut is None:
            fut = self._fresh_next = asyncio.get_running_loop().create_future()
            if self._fresh_task is None or self._fresh_task.done():
                self._fresh_task = asyncio.create_task(self._fresh_rounds(), name="consent-fresh")
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.fresh_timeout + 1.0)
        except TimeoutError as exc:
            raise ConsentUnavailableError(
                f"the ledger view could not be brought up to date in {self.fresh_timeout} s"
            ) from exc

    async def _fresh_rounds(self) -> None:
        while self._fresh_next is not None:
            fut, self._fresh_next = self._fresh_next, None
            try:
                await self._catch_up_to_log()
            except BaseException as exc:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # marked retrieved: a caller that timed out is gone
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                if not fut.done():
                    fut.set_result(None)

    async def _catch_up_to_log(self) -> None:
        self.fresh_lookups += 1
        deadline = time.monotonic() + self.fresh_timeout
        target = await self._log.last_seq()
        while self.ledger.applied_seq < target:
            if time.monotonic() > deadline:
                raise ConsentUnavailableError(
                    f"the ledger view is at log message {self.ledger.applied_seq}, the log at "
                    f"{target}: not caught up in {self.fresh_timeout} s"
                )
            # Often the target is this gateway's own append in flight: waiting for the
            # ledger's turn is then enough (nothing read, no pause).
            applied = await self.ledger.catch_up(until=target)
            if not applied and self.ledger.applied_seq < target:
                await asyncio.sleep(0.01)  # not readable yet

    def forget(self, patient: str) -> None:
        """Drop what this gateway holds in memory of a patient's consents (opened Consents,
        compiled policies): erasure's restriction calls it. Raises nothing."""
        indexes = {
            e.leaf_index for token in self.view.tokens_of(patient) for e in self.view.history(token)
        }
        for i in indexes:
            self._opened.pop(i, None)
        for key in [k for k in self._policies if indexes & set(k)]:
            del self._policies[key]


def _require_on_behalf(consent: Mapping[str, Any]) -> None:
    """An institution recording a consent for the patient must say who took it (``performer``)
    and give the signed form (``sourceAttachment`` or ``sourceReference``). Raises
    InvalidInputError (422, located)."""
    if not consent.get("performer"):
        raise InvalidInputError(
            "a Consent recorded by an institution on the patient's behalf needs performer",
            location="Consent.performer",
            code="processing",
        )
    if not (consent.get("sourceAttachment") or consent.get("sourceReference")):
        raise InvalidInputError(
            "a Consent recorded by an institution on the patient's behalf needs the signed "
            "form: sourceAttachment or sourceReference",
            location="Consent.source[x]",
            code="processing",
        )


def keep_consents_out(prepared: PreparedBundle) -> None:
    """Refuse the Consent entries of a transaction or batch Bundle: consents are recorded
    through ``POST``/``PUT /fhir/Consent`` only (they are not records of this custodian). A
    transaction fails as a whole; in a batch the entry gets its error. Raises
    InvalidInputError (422, located at the entry)."""
    for pe in prepared.entries:
        if pe.resource is None or pe.resource.get("resourceType") != "Consent":
            continue
        error = InvalidInputError(
            "a Consent is recorded with POST or PUT /fhir/Consent, not inside a Bundle",
            location=f"Bundle.entry[{pe.position}].resource",
            code="processing",
        )
        if prepared.bundle_type == "transaction":
            raise error
        pe.error, pe.resource = error, None
