"""FHIR R4 terminology operations over the unified dictionary, as pure functions that take the
operation's parameters and return a ``Parameters`` resource (or a searchset ``Bundle``).

- :func:`translate`: ``ConceptMap/$translate`` (``system``, ``code``, ``coding``,
  ``codeableConcept``, ``url``, ``target``, ``targetsystem``, ``reverse``); ``result`` is true
  when at least one match has an equivalence other than ``unmatched``/``disjoint``; every match
  carries ``equivalence``, ``concept`` and ``source`` (the ConceptMap's url).
- :func:`lookup`: ``CodeSystem/$lookup`` (``system``, ``code`` or ``coding``).
- :func:`validate_code`: ``ValueSet/$validate-code`` for the dictionary's own value sets
  (``url``, ``system``, ``code``, ``display`` or ``coding``).
- :func:`search`: ``GET /fhir/ConceptMap`` and ``GET /fhir/CodeSystem`` by ``url``/``version``.

Raises :class:`OperationError` (a :class:`mappings.errors.MappingError`) with an
``OperationOutcome`` issue code and HTTP status for missing or contradictory parameters and for
an unknown code system, code or value set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mappings.errors import MappingError
from mappings.terminology import NOT_A_MATCH, Terminology

__all__ = ["OperationError", "lookup", "search", "translate", "validate_code"]

Json = dict[str, Any]
#: Parameters of an operation: name -> values (query strings repeat; POST values are typed).
Params = Mapping[str, list[Any]]


class OperationError(MappingError):
    """A terminology operation cannot be answered: ``issue`` (OperationOutcome code) and
    ``status`` (HTTP) say how, the message says which parameter or code."""

    def __init__(self, message: str, *, issue: str = "invalid", status: int = 400) -> None:
        super().__init__(message)
        self.issue = issue
        self.status = status


def params_from_resource(body: Any) -> dict[str, list[Any]]:
    """The parameters of a POSTed ``Parameters`` resource (``value[x]`` or ``resource`` of
    each). Raises OperationError when the body is not a Parameters resource."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise OperationError("the body must be a FHIR Parameters resource")
    out: dict[str, list[Any]] = {}
    for i, p in enumerate(body.get("parameter", [])):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise OperationError(f"Parameters.parameter[{i}] has no name")
        values = [v for k, v in p.items() if k.startswith("value") or k == "resource"]
        if len(values) != 1:
            raise OperationError(f"Parameters.parameter[{i}] ({p['name']}) must have one value")
        out.setdefault(p["name"], []).append(values[0])
    return out


def _one(params: Params, name: str) -> Any:
    values = params.get(name) or []
    if len(values) > 1:
        raise OperationError(f"parameter {name} is given {len(values)} times; at most once")
    return values[0] if values else None


def _str(params: Params, name: str) -> str | None:
    value = _one(params, name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise OperationError(f"parameter {name} must be a non-empty string")
    return value


def _bool(params: Params, name: str) -> bool:
    value = _one(params, name)
    if value is None or isinstance(value, bool):
        return bool(value)
    if value in ("true", "false"):
        return bool(value == "true")
    raise OperationError(f"parameter {name} must be true or false")


def _coding_in(params: Params) -> list[tuple[str, str]]:
    """(system, code) pairs from system+code, coding or codeableConcept (exactly one form)."""
    system, code = _str(params, "system"), _str(params, "code")
    coding, concept = _one(params, "coding"), _one(params, "codeableConcept")
    forms = sum(x is not None for x in (code, coding, concept))
    if forms != 1:
        raise OperationError("give exactly one of code (with system), coding or codeableConcept")
    if code is not None:
        if system is None:
            raise OperationError("parameter system is required with code")
        return [(system, code)]
    codings = [coding] if coding is not None else None
    if concept is not None:
        if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
            raise OperationError("parameter codeableConcept must be a CodeableConcept")
        codings = concept["coding"]
    out = []
    for c in codings or []:
        if not isinstance(c, dict) or not c.get("system") or not c.get("code"):
            raise OperationError("a coding must have a system and a code")
        out.append((str(c["system"]), str(c["code"])))
    return out


def translate(term: Terminology, params: Params, *, institution: str = "") -> Json:
    """``$translate``: see the module docstring. Raises OperationError for bad parameters."""
    reverse = _bool(params, "reverse")
    url = _str(params, "url") or _str(params, "conceptMap")
    target = _str(params, "target")
    target_system = _str(params, "targetsystem")
    pairs = _coding_in(params)
    matches = []
    for system, code in pairs:
        for m in term.matches(system, code, reverse=reverse, institution=institution):
            if url and m.concept_map != url:
                continue
            if target_system and m.target_system != target_system:
                continue
            if target and target not in (m.target_system, _target_uri(term, m.concept_map)):
                continue
            matches.append(m)
    result = any(m.equivalence not in NOT_A_MATCH for m in matches)
    asked = ", ".join(f"{s}|{c}" for s, c in pairs)
    if not matches:
        message = f"no mapping of {asked} in dictionary version {term.version}"
    elif not result:
        message = f"{asked} is mapped only as unmatched or disjoint"
    else:
        n = len(matches)
        message = f"{n} match{'es' if n > 1 else ''} in dictionary version {term.version}"
    out: list[Json] = [
        {"name": "result", "valueBoolean": result},
        {"name": "message", "valueString": message},
    ]
    for m in matches:
        parts: list[Json] = [{"name": "equivalence", "valueCode": m.equivalence}]
        if m.target_code is not None:
            concept: Json = {"system": m.target_system, "code": m.target_code}
            if m.target_display:
                concept["display"] = m.target_display
            parts.append({"name": "concept", "valueCoding": concept})
        parts.append({"name": "source", "valueUri": m.concept_map})
        out.append({"name": "match", "part": parts})
    return {"resourceType": "Parameters", "parameter": out}


def _target_uri(term: Terminology, concept_map: str) -> str | None:
    for r in term.resources:
        if r.get("resourceType") == "ConceptMap" and r.get("url") == concept_map:
            value = r.get("targetUri")
            return str(value) if value else None
    return None


def lookup(term: Terminology, params: Params) -> Json:
    """``$lookup``. Raises OperationError (404 ``not-found``) for a code the dictionary does
    not know, (400) for bad parameters."""
    pairs = _coding_in(params)
    if len(pairs) != 1:
        raise OperationError("$lookup takes one coding")
    system, code = pairs[0]
    found = term.lookup(system, code)
    if found is None:
        raise OperationError(
            f"code {code!r} of {system} is not in dictionary version {term.version}",
            issue="not-found",
            status=404,
        )
    out: list[Json] = [{"name": "name", "valueString": found["name"]}]
    if found["version"]:
        out.append({"name": "version", "valueString": found["version"]})
    out.append({"name": "display", "valueString": found["display"]})
    for d in found["designation"]:
        parts: list[Json] = []
        if d.get("language"):
            parts.append({"name": "language", "valueCode": d["language"]})
        parts.append({"name": "value", "valueString": d["value"]})
        out.append({"name": "designation", "part": parts})
    return {"resourceType": "Parameters", "parameter": out}


def validate_code(term: Terminology, params: Params) -> Json:
    """``$validate-code`` against one of the dictionary's value sets. Raises OperationError
    (404) for an unknown value set, (400) for bad parameters."""
    url = _str(params, "url")
    if url is None:
        raise OperationError(
            "parameter url (one of the dictionary's value sets) is required; known: "
            + ", ".join(term.value_set_urls())
        )
    if term.in_value_set(url, "", "") is None:
        raise OperationError(
            f"value set {url} is not in the dictionary", issue="not-found", status=404
        )
    pairs = _coding_in(params)
    display = _str(params, "display")
    found = [(s, c) for s, c in pairs if term.in_value_set(url, s, c)]
    out: list[Json] = [{"name": "result", "valueBoolean": bool(found)}]
    asked = ", ".join(f"{s}|{c}" for s, c in pairs)
    if found:
        system, code = found[0]
        known = term.display(system, code)
        if known:
            out.append({"name": "display", "valueString": known})
        if display and known and display != known:
            out.append(
                {
                    "name": "message",
                    "valueString": f"{asked} is in {url}; display {display!r} is not {known!r}",
                }
            )
    else:
        out.append({"name": "message", "valueString": f"{asked} is not in value set {url}"})
    return {"resourceType": "Parameters", "parameter": out}


def search(term: Terminology, resource_type: str, params: Params) -> Json:
    """A searchset Bundle of the dictionary's ``resource_type`` resources matching ``url``
    and ``version`` (each optional). Raises OperationError for an unsupported parameter."""
    allowed = {"url", "version", "_count", "_format"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise OperationError(
            f"search parameter {unknown[0]} is not supported (use url, version)",
            issue="not-supported",
        )
    url, version = _str(params, "url"), _str(params, "version")
    if url and "|" in url and version is None:
        url, version = url.split("|", 1)
    hits = [
        r
        for r in term.resources
        if r.get("resourceType") == resource_type
        and (url is None or r.get("url") == url)
        and (version is None or r.get("version") == version)
    ]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(hits),
        "entry": [
            {
                "fullUrl": f"{resource_type}/{r.get('id')}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in hits
        ],
    }
