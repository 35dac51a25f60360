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
    LOCAL_UNITS,
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
_CODE_ELEMENTS_OF: dict[str, list[tuple[str, tuple[str, str, frozenset[str]]]]] = {}
for (_rtype, _element), _spec in CODE_ELEMENTS.items():
    _CODE_ELEMENTS_OF.setdefault(_rtype, []).append((_element, _spec))

#: meta.tag of a record stored with codes the dictionary could not map.
UNMAPPED_TAG: Json = {
    "system": "https://alliance.example/fhir/CodeSystem/record-tag",
    "code": "dictionary-unmapped",
    "display": "has codes the unified dictionary did not map",
}
_SKIP = frozenset({"meta", "text", "contained"})
#: Memos by dictionary (a new version gets a new one; all are dropped beyond _MEMOS_KEPT).
_MEMOS: dict[int, _Memo] = {}
_MEMOS_KEPT = 8


@dataclass(frozen=True, slots=True)
class Unmapped:
    """A local code left without a unified coding, and where it was."""

    element: str
    system: str
    code: str


@dataclass(slots=True)
class Applied:
    """The mapped resource, the codes left unmapped, the dictionary version used, and
    whether anything was added or mapped (else ``resource`` is the input itself). Read-only
    by convention (not ``frozen``: a frozen dataclass costs microseconds to build, a large
    part of a small resource's mapping)."""

    resource: Json
    unmapped: tuple[Unmapped, ...]
    version: str
    changed: bool = False


def apply_dictionary(resource: Json, term: Terminology, *, source: str = "") -> Applied:
    """Map every coded element of ``resource`` with ``term`` for input of institution
    ``source``; see the module docstring. Pure; the input is left unchanged."""
    walker = _Walker(_memo_for(term), source)
    rtype = str(resource.get("resourceType", "Resource"))
    out = walker.walk(resource, rtype)
    for element, spec in _CODE_ELEMENTS_OF.get(rtype, ()):
        if element in out:
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


#: A concept's result: (codings to add, local codes left unmapped, whether any coding to add
#: has an extension to copy).
_ConceptResult = tuple[tuple[Json, ...], tuple[tuple[str, str], ...], bool]
_MEMO_SIZE = 65536


class _Memo:
    """What one dictionary version maps, memoised (each at most _MEMO_SIZE entries): concepts
    by source institution and their codings' (system, code) pairs, unit spellings to UCUM
    codes (None: unknown)."""

    __slots__ = ("concepts", "term", "units")

    def __init__(self, term: Terminology) -> None:
        self.term = term
        self.concepts: dict[tuple[Any, ...], _ConceptResult] = {}
        self.units: dict[str, str | None] = {}


def _memo_for(term: Terminology) -> _Memo:
    memo = _MEMOS.get(id(term))
    if memo is None or memo.term is not term:
        if len(_MEMOS) >= _MEMOS_KEPT:
            _MEMOS.clear()
        memo = _MEMOS[id(term)] = _Memo(term)
    return memo


def _path(parent: str, key: str | int) -> str:
    """The FHIRPath-like location of ``key`` under ``parent`` (built only when needed)."""
    return f"{parent}[{key}]" if type(key) is int else f"{parent}.{key}"


class _Walker:
    """One resource's walk. Element paths are passed as (parent path, key) and only joined
    when the walk goes deeper or a code is reported unmapped."""

    __slots__ = ("memo", "source", "unmapped")

    def __init__(self, memo: _Memo, source: str) -> None:
        self.memo = memo
        self.source = source
        self.unmapped: list[Unmapped] = []

    def walk(self, node: Json | list[Any], path: str) -> Any:
        """``node`` (an element, or a list of them) with every coded element under it mapped;
        ``node`` itself when nothing changed, else a copy sharing the unchanged parts. A dict
        is a CodeableConcept (it has a ``coding`` list), a Reference (skipped), a Quantity (a
        ``value`` with a ``unit`` or ``code``) or a backbone element, walked further."""
        in_list = type(node) is list
        pairs: Any = enumerate(node) if in_list else node.items()  # type: ignore[union-attr]
        out: Any = None
        for key, value in pairs:
            kind = type(value)
            if kind is dict:
                if "coding" in value:
                    codings = value["coding"]
                    if type(codings) is not list:
                        continue
                    new: Any = self.concept(value, path, key, codings)
                elif "reference" in value or key in _SKIP:
                    continue
                elif "value" in value and ("unit" in value or "code" in value):
                    new = self.quantity(value, path, key)
                else:
                    new = self.walk(value, f"{path}[{key}]" if in_list else f"{path}.{key}")
            elif kind is list and not in_list and key not in _SKIP:
                new = self.walk(value, f"{path}.{key}")
            else:
                continue
            if new is not value:
                if out is None:
                    out = list(node) if in_list else dict(node)
                out[key] = new
        return node if out is None else out

    def concept(self, cc: Json, parent: str, key: str | int, codings: list[Any]) -> Json:
        concepts = self.memo.concepts
        try:
            if len(codings) == 1:
                only = codings[0]
                memo_key: tuple[Any, ...] = (self.source, only["system"], only["code"])
            else:
                memo_key = (self.source, *(x for c in codings for x in (c["system"], c["code"])))
            found = concepts.get(memo_key)
        except (KeyError, TypeError):  # a malformed coding: left for validation
            memo_key, found = (), None
        if found is None:
            found = self._concept(codings)
            if memo_key and len(concepts) < _MEMO_SIZE:
                concepts[memo_key] = found
        added, local, nested = found
        if local:
            where = f"{_path(parent, key)}.coding"
            self.unmapped.extend(Unmapped(where, system, code) for system, code in local)
        if not added:
            return cc
        out = dict(cc)
        out["coding"] = [*codings, *map(_copy if nested else dict, added)]
        return out

    def _concept(self, codings: list[Any]) -> _ConceptResult:
        term, source = self.memo.term, self.source
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
            mapped = term.mapped(system, code, source)
            if not mapped:
                local.append((system, code))
            for m in mapped:
                pair = (m["system"], m["code"])
                if pair not in present:
                    present.add(pair)
                    added.append(m)
        unmapped = tuple(local) if local and not added and not standard else ()
        return tuple(added), unmapped, any("extension" in m for m in added)

    def quantity(self, q: Json, parent: str, key: str | int) -> Json:
        if q.get("system") == UCUM:
            return q
        code = q.get("code")
        spelling = code if type(code) is str else q.get("unit")
        if type(spelling) is not str or not spelling:
            return q
        units = self.memo.units
        ucum = units.get(spelling, "")
        if ucum == "":
            ucum = self.memo.term.unit(spelling)
            if len(units) < _MEMO_SIZE:
                units[spelling] = ucum
        if ucum is None:
            if q.get("system") is None:
                where = f"{_path(parent, key)}.unit"
                self.unmapped.append(Unmapped(where, LOCAL_UNITS, spelling))
            return q
        out = dict(q)
        if "unit" not in out:
            out["unit"] = spelling
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
        term, source = self.memo.term, self.source
        for m in term.mapped(source_system, value, source):
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
