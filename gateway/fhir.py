"""FHIR R4 input handling: validation, Bundle preparation, patient linkage, response building.

Pure functions over JSON dicts (no I/O): the API layer calls them around the pipeline.
Untrusted input is validated with the ``fhir.resources`` R4B models, then checked against the
R4 (4.0.1) element table, so that a type or element R4 does not have is rejected. Raises
:class:`gateway.errors.InvalidInputError` with every problem and its FHIRPath-like location.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.errors import InputIssue, InvalidInputError

RECEIPT_URL = "https://alliance.example/fhir/StructureDefinition/ledger-receipt"
SUPPORTED_METHODS = ("POST", "PUT")
PATIENT_REFERENCE_KEYS = ("subject", "patient", "beneficiary")


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@dataclass(frozen=True)
class _R4Elements:
    """Every element FHIR R4 (4.0.1) defines (gateway/fhir_r4_elements.json, generated from
    the R4 StructureDefinitions by scripts/gen_fhir_r4_elements.py)."""

    resources: frozenset[str]
    #: context (type name or backbone path) -> JSON key -> child context ("" primitive,
    #: "*" a resource)
    contexts: dict[str, dict[str, str]]
    #: the same with each child context replaced by its table (None: primitive; _RESOURCE)
    tables: dict[str, dict[str, Any]]


_RESOURCE: dict[str, Any] = {}  # marker: the child is a resource (contained, entry.resource)
_MISSING: dict[str, Any] = {}  # marker: not an element of this context


def _load_r4() -> _R4Elements:
    data = json.loads((Path(__file__).parent / "fhir_r4_elements.json").read_text("utf-8"))
    contexts: dict[str, dict[str, str]] = data["contexts"]
    tables: dict[str, dict[str, Any]] = {name: {} for name in contexts}
    for name, keys in contexts.items():
        table = tables[name]
        for key, child in keys.items():
            table[key] = None if not child else _RESOURCE if child == "*" else tables[child]
            if not child:
                table["_" + key] = tables["Element"]  # a primitive's id and extensions
    return _R4Elements(frozenset(data["resources"]), contexts, tables)


_R4 = _load_r4()

#: The R4B model of a resource type. Only successful lookups are cached (a lookup that raises
#: is not), so the cache holds at most one entry per R4B type.
_model_class = functools.lru_cache(maxsize=None)(get_fhir_model_class)
#: At most this many issues in one OperationOutcome (a last one says how many more there were).
MAX_ISSUES = 100


def _r4_clean(node: dict[str, Any], table: dict[str, Any]) -> bool:
    """Fast check without locations: True when every key is in R4 (valid input takes only
    this path; :func:`_r4_resource` then finds where the problems are)."""
    for key, value in node.items():
        child = table.get(key, _MISSING)
        if child is None:
            continue
        if child is _MISSING:
            if key == "resourceType":  # (one inside a datatype: the models reject it)
                continue
            return False
        if type(value) is list:
            for item in value:
                if type(item) is dict and not _r4_clean_child(item, child):
                    return False
        elif type(value) is dict and not _r4_clean_child(value, child):
            return False
    return True


def _r4_clean_child(item: dict[str, Any], child: dict[str, Any]) -> bool:
    if child is _RESOURCE:
        rtype = item.get("resourceType")
        if type(rtype) is not str or rtype not in _R4.resources:
            return False
        child = _R4.tables[rtype]
    return _r4_clean(item, child)


def _r4_resource(node: dict[str, Any], path: str, out: list[InputIssue]) -> None:
    rtype = node.get("resourceType")
    if not isinstance(rtype, str):
        out.append(
            InputIssue(
                "resourceType is missing or not a string", f"{path}.resourceType", "structure"
            )
        )
        return
    if rtype not in _R4.resources:
        out.append(
            InputIssue(
                f"resource type {rtype[:64]!r} is not in FHIR R4 (4.0.1)",
                f"{path}.resourceType",
                "not-supported",
            )
        )
        return
    _r4_walk(node, rtype, path, out, True)


def _r4_walk(
    node: dict[str, Any], context: str, path: str, out: list[InputIssue], root: bool
) -> None:
    table = _R4.contexts[context]
    for key, value in node.items():
        child = table.get(key)
        if child is None:
            if key[:1] == "_" and table.get(key[1:]) == "":
                child = "Element"  # a primitive's id and extensions
            elif root and key == "resourceType":
                continue
            else:
                out.append(
                    InputIssue(
                        f"element {str(key)[:64]!r} is not in FHIR R4 (4.0.1) {context}",
                        f"{path}.{key}",
                        "structure",
                    )
                )
                continue
        elif not child:
            continue
        items = enumerate(value) if isinstance(value, list) else ((None, value),)
        for i, item in items:
            if not isinstance(item, dict):
                continue
            where = f"{path}.{key}" if i is None else f"{path}.{key}[{i}]"
            if child == "*":
                _r4_resource(item, where, out)
            else:
                _r4_walk(item, child, where, out, False)


def r4_issues(resource: Any, *, where: str) -> list[InputIssue]:
    """Every resource type and element in ``resource`` (contained resources and Bundle entries
    included) that FHIR R4 (4.0.1) does not have: types R4B added (SubscriptionTopic,
    Citation ...) and elements it added to R4 types. Raises nothing."""
    out: list[InputIssue] = []
    if isinstance(resource, dict):
        rtype = resource.get("resourceType")
        if type(rtype) is str and rtype in _R4.resources and _r4_clean(resource, _R4.tables[rtype]):
            return out
        _r4_resource(resource, where, out)
    return out


def _capped(issues: list[InputIssue], where: str) -> list[InputIssue]:
    if len(issues) <= MAX_ISSUES:
        return issues
    more = len(issues) - MAX_ISSUES + 1
    return [*issues[: MAX_ISSUES - 1], InputIssue(f"{more} more problems not listed", where)]


def _pydantic_issues(exc: ValidationError, where: str) -> list[InputIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
        issues.append(InputIssue(str(err["msg"]), _loc(where, loc), "structure"))
    return issues


def validate_resource(resource: Any, *, where: str) -> str:
    """Validate one resource as FHIR R4; return its type.

    The ``fhir.resources`` R4B models check structure and datatypes; a walk over the R4
    element table then rejects every type and element that R4 does not have. Raises
    InvalidInputError carrying every problem found, each with its location (``where`` +
    FHIRPath-like path): a resource type or element that is not in R4 makes it code
    ``processing`` (HTTP 422), other problems ``structure`` (400). Never raises anything else.
    """
    if not isinstance(resource, dict):
        raise InvalidInputError("a resource must be a JSON object", location=where)
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise InvalidInputError("resourceType is missing", location=f"{where}.resourceType")
    try:
        r4 = r4_issues(resource, where=where)
    except RecursionError:
        raise InvalidInputError(
            "the resource is nested too deeply", location=where, code="structure"
        ) from None
    if r4 and r4[0].location == f"{where}.resourceType":
        # Not an R4 resource type at all: its other problems do not matter.
        raise InvalidInputError.from_issues(r4[:1], code="processing")
    issues: list[InputIssue] = []
    try:
        model = _model_class(rtype)
    except (ValueError, KeyError):
        model = None
        if not r4:  # an R4 type the R4B models do not have (R4B removed a few)
            r4 = [
                InputIssue(
                    f"resource type {rtype[:64]!r} is not supported here",
                    f"{where}.resourceType",
                    "not-supported",
                )
            ]
    if model is not None:
        try:
            model.model_validate(resource)
        except ValidationError as exc:
            issues = _pydantic_issues(exc, where)
        except Exception as exc:  # the models raise KeyError etc. on some inputs
            if not r4:
                issues = [InputIssue(f"cannot be read as FHIR: {type(exc).__name__}", where)]
    if r4:
        # An element neither R4 nor R4B has: say it is not in R4, once.
        seen = {i.location for i in r4}
        issues = r4 + [i for i in issues if i.location not in seen]
        raise InvalidInputError.from_issues(_capped(issues, where), code="processing")
    if issues:
        raise InvalidInputError.from_issues(_capped(issues, where), code="structure")
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
    #: ``request.ifNoneExist`` of a POST entry (a conditional create), as sent.
    if_none_exist: str | None = None
    #: The resource type of the entry (kept when ``resource`` is dropped).
    resource_type: str = ""
    #: The id of the stored resource a conditional create matched (nothing is written).
    matched: str | None = None


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
            pe.resource, pe.method, pe.resource_type = resource, method, rtype
            req = entry.get("request")
            cond = req.get("ifNoneExist") if method == "POST" and isinstance(req, dict) else None
            if cond is not None:
                if not isinstance(cond, str) or not cond.strip():
                    raise InvalidInputError(
                        "request.ifNoneExist must be search parameters",
                        location=f"Bundle.entry[{pos}].request.ifNoneExist",
                    )
                pe.if_none_exist = cond
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


def rewrite_references(resources: list[dict[str, Any]], mapping: dict[str, str]) -> None:
    """Replace every ``reference`` found in ``mapping`` (``Type/id`` -> ``Type/id``) in the
    resources, in place: entries of a Bundle pointing at an entry whose conditional create
    matched a stored resource then point at that one. Raises nothing."""
    if not mapping:
        return
    for resource in resources:
        for ref in _iter_references(resource):
            target = mapping.get(ref["reference"])
            if target is not None:
                ref["reference"] = target


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
    cid: str | None,
    byte_range: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The ledger receipt of one stored record (or, with ``cid`` None, of a leaf that names no
    ciphertext, such as an erasure's ``key`` leaf), as a FHIR extension (see docs/api.md)."""
    parts: list[dict[str, Any]] = [
        {"url": "leafIndex", "valueUnsignedInt": leaf_index},
        {"url": "treeSize", "valuePositiveInt": tree_size},
        {"url": "rootHash", "valueBase64Binary": b64(root)},
        {"url": "inclusionProof", "valueBase64Binary": b64(b"".join(proof))},
        {"url": "checkpoint", "valueBase64Binary": b64(checkpoint)},
    ]
    if cid is not None:
        parts.append({"url": "cid", "valueString": cid})
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


def input_outcome(exc: InvalidInputError) -> dict[str, Any]:
    """The OperationOutcome of invalid input: one issue per problem, each with its location."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            operation_outcome(
                "error",
                "not-supported" if i.code == "not-supported-media-type" else i.code,
                i.message,
                location=i.location,
            )["issue"][0]
            for i in exc.issues
        ],
    }


#: Identifier systems of FHIR-input Provenance agents: the authenticated client (a Device) and
#: an institution of the alliance (an Organization), by the names the registry and the ledger
#: use.
CLIENT_ID_SYSTEM = "https://alliance.example/fhir/NamingSystem/client-id"
INSTITUTION_SYSTEM = "https://alliance.example/fhir/NamingSystem/institution"
#: Identifier system of a ledger leaf (its 0-based index): the receipt a sender was given.
LEDGER_LEAF_SYSTEM = "https://alliance.example/fhir/NamingSystem/ledger-leaf"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"


@dataclass(frozen=True, slots=True)
class ProvenanceTarget:
    """One record version a FHIR request stored: type, id, version, whether it was created,
    and the ledger leaf that anchors it (the sender's receipt)."""

    resource_type: str
    resource_id: str
    version: int
    created: bool
    leaf_index: int


def request_provenance(
    *,
    provenance_id: str,
    targets: list[ProvenanceTarget],
    recorded: str,
    client_id: str | None,
    client_institution: str,
    custodian: str,
    interaction: str,
) -> dict[str, Any]:
    """The Provenance of one FHIR REST write (a single resource or a whole Bundle): the
    versions it stored (``target``, versioned references), when (``recorded``), who (the
    authenticated client as a ``Device`` identified by its client id, on behalf of its
    institution; this gateway's institution as custodian) and, as ``entity``, the ledger
    leaves that anchor the versions: the receipts the sender got, so a record can be traced
    to the request that brought it. Holds no patient data. Raises nothing."""
    client = {
        "type": "Device",
        "identifier": {"system": CLIENT_ID_SYSTEM, "value": client_id or "local"},
    }
    author: dict[str, Any] = {
        "type": {"coding": [{"system": _PARTICIPANT, "code": "author"}]},
        "who": client,
        "onBehalfOf": {
            "type": "Organization",
            "identifier": {"system": INSTITUTION_SYSTEM, "value": client_institution},
        },
    }
    keeper = {
        "type": {"coding": [{"system": _PARTICIPANT, "code": "custodian"}]},
        "who": {
            "type": "Organization",
            "identifier": {"system": INSTITUTION_SYSTEM, "value": custodian},
        },
    }
    operation = "CREATE" if all(t.created for t in targets) else "UPDATE"
    leaves = sorted({t.leaf_index for t in targets})
    return {
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [
            {"reference": f"{t.resource_type}/{t.resource_id}/_history/{t.version}"}
            for t in targets
        ],
        "recorded": recorded,
        "activity": {
            "coding": [{"system": _DATA_OPERATION, "code": operation}],
            "text": f"FHIR {interaction}",
        },
        "agent": [author, keeper],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": LEDGER_LEAF_SYSTEM, "value": str(leaf)},
                    "display": "ledger receipt of the request",
                },
            }
            for leaf in leaves
        ],
    }
