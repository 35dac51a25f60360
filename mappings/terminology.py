"""The alliance's unified dictionary: FHIR R4 CodeSystem, ConceptMap, ValueSet and
StructureDefinition JSON files, loaded and validated once at start-up.

:meth:`Terminology.load` reads every ``*.json`` of a directory (the only I/O in
:mod:`mappings`, done once at start-up) and refuses a dictionary with a duplicate source code,
an unknown equivalence, a missing target or a target system that neither one of its
CodeSystems nor a known URI names, naming the file and the element. Everything else is pure:
:meth:`Terminology.matches` (forward and reverse, every equivalence, for ``$translate``),
:meth:`Terminology.mapped` (the codings that may be added beside an original one: only
``equivalent``/``equal`` silently, ``wider``/``narrower``/``relatedto``/``subsumes``/
``specializes`` with the equivalence recorded in an extension, never ``inexact``,
``unmatched`` or ``disjoint``), :meth:`Terminology.lookup` and :meth:`Terminology.validate_code`.
Applying the dictionary to whole resources is :mod:`mappings.dictionary_apply`.

A CodeSystem may declare the HL7 v2 coding system names (CWE.3) that stand for it with
identifiers of system :data:`V2_NAME_SYSTEM`. A ConceptMap may be restricted to the input of one
source institution with the extension :data:`SOURCE_INSTITUTION_URL`; mappings are looked up by
source institution first, then among the maps that apply to every institution.

The version is the first 16 hex digits of a SHA-256 over the names and SHA-256 digests of the
files' canonical JSON (RFC 8785): reformatting a file does not change it, changing a code does.

Raises :class:`DictionaryError` (a :class:`mappings.errors.MappingError`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rfc8785

from mappings.errors import MappingError

__all__ = [
    "DEFAULT_DIR",
    "EQUIVALENCES",
    "EQUIVALENCE_URL",
    "KNOWN_SYSTEMS",
    "ORIGINAL_CODE_URL",
    "SOURCE_INSTITUTION_URL",
    "UCUM",
    "V2_NAME_SYSTEM",
    "DictionaryError",
    "DictionaryFile",
    "Match",
    "Terminology",
]

DEFAULT_DIR = Path(__file__).resolve().parent / "dictionary"
#: Identifier system on a CodeSystem naming the HL7 v2 coding system names (CWE.3) for it.
V2_NAME_SYSTEM = "urn:alliance:hl7v2-coding-system-name"
_SD = "https://alliance.example/fhir/StructureDefinition/"
#: Extension on an added Coding: the ConceptMap equivalence it was mapped with (when not
#: equivalent/equal). Defined by StructureDefinition-coding-equivalence.json.
EQUIVALENCE_URL = _SD + "coding-equivalence"
#: Extension on a ``code`` element (e.g. ``_gender``) keeping the code as sent (valueCoding).
ORIGINAL_CODE_URL = _SD + "original-code"
#: Extension on a ConceptMap: the source institution whose input it maps (valueString).
SOURCE_INSTITUTION_URL = _SD + "source-institution"
#: Extension on a ValueSet of sensitive codes: the security label it implies (valueCoding).
SECURITY_LABEL_URL = _SD + "security-label"
UCUM = "http://unitsofmeasure.org"
#: Source system of the local unit spellings map (lower-cased unit strings -> UCUM).
LOCAL_UNITS = "urn:alliance:codesystem:local-unit"

#: R4 ConceptMapEquivalence codes.
EQUIVALENCES = frozenset(
    {
        "relatedto",
        "equivalent",
        "equal",
        "wider",
        "subsumes",
        "narrower",
        "specializes",
        "inexact",
        "unmatched",
        "disjoint",
    }
)
#: Translated silently.
SILENT = frozenset({"equivalent", "equal"})
#: Added beside the original with the equivalence recorded (subsumes read as wider,
#: specializes as narrower).
RECORDED = frozenset({"wider", "narrower", "relatedto", "subsumes", "specializes"})
#: For $translate: a match only counts as a translation when not one of these.
NOT_A_MATCH = frozenset({"unmatched", "disjoint"})
#: Equivalence seen from the other side (reverse $translate).
_REVERSED = {
    "wider": "narrower",
    "narrower": "wider",
    "subsumes": "specializes",
    "specializes": "subsumes",
}

#: Code systems a ConceptMap may target without the dictionary defining them.
KNOWN_SYSTEMS = frozenset(
    {
        "http://loinc.org",
        "http://snomed.info/sct",
        "http://hl7.org/fhir/sid/icd-10",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://hl7.org/fhir/sid/icpc-2",
        UCUM,
        "http://hl7.org/fhir/administrative-gender",
        "http://hl7.org/fhir/observation-status",
        "http://hl7.org/fhir/appointmentstatus",
        "http://dicom.nema.org/resources/ontology/DCM",
        "http://www.nlm.nih.gov/research/umls/rxnorm",
    }
)
#: Prefixes of code system URIs that are HL7's own (v2 tables, v3 code systems).
KNOWN_PREFIXES = ("http://terminology.hl7.org/CodeSystem/",)

Coding = dict[str, Any]
_KINDS = ("CodeSystem", "ConceptMap", "ValueSet", "StructureDefinition")


class DictionaryError(MappingError):
    """A dictionary file cannot be loaded; the message names the file and the element."""


@dataclass(frozen=True, slots=True)
class Match:
    """One mapping of a ConceptMap: a source concept, its target and their equivalence."""

    source_system: str
    source_code: str
    target_system: str
    target_code: str | None
    target_display: str | None
    equivalence: str
    concept_map: str
    institution: str = ""


@dataclass(frozen=True, slots=True)
class DictionaryFile:
    """A file of the dictionary: its name and the SHA-256 of its canonical JSON."""

    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class _ValueSetDef:
    url: str
    codes: frozenset[tuple[str, str]]
    #: (system, low, high) from is-a filters: a category (low == high, the code or its
    #: subdivisions) or a block of categories such as ICD-10 ``F10-F19``.
    ranges: tuple[tuple[str, str, str], ...]
    systems: frozenset[str]  # whole code systems included
    label: Coding | None


@dataclass(frozen=True)
class Terminology:
    """One version of the dictionary: code systems, maps, value sets, v2 name aliases."""

    version: str = "empty"
    files: tuple[DictionaryFile, ...] = ()
    resources: tuple[Mapping[str, Any], ...] = ()
    displays: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    designations: Mapping[tuple[str, str], tuple[Mapping[str, str], ...]] = field(
        default_factory=dict
    )
    aliases: Mapping[str, str] = field(default_factory=dict)
    forward: Mapping[tuple[str, str, str], tuple[Match, ...]] = field(default_factory=dict)
    backward: Mapping[tuple[str, str], tuple[Match, ...]] = field(default_factory=dict)
    value_sets: Mapping[str, _ValueSetDef] = field(default_factory=dict)
    source_systems: frozenset[str] = frozenset()
    target_systems: frozenset[str] = frozenset()
    _mapped: dict[tuple[str, str, str], tuple[Coding, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _may_label: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def empty(cls) -> Terminology:
        """A dictionary with no content (no translations, no aliases)."""
        return cls()

    @classmethod
    def load_default(cls) -> Terminology:
        """Load the dictionary shipped in ``mappings/dictionary``. Raises DictionaryError."""
        return cls.load(DEFAULT_DIR)

    @classmethod
    def load(cls, directory: str | Path) -> Terminology:
        """Load and validate every ``*.json`` file of ``directory``.

        Raises DictionaryError naming the file and element for unreadable or malformed files,
        unsupported resource types, duplicate CodeSystem urls or concept codes, duplicate
        source codes, unknown equivalences, missing targets and unknown target systems.
        """
        root = Path(directory)
        try:
            paths = sorted(root.glob("*.json"))
        except OSError as exc:
            raise DictionaryError(f"dictionary directory {root} cannot be read") from exc
        loaded: list[tuple[str, dict[str, Any]]] = []
        for path in paths:
            try:
                resource = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise DictionaryError(f"dictionary file {path.name} cannot be loaded") from exc
            loaded.append((path.name, resource))
        return cls.from_resources(loaded)

    @classmethod
    def from_resources(cls, named: Iterable[tuple[str, Any]]) -> Terminology:
        """Build and validate a dictionary from (file name, parsed JSON) pairs. Pure.

        Raises DictionaryError as :meth:`load` does.
        """
        builder = _Builder()
        for name, resource in named:
            builder.add(name, resource)
        return builder.build(cls)

    # ------------------------------------------------------------------ queries

    def matches(
        self, system: str, code: str, *, reverse: bool = False, institution: str = ""
    ) -> list[Match]:
        """Every mapping of ``system|code`` (every equivalence), forward or reverse.

        Forward: maps restricted to ``institution`` first, then maps for every institution.
        Reverse: ``system|code`` is a target; each Match is returned with source and target
        swapped and its equivalence seen from the other side (wider <-> narrower,
        subsumes <-> specializes).
        """
        if not reverse:
            own = self.forward.get((institution, system, code), ()) if institution else ()
            return [*own, *self.forward.get(("", system, code), ())]
        out = []
        for m in self.backward.get((system, code), ()):
            if m.institution and institution and m.institution != institution:
                continue
            out.append(
                Match(
                    source_system=m.target_system,
                    source_code=code,
                    target_system=m.source_system,
                    target_code=m.source_code,
                    target_display=self.display(m.source_system, m.source_code),
                    equivalence=_REVERSED.get(m.equivalence, m.equivalence),
                    concept_map=m.concept_map,
                    institution=m.institution,
                )
            )
        return out

    def mapped(self, system: str, code: str, institution: str = "") -> tuple[Coding, ...]:
        """The codings to add beside ``system|code`` (shared: copy before changing them).

        Only equivalent/equal mappings translate silently; wider, narrower, relatedto,
        subsumes and specializes carry their equivalence in an :data:`EQUIVALENCE_URL`
        extension; inexact, unmatched and disjoint never give a coding.
        """
        key = (institution, system, code)
        found = self._mapped.get(key)
        if found is None:
            out: list[Coding] = []
            for m in self.matches(system, code, institution=institution):
                if m.target_code is None or m.equivalence not in SILENT | RECORDED:
                    continue
                coding: Coding = {"system": m.target_system, "code": m.target_code}
                if m.target_display:
                    coding["display"] = m.target_display
                if m.equivalence in RECORDED:
                    coding["extension"] = [{"url": EQUIVALENCE_URL, "valueCode": m.equivalence}]
                if all((c["system"], c["code"]) != (coding["system"], coding["code"]) for c in out):
                    out.append(coding)
            found = tuple(out)
            if len(self._mapped) < 65536:
                self._mapped[key] = found
        return found

    def translate(self, system: str, code: str, institution: str = "") -> list[Coding]:
        """The codings :meth:`mapped` gives, as copies."""
        return [_copy_coding(c) for c in self.mapped(system, code, institution)]

    def has_maps_for(self, system: str) -> bool:
        """True when some ConceptMap has ``system`` as its source."""
        return system in self.source_systems

    def is_standard(self, system: str) -> bool:
        """True for a system the alliance reads as is: a known public or HL7 system, or the
        target of one of the dictionary's maps, unless the dictionary maps from it."""
        if system in self.source_systems:
            return False
        return (
            system in KNOWN_SYSTEMS
            or system in self.target_systems
            or system.startswith(KNOWN_PREFIXES)
            or system.startswith("http://hl7.org/fhir/")
        )

    def display(self, system: str, code: str) -> str | None:
        """Display of a code in one of the dictionary's CodeSystems, or the display a map
        gives a target code; None when the dictionary does not name it."""
        return self.displays.get(system, {}).get(code) or None

    def unit(self, spelling: str) -> str | None:
        """UCUM code for a unit as a laboratory writes it (case-insensitive), or None."""
        for m in self.forward.get(("", LOCAL_UNITS, spelling.strip().lower()), ()):
            if m.equivalence in SILENT and m.target_code:
                return m.target_code
        return None

    def lookup(self, system: str, code: str) -> dict[str, Any] | None:
        """``$lookup``: name, version, display and designations of ``system|code``, or None
        when the dictionary does not know the code."""
        display = self.display(system, code)
        if display is None and (system, code) not in self.designations:
            return None
        cs = next(
            (r for r in self.resources if r["resourceType"] == "CodeSystem" and r["url"] == system),
            None,
        )
        return {
            "name": str(cs.get("name", system)) if cs else system,
            "version": str(cs["version"]) if cs and "version" in cs else None,
            "display": display or "",
            "designation": [dict(d) for d in self.designations.get((system, code), ())],
        }

    def value_set_urls(self) -> list[str]:
        """URLs of the dictionary's own value sets."""
        return sorted(self.value_sets)

    def in_value_set(self, url: str, system: str, code: str) -> bool | None:
        """Whether ``system|code`` is in value set ``url``; None for an unknown value set."""
        vs = self.value_sets.get(url)
        if vs is None:
            return None
        return _vs_contains(vs, system, code)

    def may_label(self, code: str) -> bool:
        """Whether ``code`` under some system is in a value set that implies a security label
        (False: no coding with this code gets a label, whatever its system): a quick test
        before the codings of a resource are looked at with their systems. Memoised."""
        found = self._may_label.get(code)
        if found is None:
            found = any(
                _vs_contains(vs, system, code)
                for vs in self.value_sets.values()
                if vs.label is not None
                for system in _systems_of(vs)
            )
            if len(self._may_label) < 100_000:
                self._may_label[code] = found
        return found

    def labels_of(self, system: str, code: str) -> list[Coding]:
        """Security labels implied by ``system|code`` (copies)."""
        return [
            dict(vs.label)
            for vs in self.value_sets.values()
            if vs.label is not None and _vs_contains(vs, system, code)
        ]


def _systems_of(vs: _ValueSetDef) -> frozenset[str]:
    return vs.systems | {s for s, _ in vs.codes} | {s for s, _, _ in vs.ranges}


def _vs_contains(vs: _ValueSetDef, system: str, code: str) -> bool:
    if system in vs.systems or (system, code) in vs.codes:
        return True
    for s, low, high in vs.ranges:
        if system != s:
            continue
        if low == high:
            if code.startswith(low):
                return True
        elif low <= code[: len(low)] <= high:
            return True
    return False


def _copy_coding(c: Coding) -> Coding:
    out = dict(c)
    if "extension" in out:
        out["extension"] = [dict(e) for e in out["extension"]]
    return out


def canonical_sha256(resource: Any) -> str:
    """SHA-256 (hex) of the RFC 8785 canonical JSON of ``resource``."""
    return hashlib.sha256(rfc8785.dumps(resource)).hexdigest()


class _Builder:
    """Collects and validates the files of one dictionary version."""

    def __init__(self) -> None:
        self.files: list[DictionaryFile] = []
        self.resources: list[dict[str, Any]] = []
        self.displays: dict[str, dict[str, str]] = {}
        self.designations: dict[tuple[str, str], tuple[Mapping[str, str], ...]] = {}
        self.aliases: dict[str, str] = {}
        self.forward: dict[tuple[str, str, str], list[Match]] = {}
        self.value_sets: dict[str, _ValueSetDef] = {}
        self.complete: set[str] = set()  # CodeSystems whose content is complete
        self.code_systems: dict[str, str] = {}  # url -> file
        self.pending_targets: list[tuple[str, str, Match]] = []  # (file, element, match)
        self.pending_vs: list[tuple[str, str, str]] = []  # (file, element, system)
        self.seen_sources: dict[tuple[str, str, str, str], str] = {}

    def add(self, name: str, resource: Any) -> None:
        if not isinstance(resource, dict):
            raise DictionaryError(f"dictionary file {name} is not a JSON object")
        kind = resource.get("resourceType")
        if kind not in _KINDS:
            raise DictionaryError(
                f"dictionary file {name}: resourceType {kind!r} is not one of {', '.join(_KINDS)}"
            )
        url = resource.get("url")
        if not isinstance(url, str) or not url:
            raise DictionaryError(f"dictionary file {name}: {kind}.url is missing")
        self.files.append(DictionaryFile(name, canonical_sha256(resource)))
        self.resources.append(resource)
        if kind == "CodeSystem":
            self._code_system(name, resource, url)
        elif kind == "ConceptMap":
            self._concept_map(name, resource, url)
        elif kind == "ValueSet":
            self._value_set(name, resource, url)

    def _code_system(self, name: str, resource: dict[str, Any], url: str) -> None:
        if url in self.code_systems:
            raise DictionaryError(
                f"dictionary file {name}: CodeSystem.url {url} is already defined in "
                f"{self.code_systems[url]}"
            )
        self.code_systems[url] = name
        if resource.get("content", "complete") == "complete":
            self.complete.add(url)
        table = self.displays.setdefault(url, {})
        for i, concept in enumerate(resource.get("concept", [])):
            code = concept.get("code") if isinstance(concept, dict) else None
            if not isinstance(code, str) or not code:
                raise DictionaryError(
                    f"dictionary file {name}: CodeSystem.concept[{i}].code is missing"
                )
            if code in table:
                raise DictionaryError(
                    f"dictionary file {name}: CodeSystem.concept[{i}].code {code!r} is a duplicate"
                )
            table[code] = str(concept.get("display", ""))
            designations = tuple(
                {"language": str(d.get("language", "")), "value": str(d.get("value", ""))}
                for d in concept.get("designation", [])
                if isinstance(d, dict)
            )
            if designations:
                self.designations[(url, code)] = designations
        for ident in resource.get("identifier", []):
            if ident.get("system") == V2_NAME_SYSTEM and ident.get("value"):
                self.aliases[str(ident["value"])] = url

    def _concept_map(self, name: str, resource: dict[str, Any], url: str) -> None:
        institution = ""
        for ext in resource.get("extension", []):
            if isinstance(ext, dict) and ext.get("url") == SOURCE_INSTITUTION_URL:
                institution = str(ext.get("valueString", ""))
        groups = resource.get("group", [])
        if not isinstance(groups, list) or not groups:
            raise DictionaryError(f"dictionary file {name}: ConceptMap.group is missing")
        for g, group in enumerate(groups):
            where_g = f"ConceptMap.group[{g}]"
            source, target = group.get("source"), group.get("target")
            if not isinstance(source, str) or not source:
                raise DictionaryError(f"dictionary file {name}: {where_g}.source is missing")
            if not isinstance(target, str) or not target:
                raise DictionaryError(f"dictionary file {name}: {where_g}.target is missing")
            for e, element in enumerate(group.get("element", [])):
                where_e = f"{where_g}.element[{e}]"
                code = element.get("code")
                if not isinstance(code, str) or not code:
                    raise DictionaryError(f"dictionary file {name}: {where_e}.code is missing")
                key = (institution, source, code, target)
                if key in self.seen_sources:
                    raise DictionaryError(
                        f"dictionary file {name}: {where_e}.code {code!r} of {source} is a "
                        f"duplicate source code (already mapped to {target} in "
                        f"{self.seen_sources[key]})"
                    )
                self.seen_sources[key] = name
                targets = element.get("target")
                if not isinstance(targets, list) or not targets:
                    raise DictionaryError(
                        f"dictionary file {name}: {where_e}.target is missing (a source code "
                        "without a target; use equivalence 'unmatched' to say there is none)"
                    )
                for t, tgt in enumerate(targets):
                    where_t = f"{where_e}.target[{t}]"
                    equivalence = tgt.get("equivalence", "equivalent")
                    if equivalence not in EQUIVALENCES:
                        raise DictionaryError(
                            f"dictionary file {name}: {where_t}.equivalence {equivalence!r} is "
                            "not a ConceptMap equivalence"
                        )
                    tcode = tgt.get("code")
                    if equivalence != "unmatched" and (not isinstance(tcode, str) or not tcode):
                        raise DictionaryError(
                            f"dictionary file {name}: {where_t}.code is missing (missing target)"
                        )
                    match = Match(
                        source_system=source,
                        source_code=code,
                        target_system=target,
                        target_code=str(tcode) if tcode else None,
                        target_display=str(tgt["display"]) if tgt.get("display") else None,
                        equivalence=str(equivalence),
                        concept_map=url,
                        institution=institution,
                    )
                    self.forward.setdefault((institution, source, code), []).append(match)
                    self.pending_targets.append((name, where_t, match))

    def _value_set(self, name: str, resource: dict[str, Any], url: str) -> None:
        codes: set[tuple[str, str]] = set()
        ranges: list[tuple[str, str, str]] = []
        systems: set[str] = set()
        for i, include in enumerate(resource.get("compose", {}).get("include", [])):
            system = include.get("system")
            where = f"ValueSet.compose.include[{i}]"
            if not isinstance(system, str) or not system:
                raise DictionaryError(f"dictionary file {name}: {where}.system is missing")
            self.pending_vs.append((name, where, system))
            concepts = include.get("concept", [])
            filters = include.get("filter", [])
            for c in concepts:
                codes.add((system, str(c["code"])))
            for f, flt in enumerate(filters):
                if flt.get("op") != "is-a" or not flt.get("value"):
                    raise DictionaryError(
                        f"dictionary file {name}: {where}.filter[{f}] is not a supported filter "
                        "(only op 'is-a' with a value)"
                    )
                low, _, high = str(flt["value"]).partition("-")
                ranges.append((system, low, high or low))
            if not concepts and not filters:
                systems.add(system)
        label = None
        for ext in resource.get("extension", []):
            if isinstance(ext, dict) and ext.get("url") == SECURITY_LABEL_URL:
                label = dict(ext.get("valueCoding", {}))
        self.value_sets[url] = _ValueSetDef(
            url, frozenset(codes), tuple(ranges), frozenset(systems), label
        )

    def _known(self, system: str) -> bool:
        return (
            system in self.code_systems
            or system in KNOWN_SYSTEMS
            or system.startswith(KNOWN_PREFIXES)
        )

    def build(self, cls: type[Terminology]) -> Terminology:
        for name, where, m in self.pending_targets:
            if not self._known(m.target_system):
                raise DictionaryError(
                    f"dictionary file {name}: {where}: target system {m.target_system} is named "
                    "by no CodeSystem of the dictionary and is not a known code system URI"
                )
            if (
                m.target_code is not None
                and m.target_system in self.complete
                and m.target_code not in self.displays[m.target_system]
            ):
                raise DictionaryError(
                    f"dictionary file {name}: {where}.code {m.target_code!r} is not in "
                    f"CodeSystem {m.target_system} (missing target)"
                )
        for name, where, system in self.pending_vs:
            if not self._known(system):
                raise DictionaryError(
                    f"dictionary file {name}: {where}.system {system} is named by no CodeSystem "
                    "of the dictionary and is not a known code system URI"
                )
        # Target displays become look-up-able (LOINC, ICD-10 codes the maps name).
        backward: dict[tuple[str, str], list[Match]] = {}
        for matches in self.forward.values():
            for m in matches:
                if m.target_code is None:
                    continue
                backward.setdefault((m.target_system, m.target_code), []).append(m)
                if m.target_display and m.target_system not in self.code_systems:
                    self.displays.setdefault(m.target_system, {}).setdefault(
                        m.target_code, m.target_display
                    )
        digest = hashlib.sha256()
        files = tuple(sorted(self.files, key=lambda f: f.name))
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.sha256.encode() + b"\0")
        sources = {key[1] for key in self.forward}
        return cls(
            version=digest.hexdigest()[:16] if files else "empty",
            files=files,
            resources=tuple(self.resources),
            displays=self.displays,
            designations=self.designations,
            aliases=self.aliases,
            forward={k: tuple(v) for k, v in self.forward.items()},
            backward={k: tuple(v) for k, v in backward.items()},
            value_sets=self.value_sets,
            source_systems=frozenset(sources - {LOCAL_UNITS}),
            target_systems=frozenset(m.target_system for v in self.forward.values() for m in v),
        )


def bundle_sha256(term: Terminology) -> str:
    """SHA-256 (hex) of the dictionary bundle: the canonical JSON of its list of files
    ``[{name, sha256}]`` (what the ``dictionary`` ledger leaf commits to)."""
    return canonical_sha256([{"name": f.name, "sha256": f.sha256} for f in term.files])
