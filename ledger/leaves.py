"""Leaf kinds of the ledger and their canonical encoding (RFC 8785 JSON). Pure.

A leaf is the RFC 8785 canonical JSON of an object with ``"v": 1``, ``"kind"`` and the fields of
its kind (see :data:`LEAF_FIELDS` and ``docs/ledger-format.md``). Fields are whitelisted per
kind: unknown fields are rejected, and every string field has a restricted shape (opaque tokens,
lowercase hex digests, pseudonyms, RFC 3339 UTC times, short enumerations), so that no name,
identifier, birth date or free text of a patient can be put on the ledger by mistake.

Raises :class:`ledger.errors.LeafFormatError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import rfc8785

from ledger.errors import LeafFormatError

LEAF_VERSION = 1
MAX_LEAF_BYTES = 64 * 1024
MAX_LIST = 1000

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CID = re.compile(r"b[a-z2-7]{10,200}")
_RTYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a leaf kind: a checker returning an error text or None, and if required."""

    check: Callable[[Any], str | None]
    required: bool = True
    doc: str = ""


def _token(v: Any) -> str | None:
    if isinstance(v, str) and _TOKEN.fullmatch(v):
        return None
    return "must be an opaque token (1-128 of A-Z a-z 0-9 . _ : / + -, starting alphanumeric)"


def _hex64(v: Any) -> str | None:
    return None if isinstance(v, str) and _HEX64.fullmatch(v) else "must be 64 lowercase hex"


def _cid(v: Any) -> str | None:
    return None if isinstance(v, str) and _CID.fullmatch(v) else "must be a base32 CIDv1"


def _rtype(v: Any) -> str | None:
    return None if isinstance(v, str) and _RTYPE.fullmatch(v) else "must be a FHIR resource type"


def _time(v: Any) -> str | None:
    if isinstance(v, str) and _TIME.fullmatch(v):
        try:
            datetime.fromisoformat(v[:19])
        except ValueError:
            return "is not a valid date-time"
        return None
    return "must be an RFC 3339 UTC time (YYYY-MM-DDThh:mm:ss[.fraction]Z)"


def _positive(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**53
    return None if ok else "must be an integer >= 1"


def _true(v: Any) -> str | None:
    return None if v is True else "must be true (absent when false)"


def _enum(*values: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in values else f"must be one of {', '.join(values)}"

    return check


MAX_CONTAINED = 200
#: Largest block a ``range`` may point into (IPFS peers exchange blocks of up to 2 MiB).
MAX_BLOCK_BYTES = 2 * 1024 * 1024


def _byte_range(v: Any) -> str | None:
    problem = "must be [offset, length]: integers, offset >= 0, length >= 1, within 2 MiB"
    if not isinstance(v, list) or len(v) != 2:
        return problem
    offset, length = v
    for n in v:
        if not isinstance(n, int) or isinstance(n, bool):
            return problem
    if offset < 0 or length < 1 or offset + length > MAX_BLOCK_BYTES:
        return problem
    return None


_ENTRY_KEYS = frozenset({"record", "type", "version"})


def _contains(v: Any) -> str | None:
    problem = f"must be a list of 1-{MAX_CONTAINED} {{record, type, version}} objects"
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CONTAINED:
        return problem
    for item in v:
        if not isinstance(item, dict) or item.keys() != _ENTRY_KEYS:
            return problem
        if _token(item["record"]) or _rtype(item["type"]) or _positive(item["version"]):
            return problem
    return None


_FILE_KEYS = frozenset({"name", "sha256"})


def _dictionary_files(v: Any) -> str | None:
    problem = f"must be a list of 0-{MAX_LIST} {{name, sha256}} objects (name a token)"
    if not isinstance(v, list) or len(v) > MAX_LIST:
        return problem
    for item in v:
        if not isinstance(item, dict) or item.keys() != _FILE_KEYS:
            return problem
        if _token(item["name"]) or _hex64(item["sha256"]):
            return problem
    return None


#: Most record ids one ``erasure`` leaf lists (more take several leaves).
MAX_ERASED = 500


def _erased_records(v: Any) -> str | None:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_ERASED:
        return f"must be a list of 1-{MAX_ERASED} opaque record ids"
    for item in v:
        if _token(item) is not None:
            return "must be a list of opaque record ids"
    if len(set(v)) != len(v):
        return "must not name a record twice"
    return None


LEAF_FIELDS: dict[str, dict[str, FieldSpec]] = {
    "record": {
        "record": FieldSpec(_token, doc="opaque record id"),
        "version": FieldSpec(_positive, doc="record version, from 1"),
        "cid": FieldSpec(
            _cid, doc="CIDv1 (raw, sha2-256, base32) of the block holding the ciphertext"
        ),
        "range": FieldSpec(
            _byte_range,
            required=False,
            doc="[offset, length] of the ciphertext in the block (absent: the whole block)",
        ),
        "sha256": FieldSpec(_hex64, doc="SHA-256 of the ciphertext, hex"),
        "patient": FieldSpec(_hex64, doc="patient pseudonym, hex"),
        "type": FieldSpec(_rtype, doc="FHIR resource type"),
        "source": FieldSpec(_token, doc="source institution id"),
        "dictionary": FieldSpec(_token, doc="unified dictionary version"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
        "contains": FieldSpec(
            _contains,
            required=False,
            doc="record versions carried in this ciphertext (a collection Bundle)",
        ),
        "deleted": FieldSpec(
            _true, required=False, doc="true: this version is a deletion (a tombstone)"
        ),
    },
    "consent": {
        "consent": FieldSpec(
            _token, doc="opaque consent id: HMAC of the Consent's logical id, same for its versions"
        ),
        "version": FieldSpec(_positive, doc="consent version, from 1"),
        "action": FieldSpec(_enum("grant", "revoke"), doc="grant (active) or revoke"),
        "sha256": FieldSpec(
            _hex64, doc="SHA-256 of a 32-byte salt || the Consent's RFC 8785 bytes, hex"
        ),
        "cid": FieldSpec(_cid, doc="CIDv1 of the block holding the sealed Consent"),
        "range": FieldSpec(
            _byte_range,
            required=False,
            doc="[offset, length] of the sealed Consent in the block (absent: the whole block)",
        ),
        "patient": FieldSpec(
            _hex64,
            required=False,
            doc="patient pseudonym, hex (absent: an institution's administrative default)",
        ),
        "source": FieldSpec(_token, doc="institution that recorded it"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
    "access": {
        "patient": FieldSpec(_hex64, doc="patient pseudonym, hex"),
        "decision": FieldSpec(_enum("permit", "deny"), doc="permit or deny"),
        "sha256": FieldSpec(
            _hex64,
            doc="SHA-256 of a 32-byte random salt followed by the RFC 8785 bytes of the "
            "AuditEvent, hex (the salt is only inside the sealed AuditEvent)",
        ),
        "source": FieldSpec(_token, doc="institution (gateway) that decided"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
    "key": {
        "action": FieldSpec(_enum("erasure", "restrict", "rotation", "trust"), doc="what happened"),
        "key_id": FieldSpec(_token, required=False, doc="key concerned (erasure, rotation)"),
        "new_key_id": FieldSpec(_token, required=False, doc="replacement key (rotation)"),
        "patient": FieldSpec(_hex64, required=False, doc="patient pseudonym (erasure, restrict)"),
        "sha256": FieldSpec(_hex64, required=False, doc="SHA-256 of the trust file (trust)"),
        "source": FieldSpec(_token, doc="institution"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
    "link": {
        "from": FieldSpec(_hex64, doc="patient pseudonym that now names the same person, hex"),
        "to": FieldSpec(_hex64, doc="patient pseudonym it is linked to, hex"),
        "reason": FieldSpec(
            _enum("master-identifier", "merge", "patient-link"),
            doc="why: the master identifier arrived, a merge (HL7 A40), a FHIR Patient.link",
        ),
        "source": FieldSpec(_token, doc="institution that recorded the link"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
    "erasure": {
        "patient": FieldSpec(_hex64, doc="patient pseudonym the ciphertexts are filed under"),
        "records": FieldSpec(
            _erased_records,
            doc="record ids (as sealed: a container's own id) whose ciphertexts anchored "
            "before this leaf had their wrapped data keys destroyed",
        ),
        "source": FieldSpec(_token, doc="custodian institution that destroyed them"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
    "dictionary": {
        "version": FieldSpec(_token, doc="dictionary version"),
        "sha256": FieldSpec(_hex64, doc="SHA-256 of the dictionary bundle, hex"),
        "files": FieldSpec(_dictionary_files, doc="the bundle's files: [{name, sha256}]"),
        "source": FieldSpec(_token, doc="institution that published it"),
        "time": FieldSpec(_time, doc="RFC 3339 UTC time"),
    },
}

_KEY_ACTION_REQUIRES = {
    "erasure": ("key_id", "patient"),
    "restrict": ("patient",),
    "rotation": ("key_id", "new_key_id"),
    "trust": ("sha256",),
}

KINDS = tuple(LEAF_FIELDS)


def _validate(kind: Any, fields: Mapping[str, Any]) -> None:
    if kind not in LEAF_FIELDS:
        raise LeafFormatError(f"unknown leaf kind {kind!r}", kind=None)
    spec = LEAF_FIELDS[kind]
    for name in fields:
        if name not in spec:
            raise LeafFormatError(f"{kind} leaf: unknown field {name!r}", kind=kind, field=name)
    for name, fs in spec.items():
        if name not in fields:
            if fs.required:
                raise LeafFormatError(f"{kind} leaf: missing field {name!r}", kind=kind, field=name)
            continue
        problem = fs.check(fields[name])
        if problem:
            raise LeafFormatError(f"{kind} leaf: field {name!r} {problem}", kind=kind, field=name)
    if kind == "record" and fields.get("deleted") and "contains" in fields:
        raise LeafFormatError(
            "record leaf: a container is never deleted", kind=kind, field="deleted"
        )
    if kind == "link" and fields["from"] == fields["to"]:
        raise LeafFormatError("link leaf: from and to are the same", kind=kind, field="to")
    if kind == "key":
        action = fields["action"]
        for name in _KEY_ACTION_REQUIRES[action]:
            if name not in fields:
                raise LeafFormatError(
                    f"key leaf: action {action!r} needs {name!r}", kind=kind, field=name
                )
        allowed = {"action", "source", "time", *_KEY_ACTION_REQUIRES[action]}
        for name in fields:
            if name not in allowed:
                raise LeafFormatError(
                    f"key leaf: field {name!r} does not belong to action {action!r}",
                    kind=kind,
                    field=name,
                )


def encode_leaf(kind: str, fields: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a leaf of ``kind`` with ``fields`` (without ``v`` and ``kind``).

    Once the fields have passed their shape checks every string is printable ASCII without
    quotes or backslashes, every key an ASCII field name and every number an integer, so
    sorted-key compact JSON (orjson) is exactly the RFC 8785 encoding (tested against the
    ``rfc8785`` package); it is about 150 times faster.
    Raises LeafFormatError for an unknown kind, a missing, unknown or ill-typed field.
    """
    if "v" in fields or "kind" in fields:
        raise LeafFormatError("fields must not contain 'v' or 'kind'", kind=kind)
    _validate(kind, fields)
    obj = {"v": LEAF_VERSION, "kind": kind, **fields}
    data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    if len(data) > MAX_LEAF_BYTES:
        raise LeafFormatError(f"{kind} leaf is larger than {MAX_LEAF_BYTES} bytes", kind=kind)
    if len(_ENCODED) >= _ENCODED_MAX:  # only leaves that never reached the log pile up
        _ENCODED.clear()
    _ENCODED[data] = obj
    return data


# Leaves this process encoded and has not decoded yet, by their bytes: a writer's own leaves
# come back from the log once (to the views) and need not be parsed and checked again, since
# equal bytes decode to the object they were encoded from.
_ENCODED: dict[bytes, dict[str, Any]] = {}
_ENCODED_MAX = 8192


def decode_leaf(data: bytes) -> dict[str, Any]:
    """Parse and validate leaf bytes; return the object (with ``v`` and ``kind``).

    The bytes must be exactly the canonical encoding. Fast path: once the fields have passed
    their shape checks, every string is printable ASCII without quotes or backslashes, every
    key is an ASCII field name and every number an integer, so sorted-key compact JSON (orjson)
    and RFC 8785 produce the same bytes; the slower RFC 8785 encoder is consulted only when the
    fast comparison fails (not :func:`ledger.canonical.canonical_json`: its ASCII and
    backslash scans cost 2.5 times this check per leaf, and validated fields need neither).
    A leaf this process encoded (by :func:`encode_leaf`) is returned without parsing it again.
    Raises LeafFormatError.
    """
    known = _ENCODED.pop(data, None) if type(data) is bytes else None
    if known is not None:
        return dict(known)
    if len(data) > MAX_LEAF_BYTES:
        raise LeafFormatError(f"leaf is larger than {MAX_LEAF_BYTES} bytes")
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, UnicodeDecodeError) as err:
        raise LeafFormatError("leaf is not valid JSON") from err
    if not isinstance(obj, dict):
        raise LeafFormatError("leaf is not a JSON object")
    if obj.get("v") != LEAF_VERSION or isinstance(obj.get("v"), bool):
        raise LeafFormatError(f"unsupported leaf version {obj.get('v')!r}")
    kind = obj.get("kind")
    fields = {k: v for k, v in obj.items() if k not in ("v", "kind")}
    _validate(kind, fields)
    if not isinstance(kind, str) or not _ASCII_KIND.fullmatch(kind):
        raise LeafFormatError(f"unknown leaf kind {kind!r}")
    if orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) != data and rfc8785.dumps(obj) != data:
        raise LeafFormatError(f"{kind} leaf is not in canonical form", kind=str(kind))
    return dict(obj)


_ASCII_KIND = re.compile(r"[a-z]{1,32}")


def is_trust_leaf(data: bytes) -> bool:
    """Whether leaf bytes are (by their canonical prefix) a ``key`` leaf of action ``trust``.

    Canonical JSON sorts keys, so such a leaf starts with ``{"action":"trust"`` and no other kind
    has an ``action`` of ``trust``. A cheap pre-filter: confirm with :func:`decode_leaf`.
    Raises nothing.
    """
    return data.startswith(b'{"action":"trust",')


@dataclass(frozen=True, slots=True)
class RecordMember:
    """A record version carried inside a container's ciphertext (a ``contains`` item)."""

    record: str
    type: str
    version: int


@dataclass(frozen=True, slots=True)
class RecordLeaf:
    """A ``record`` leaf, typed: what the pipeline writes, the views index and the audit
    checks (one definition instead of dicts built by hand in each).

    ``byte_range`` is where the ciphertext lies in block ``cid`` when packed with others;
    ``contains`` lists the record versions of a container (then ``record``/``version`` are the
    container's own).
    """

    record: str
    version: int
    cid: str
    sha256: str
    patient: str
    type: str
    source: str
    dictionary: str
    time: str
    byte_range: tuple[int, int] | None = None
    contains: tuple[RecordMember, ...] | None = None
    deleted: bool = False

    def fields(self) -> dict[str, Any]:
        """The leaf's fields as :func:`encode_leaf` takes them."""
        out: dict[str, Any] = {
            "record": self.record,
            "version": self.version,
            "cid": self.cid,
            "sha256": self.sha256,
            "patient": self.patient,
            "type": self.type,
            "source": self.source,
            "dictionary": self.dictionary,
            "time": self.time,
        }
        if self.byte_range is not None:
            out["range"] = list(self.byte_range)
        if self.contains is not None:
            out["contains"] = [
                {"record": m.record, "type": m.type, "version": m.version} for m in self.contains
            ]
        if self.deleted:
            out["deleted"] = True
        return out

    def encode(self) -> bytes:
        """The canonical leaf bytes. Raises LeafFormatError."""
        return encode_leaf("record", self.fields())

    @classmethod
    def from_leaf(cls, leaf: Mapping[str, Any]) -> RecordLeaf:
        """The typed form of a decoded (already validated) ``record`` leaf.

        Raises LeafFormatError when it is another kind."""
        if leaf.get("kind") != "record":
            raise LeafFormatError(f"not a record leaf: {leaf.get('kind')!r}", kind="record")
        span = leaf.get("range")
        contains = leaf.get("contains")
        return cls(
            record=leaf["record"],
            version=leaf["version"],
            cid=leaf["cid"],
            sha256=leaf["sha256"],
            patient=leaf["patient"],
            type=leaf["type"],
            source=leaf["source"],
            dictionary=leaf["dictionary"],
            time=leaf["time"],
            byte_range=(span[0], span[1]) if span is not None else None,
            contains=tuple(RecordMember(m["record"], m["type"], m["version"]) for m in contains)
            if contains is not None
            else None,
            deleted=leaf.get("deleted") is True,
        )


@dataclass(frozen=True, slots=True)
class ConsentLeaf:
    """A ``consent`` leaf, typed: what the consent service writes, its view indexes and the
    audit checks. ``patient`` is None for an institution's administrative default;
    ``byte_range`` is where the sealed Consent lies in block ``cid`` (None: the whole block)."""

    consent: str
    version: int
    action: str
    sha256: str
    cid: str
    source: str
    time: str
    patient: str | None = None
    byte_range: tuple[int, int] | None = None

    def fields(self) -> dict[str, Any]:
        """The leaf's fields as :func:`encode_leaf` takes them."""
        out: dict[str, Any] = {
            "consent": self.consent,
            "version": self.version,
            "action": self.action,
            "sha256": self.sha256,
            "cid": self.cid,
            "source": self.source,
            "time": self.time,
        }
        if self.patient is not None:
            out["patient"] = self.patient
        if self.byte_range is not None:
            out["range"] = list(self.byte_range)
        return out

    def encode(self) -> bytes:
        """The canonical leaf bytes. Raises LeafFormatError."""
        return encode_leaf("consent", self.fields())

    @classmethod
    def from_leaf(cls, leaf: Mapping[str, Any]) -> ConsentLeaf:
        """The typed form of a decoded (already validated) ``consent`` leaf.

        Raises LeafFormatError when it is another kind."""
        if leaf.get("kind") != "consent":
            raise LeafFormatError(f"not a consent leaf: {leaf.get('kind')!r}", kind="consent")
        span = leaf.get("range")
        return cls(
            consent=leaf["consent"],
            version=leaf["version"],
            action=leaf["action"],
            sha256=leaf["sha256"],
            cid=leaf["cid"],
            source=leaf["source"],
            time=leaf["time"],
            patient=leaf.get("patient"),
            byte_range=(span[0], span[1]) if span is not None else None,
        )
