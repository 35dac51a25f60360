"""FHIR R4 input handling: validation, Bundle preparation, patient linkage, response building.

Pure functions over JSON dicts (no I/O): the API layer calls them around the pipeline.
Untrusted input is validated with the ``fhir.resources`` R4B models (R4 4.0.1 for the resources
handled here). Raises :class:`gateway.errors.InvalidInputError` with a FHIRPath-like location.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.errors import InvalidInputError

RECEIPT_URL = "https://alliance.example/fhir/StructureDefinition/ledger-receipt"
SUPPORTED_METHODS = ("POST", "PUT")
PATIENT_REFERENCE_KEYS = ("subject", "patient", "beneficiary")


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_resource(resource: Any, *, where: str) -> str:
    """Validate one resource with its R4B model; return its type.

    Raises InvalidInputError naming the element (``where`` + path) and the problem.
    """
    if not isinstance(resource, dict):
        raise InvalidInputError("a resource must be a JSON object", location=where)
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise InvalidInputError("resourceType is missing", location=f"{where}.resourceType")
    try:
        model = get_fhir_model_class(rtype)
    except (ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"unknown resourceType {rtype!r}",
            location=f"{where}.resourceType",
            code="not-supported",
        ) from exc
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(
            f"{first['msg']}", location=_loc(f"{where}", tuple(first["loc"])), code="structure"
        ) from exc
    return rtype


@dataclass
class PreparedEntry:
    """One Bundle entry ready for the pipeline (or failed, for a batch)."""

    position: int
    resource: dict[str, Any] | None = None
    method: str = "POST"
    error: InvalidInputError | None = None
    patient: str | None = None
    # Patient links this entry establishes ((from, to, reason) pseudonyms; see
    # gateway.records.RecordService.link).
    links: list[tuple[str, str, Any]] = field(default_factory=list)


@dataclass
class PreparedBundle:
    """A validated transaction or batch Bundle with ids assigned and references resolved."""

    bundle_type: str
    entries: list[PreparedEntry] = field(default_factory=list)


def _iter_references(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for value in node.values():
            yield from _iter_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _iter_references(value)


def _entry_target(entry: dict[str, Any], pos: int) -> tuple[str, str | None]:
    request = entry.get("request")
    if request is None:
        return "POST", None
    if not isinstance(request, dict):
        raise InvalidInputError(
            "request must be an object", location=f"Bundle.entry[{pos}].request"
        )
    method = str(request.get("method", "")).upper()
    if method not in SUPPORTED_METHODS:
        raise InvalidInputError(
            f"request.method {method or '(none)'} is not supported here (POST or PUT)",
            location=f"Bundle.entry[{pos}].request.method",
            code="not-supported",
        )
    url = request.get("url")
    target_id = None
    if method == "PUT":
        parts = str(url or "").split("?")[0].strip("/").split("/")
        if len(parts) != 2 or not parts[1]:
            raise InvalidInputError(
                "PUT needs request.url of the form Type/id",
                location=f"Bundle.entry[{pos}].request.url",
            )
        target_id = parts[1]
    return method, target_id


def prepare_bundle(
    bundle: Any, *, max_entries: int, new_id: Callable[[], str] = lambda: uuid.uuid4().hex
) -> PreparedBundle:
    """Validate a transaction/batch Bundle, assign ids and rewrite intra-Bundle references.

    A transaction fails as a whole on the first invalid entry (InvalidInputError); in a batch
    an invalid entry is kept with its error and the rest go on.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidInputError("expected a Bundle", location="Bundle.resourceType")
    btype = bundle.get("type")
    if btype not in ("transaction", "batch"):
        raise InvalidInputError(
            f"Bundle.type must be transaction or batch, not {btype!r}",
            location="Bundle.type",
            code="not-supported",
        )
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise InvalidInputError("entry must be an array", location="Bundle.entry")
    if len(raw_entries) > max_entries:
        raise InvalidInputError(
            f"Bundle has {len(raw_entries)} entries; this gateway accepts at most {max_entries}"
            " per request",
            location="Bundle.entry",
            code="too-costly",
        )
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    validate_resource(shell, where="Bundle")
    prepared = PreparedBundle(bundle_type=btype)
    full_urls: dict[str, str] = {}
    for pos, entry in enumerate(raw_entries):
        pe = PreparedEntry(position=pos)
        prepared.entries.append(pe)
        try:
            if not isinstance(entry, dict):
                raise InvalidInputError("entry must be an object", location=f"Bundle.entry[{pos}]")
            method, target_id = _entry_target(entry, pos)
            resource = entry.get("resource")
            rtype = validate_resource(resource, where=f"Bundle.entry[{pos}].resource")
            assert isinstance(resource, dict)
            if target_id is not None:
                url_type = str(entry["request"]["url"]).strip("/").split("/")[0]
                if url_type != rtype:
                    raise InvalidInputError(
                        f"request.url names {url_type} but the resource is {rtype}",
                        location=f"Bundle.entry[{pos}].request.url",
                    )
                if resource.get("id") not in (None, target_id):
                    raise InvalidInputError(
                        "resource.id differs from the id in request.url",
                        location=f"Bundle.entry[{pos}].resource.id",
                    )
                rid = target_id
            else:
                rid = new_id()
            resource = dict(resource)
            resource["id"] = rid
            pe.resource, pe.method = resource, method
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url:
                full_urls[full_url] = f"{rtype}/{rid}"
            full_urls.setdefault(f"{rtype}/{rid}", f"{rtype}/{rid}")
        except InvalidInputError as exc:
            if btype == "transaction":
                raise
            pe.error = exc
    for pe in prepared.entries:
        if pe.resource is not None:
            for ref in _iter_references(pe.resource):
                target = full_urls.get(ref["reference"])
                if target is not None:
                    ref["reference"] = target
    return prepared


def patient_reference(resource: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The element that links a resource to its patient: (element name, Reference) or None."""
    if resource.get("resourceType") == "Appointment":
        for i, part in enumerate(resource.get("participant") or []):
            actor = part.get("actor") if isinstance(part, dict) else None
            if isinstance(actor, dict) and str(actor.get("reference", "")).startswith("Patient/"):
                return f"participant[{i}].actor", actor
        return None
    for k in PATIENT_REFERENCE_KEYS:
        ref = resource.get(k)
        if isinstance(ref, dict) and (
            str(ref.get("reference", "")).startswith("Patient/") or "identifier" in ref
        ):
            return k, ref
    return None


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def receipt_extension(
    *,
    leaf_index: int,
    tree_size: int,
    root: bytes,
    proof: list[bytes],
    checkpoint: bytes,
    cid: str,
    byte_range: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The ledger receipt of one stored record, as a FHIR extension (see docs/api.md)."""
    parts: list[dict[str, Any]] = [
        {"url": "leafIndex", "valueUnsignedInt": leaf_index},
        {"url": "treeSize", "valuePositiveInt": tree_size},
        {"url": "rootHash", "valueBase64Binary": b64(root)},
        {"url": "inclusionProof", "valueBase64Binary": b64(b"".join(proof))},
        {"url": "checkpoint", "valueBase64Binary": b64(checkpoint)},
        {"url": "cid", "valueString": cid},
    ]
    if byte_range is not None:
        parts += [
            {"url": "byteOffset", "valueUnsignedInt": byte_range[0]},
            {"url": "byteLength", "valuePositiveInt": byte_range[1]},
        ]
    return {"url": RECEIPT_URL, "extension": parts}


def operation_outcome(
    severity: str, code: str, diagnostics: str, *, location: str | None = None
) -> dict[str, Any]:
    """A single-issue OperationOutcome."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if location:
        issue["expression"] = [location]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
