"""The client registry: who may ask for tokens, with which keys, scopes, purposes and roles.

Clients are configuration, so the registry is one JSON file under the data directory
(``data_dir/auth/clients.json``) on both profiles, replaced atomically and durably on every
change (:func:`save_registry`, the one write). A running gateway re-reads it when the file
changes (checked at most once a second), so ``gateway clients add|disable`` takes effect
without a restart; every process of a gateway sees the same file.

Each client has public keys (a JWKS: ES384 or RS384, each key with its ``kid`` and ``alg``,
several for rotation), its institution, the SMART scopes and purposes it may be granted,
whether it may break the glass, the staff roles it may assert, the SHA-256 fingerprints of the
TLS client certificates it connects with over MLLP, and flags: ``gateway`` (another member's
gateway: the witness endpoint), ``portal`` (may ask for patient tokens).

Raises :class:`gateway.auth.errors.RegistryError`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.auth.errors import RegistryError
from gateway.auth.purposes import KNOWN, parse_purposes
from gateway.auth.scopes import Scope, ScopeError, parse_scopes
from ledger.durable import write_durably

#: Signature algorithms a client key may be registered for (SMART Backend Services).
CLIENT_ALGORITHMS = ("ES384", "RS384")


@dataclass(frozen=True)
class ClientRecord:
    """One registered client."""

    client_id: str
    institution: str
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    scopes: tuple[str, ...] = ()
    purposes: tuple[str, ...] = ()
    break_glass: bool = False
    roles: tuple[str, ...] = ()
    certificates: tuple[str, ...] = ()
    gateway: bool = False
    portal: bool = False
    disabled: bool = False

    def parsed_scopes(self) -> tuple[Scope, ...]:
        """The registered scopes, parsed. Raises ScopeError."""
        return parse_scopes(self.scopes)

    def key_algorithms(self) -> dict[str, str]:
        """kid -> registered algorithm of each key."""
        return {str(k["kid"]): str(k["alg"]) for k in self.jwks.get("keys", [])}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        for name in ("scopes", "purposes", "roles", "certificates"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientRecord:
        """Build and validate a record. Raises RegistryError."""
        try:
            record = cls(
                client_id=str(data["client_id"]),
                institution=str(data["institution"]),
                jwks=dict(data.get("jwks") or {"keys": []}),
                scopes=tuple(str(s) for s in data.get("scopes", ())),
                purposes=tuple(str(p) for p in data.get("purposes", ())),
                break_glass=bool(data.get("break_glass", False)),
                roles=tuple(str(r) for r in data.get("roles", ())),
                certificates=tuple(str(c).lower() for c in data.get("certificates", ())),
                gateway=bool(data.get("gateway", False)),
                portal=bool(data.get("portal", False)),
                disabled=bool(data.get("disabled", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"invalid client registration: {exc}") from exc
        validate(record)
        return record


def validate(record: ClientRecord) -> None:
    """Check a registration: ids, keys (kid + ES384/RS384 + matching key type), scopes,
    purposes. Raises RegistryError naming the problem."""
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    if not record.client_id or not record.institution:
        raise RegistryError("a client needs a client id and an institution")
    keys = record.jwks.get("keys")
    if not isinstance(keys, list):
        raise RegistryError(f"client {record.client_id}: jwks has no 'keys' list")
    kids: set[str] = set()
    for key in keys:
        if (
            not isinstance(key, dict)
            or not key.get("kid")
            or key.get("alg") not in CLIENT_ALGORITHMS
        ):
            raise RegistryError(
                f"client {record.client_id}: every key needs a kid and alg ES384 or RS384"
            )
        if any(name in key for name in ("d", "p", "q")):
            raise RegistryError(f"client {record.client_id}: key {key['kid']} is a private key")
        expected = "EC" if key["alg"] == "ES384" else "RSA"
        if key.get("kty") != expected or (expected == "EC" and key.get("crv") != "P-384"):
            raise RegistryError(
                f"client {record.client_id}: key {key['kid']} does not fit alg {key['alg']}"
            )
        if key["kid"] in kids:
            raise RegistryError(f"client {record.client_id}: kid {key['kid']} appears twice")
        kids.add(str(key["kid"]))
    try:
        if keys:
            KeySet.import_key_set({"keys": keys})
    except (JoseError, ValueError, TypeError) as exc:
        raise RegistryError(f"client {record.client_id}: unusable key: {exc}") from exc
    try:
        scopes = record.parsed_scopes()
    except ScopeError as exc:
        raise RegistryError(f"client {record.client_id}: {exc}") from exc
    if record.portal is False and any(s.context == "patient" for s in scopes):
        raise RegistryError(
            f"client {record.client_id}: patient/ scopes are for portal clients only"
        )
    unknown = [p for p in parse_purposes(record.purposes) if p not in KNOWN]
    if unknown:
        raise RegistryError(f"client {record.client_id}: unknown purposes {unknown}")


def registry_path(data_dir: Path) -> Path:
    """Where the registry lives."""
    return data_dir / "auth" / "clients.json"


def load_registry(path: Path) -> dict[str, ClientRecord]:
    """Read the registry file (an absent file is an empty registry). Raises RegistryError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RegistryError(f"cannot read the client registry {path}: {exc}") from exc
    try:
        data = json.loads(raw)
        items = data["clients"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"the client registry {path} is not valid: {exc}") from exc
    records = [ClientRecord.from_json(item) for item in items]
    return {r.client_id: r for r in records}


def save_registry(path: Path, clients: Iterable[ClientRecord]) -> None:
    """Write the registry atomically and durably (the one place it is written; repoint this
    to move the registry elsewhere). Raises RegistryError."""
    body = {"clients": [c.to_json() for c in sorted(clients, key=lambda c: c.client_id)]}
    try:
        write_durably(path, json.dumps(body, indent=2, sort_keys=True).encode() + b"\n")
    except OSError as exc:
        raise RegistryError(f"cannot write the client registry {path}: {exc}") from exc


class ClientRegistry:
    """The registry as the gateway reads it: cached, re-read when the file changes."""

    def __init__(self, path: Path, *, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self._recheck = recheck_seconds
        self._clients: dict[str, ClientRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reload()

    def reload(self) -> None:
        """Re-read the file now. Raises RegistryError."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            self._clients = load_registry(self.path)
            self._stamp = stamp
        self._checked = time.monotonic()

    def get(self, client_id: str) -> ClientRecord | None:
        """The client, or None when unknown (disabled clients are returned: check
        ``disabled``). Raises RegistryError when a changed file cannot be read."""
        if time.monotonic() - self._checked > self._recheck:
            self.reload()
        found = self._clients.get(client_id)
        if found is None:  # registered a moment ago: usable at once (one stat to find out)
            self.reload()
            found = self._clients.get(client_id)
        return found

    def by_certificate(self, fingerprint: str) -> ClientRecord | None:
        """The client registered for this certificate's SHA-256 fingerprint (hex)."""
        if time.monotonic() - self._checked > self._recheck:
            self.reload()
        fp = fingerprint.lower()
        found = next((c for c in self._clients.values() if fp in c.certificates), None)
        if found is None:
            self.reload()
            found = next((c for c in self._clients.values() if fp in c.certificates), None)
        return found

    def all(self) -> list[ClientRecord]:
        """Every client, sorted by id."""
        self.reload()
        return sorted(self._clients.values(), key=lambda c: c.client_id)

    def put(self, record: ClientRecord) -> None:
        """Add or replace a client, durably. Raises RegistryError."""
        validate(record)
        self.reload()
        clients = dict(self._clients)
        clients[record.client_id] = record
        save_registry(self.path, clients.values())
        self.reload()

    def disable(self, client_id: str) -> ClientRecord:
        """Disable a client (its tokens stop working at once). Raises RegistryError."""
        self.reload()
        found = self._clients.get(client_id)
        if found is None:
            raise RegistryError(f"no client {client_id}")
        record = replace(found, disabled=True)
        self.put(record)
        return record
