"""Apply the unified dictionary to a FHIR resource of any type, and read its security labels.
Pure.

:func:`apply_dictionary` visits every CodeableConcept of a resource (Observation.code and
valueCodeableConcept, component codes, Condition.code, DiagnosticReport.code,
ServiceRequest.code, Procedure.code, ... wherever they are, except under ``meta`` and
``text``), every Quantity without a UCUM code, and the ``code`` elements of
:data:`CODE_ELEMENTS` (gender). For each coding it adds the dictionary's unified codings
beside the original one, which is never removed or changed (:meth:`Terminology.mapped`: only
equivalent/equal silently, wider/narrower/relatedto/subsumes/specializes with their equivalence
in an extension, never inexact/unmatched/disjoint); a ``code`` element takes the mapped value
and keeps the original in an :data:`ORIGINAL_CODE_URL` extension. Mappings are looked up for
the source institution first. The input is not modified: changed parts are copied, the rest is
shared with the returned resource.

A CodeableConcept is *unmapped* when it carries a local code (a system the dictionary maps
from, or one it does not know as standard), none of its codes got a unified coding and none is
already in a standard system; the local codes are returned with the element's path so that the
caller applies the sender's policy (reject naming code and element, or accept, tag and queue
for curation).

Raises nothing: malformed parts (a coding without system or code, a non-string unit) are left
as they are for validation to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mappings.terminology import (
    ORIGINAL_CODE_URL,
    UCUM,
    Terminology,
)

__all__ = [
    "CODE_ELEMENTS",
    "UNMAPPED_TAG",
    "Applied",
    "Unmapped",
    "apply_dictionary",
    "labels",
]

Json = dict[str, Any]

#: ``code`` elements mapped by the dictionary: (resource type, element) -> (system the raw
#: value is read in when it is not already a valid value, system of the valid values, values).
CODE_ELEMENTS: dict[tuple[str, str], tuple[str, str, frozenset[str]]] = {
    (rtype, "gender"): (
        "http://terminology.hl7.org/CodeSystem/v2-0001",
        "http://hl7.org/fhir/administrative-gender",
        frozenset({"male", "female", "other", "unknown"}),
    )
    for rtype in ("Patient", "Practitioner", "RelatedPerson", "Person")
}
#: meta.tag of a record stored with codes the dictionary could not map.
UNMAPPED_TAG: Json = {
    "system": "https://alliance.example/fhir/CodeSystem/record-tag",
    "code": "dictionary-unmapped",
    "display": "has codes the unified dictionary did not map",
}
_SKIP = frozenset({"meta", "text", "id", "resourceType"})


@dataclass(frozen=True, slots=True)
class Unmapped:
    """A local code left without a unified coding, and where it was."""

    element: str
    system: str
    code: str


@dataclass(frozen=True, slots=True)
class Applied:
    """The mapped resource, the codes left unmapped, the dictionary version used, and
    whether anything was added or mapped (else ``resource`` is the input itself)."""

    resource: Json
    unmapped: tuple[Unmapped, ...]
    version: str
    changed: bool = False


def apply_dictionary(resource: Json, term: Terminology, *, source: str = "") -> Applied:
    """Map every coded element of ``resource`` with ``term`` for input of institution
    ``source``; see the module docstring. Pure; the input is left unchanged."""
    walker = _Walker(term, source)
    rtype = str(resource.get("resourceType", "Resource"))
    out = walker.walk(resource, rtype)
    if isinstance(out, dict):
        for (etype, element), spec in CODE_ELEMENTS.items():
            if etype == rtype and element in out:
                out = walker.code_element(out, rtype, element, spec)
    return Applied(out, tuple(walker.unmapped), term.version, out is not resource)


def labels(resource: Json, term: Terminology) -> list[Json]:
    """The security labels (v3 ActCode codings, sorted, distinct) that the codes of
    ``resource`` imply through the dictionary's sensitive-code value sets. Pure."""
    found: dict[tuple[str, str], Json] = {}
    for system, code in _codings(resource):
        for label in term.labels_of(system, code):
            found.setdefault((str(label.get("system")), str(label.get("code"))), label)
    return [found[k] for k in sorted(found)]


def _codings(node: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            system, code = item.get("system"), item.get("code")
            if isinstance(system, str) and isinstance(code, str):
                out.append((system, code))
            for key, value in item.items():
                if key != "meta" and isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    return out


class _Walker:
    def __init__(self, term: Terminology, source: str) -> None:
        self.term = term
        self.source = source
        self.unmapped: list[Unmapped] = []

    def walk(self, node: Any, path: str) -> Any:
        if isinstance(node, list):
            new_list: list[Any] | None = None
            for i, item in enumerate(node):
                if isinstance(item, dict | list):
                    new = self.walk(item, f"{path}[{i}]")
                    if new is not item:
                        if new_list is None:
                            new_list = list(node)
                        new_list[i] = new
            return node if new_list is None else new_list
        if not isinstance(node, dict):
            return node
        out: Json | None = None
        for key, value in node.items():
            if isinstance(value, dict | list) and key not in _SKIP:
                new = self.walk(value, f"{path}.{key}")
                if new is not value:
                    if out is None:
                        out = dict(node)
                    out[key] = new
        current = node if out is None else out
        codings = current.get("coding")
        if isinstance(codings, list):
            return self.concept(current, path, codings)
        if "value" in current and ("unit" in current or "code" in current):
            return self.quantity(current, path)
        return current

    def concept(self, cc: Json, path: str, codings: list[Any]) -> Json:
        term = self.term
        added: list[Json] = []
        local: list[tuple[str, str]] = []
        standard = False
        present = {(c.get("system"), c.get("code")) for c in codings if isinstance(c, dict)}
        for c in codings:
            if not isinstance(c, dict):
                continue
            system, code = c.get("system"), c.get("code")
            if not isinstance(system, str) or not isinstance(code, str):
                continue
            if term.is_standard(system):
                standard = True
                continue
            mapped = term.mapped(system, code, self.source)
            if not mapped:
                local.append((system, code))
            for m in mapped:
                key = (m["system"], m["code"])
                if key not in present:
                    present.add(key)
                    added.append(m)
        if local and not added and not standard:
            where = f"{path}.coding"
            self.unmapped.extend(Unmapped(where, system, code) for system, code in local)
        if not added:
            return cc
        out = dict(cc)
        out["coding"] = [*codings, *(_copy(m) for m in added)]
        return out

    def quantity(self, q: Json, path: str) -> Json:
        if q.get("system") == UCUM:
            return q
        spelling = q.get("code") if isinstance(q.get("code"), str) else q.get("unit")
        if not isinstance(spelling, str) or not spelling:
            return q
        ucum = self.term.unit(spelling)
        if ucum is None:
            if q.get("system") is None:
                self.unmapped.append(
                    Unmapped(f"{path}.unit", "urn:alliance:codesystem:local-unit", spelling)
                )
            return q
        out = dict(q)
        out.setdefault("unit", spelling)
        out["system"] = UCUM
        out["code"] = ucum
        return out

    def code_element(
        self, res: Json, rtype: str, element: str, spec: tuple[str, str, frozenset[str]]
    ) -> Json:
        value = res.get(element)
        source_system, target_system, valid = spec
        if not isinstance(value, str) or value in valid:
            return res
        for m in self.term.mapped(source_system, value, self.source):
            if m["system"] == target_system and m["code"] in valid:
                out = dict(res)
                out[element] = m["code"]
                original: Json = {
                    "url": ORIGINAL_CODE_URL,
                    "valueCoding": {"system": source_system, "code": value},
                }
                exts = [original, *(_copy(e) for e in m.get("extension", []))]
                under = dict(out.get("_" + element) or {})
                under["extension"] = [*under.get("extension", []), *exts]
                out["_" + element] = under
                return out
        self.unmapped.append(Unmapped(f"{rtype}.{element}", source_system, value))
        return res


def _copy(coding: Json) -> Json:
    out = dict(coding)
    if "extension" in out:
        out["extension"] = [dict(e) for e in out["extension"]]
    return out
