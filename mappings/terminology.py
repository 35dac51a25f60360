"""The alliance's unified dictionary: FHIR CodeSystem and ConceptMap JSON files.

:meth:`Terminology.load` reads every ``*.json`` in a directory (the only I/O in
:mod:`mappings`, done once at start-up); :meth:`Terminology.translate` is the pure
``$translate`` used by the converters, which keep the original coding beside the
standard one. A CodeSystem may declare the HL7 v2 coding system names (CWE.3) that stand
for it with identifiers of system :data:`V2_NAME_SYSTEM`.

Raises :class:`DictionaryError` (a :class:`mappings.errors.MappingError`) for a dictionary
file that is not valid JSON or not a CodeSystem/ConceptMap.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mappings.errors import MappingError

__all__ = ["DEFAULT_DIR", "V2_NAME_SYSTEM", "DictionaryError", "Terminology"]

DEFAULT_DIR = Path(__file__).resolve().parent / "dictionary"
#: Identifier system on a CodeSystem naming the HL7 v2 coding system names (CWE.3) for it.
V2_NAME_SYSTEM = "urn:alliance:hl7v2-coding-system-name"
#: ConceptMap equivalences that are safe to use as a translation.
USABLE_EQUIVALENCE = frozenset({"relatedto", "equivalent", "equal", "wider", "subsumes"})

Coding = dict[str, Any]


class DictionaryError(MappingError):
    """A dictionary file cannot be loaded."""


@dataclass(frozen=True)
class Terminology:
    """Code systems, v2 name aliases and concept maps of one dictionary version."""

    version: str = "empty"
    displays: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    maps: Mapping[tuple[str, str], tuple[Coding, ...]] = field(default_factory=dict)

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
        """Load every CodeSystem and ConceptMap ``*.json`` file of ``directory``.

        ``version`` is the first 16 hex digits of a SHA-256 over the file names and contents.
        Raises DictionaryError for unreadable, malformed or unexpected files.
        """
        root = Path(directory)
        digest = hashlib.sha256()
        displays: dict[str, dict[str, str]] = {}
        aliases: dict[str, str] = {}
        maps: dict[tuple[str, str], list[Coding]] = {}
        try:
            paths = sorted(root.glob("*.json"))
        except OSError as exc:
            raise DictionaryError("dictionary directory cannot be read") from exc
        for path in paths:
            try:
                data = path.read_bytes()
                resource = json.loads(data)
            except (OSError, ValueError) as exc:
                raise DictionaryError(f"dictionary file {path.name} cannot be loaded") from exc
            digest.update(path.name.encode() + b"\0" + data + b"\0")
            if not isinstance(resource, dict):
                raise DictionaryError(f"dictionary file {path.name} is not a JSON object")
            kind = resource.get("resourceType")
            if kind == "CodeSystem":
                cls._add_code_system(resource, displays, aliases)
            elif kind == "ConceptMap":
                cls._add_concept_map(resource, maps)
            else:
                raise DictionaryError(f"dictionary file {path.name} is not a CodeSystem/ConceptMap")
        return cls(
            version=digest.hexdigest()[:16],
            displays=displays,
            aliases=aliases,
            maps={key: tuple(value) for key, value in maps.items()},
        )

    @staticmethod
    def _add_code_system(
        resource: dict[str, Any], displays: dict[str, dict[str, str]], aliases: dict[str, str]
    ) -> None:
        url = resource.get("url")
        if not isinstance(url, str):
            raise DictionaryError("CodeSystem without url")
        table = displays.setdefault(url, {})
        for concept in resource.get("concept", []):
            table[str(concept["code"])] = str(concept.get("display", ""))
        for ident in resource.get("identifier", []):
            if ident.get("system") == V2_NAME_SYSTEM and ident.get("value"):
                aliases[str(ident["value"])] = url

    @staticmethod
    def _add_concept_map(
        resource: dict[str, Any], maps: dict[tuple[str, str], list[Coding]]
    ) -> None:
        for group in resource.get("group", []):
            source, target = group.get("source"), group.get("target")
            if not isinstance(source, str) or not isinstance(target, str):
                raise DictionaryError("ConceptMap group without source and target")
            for element in group.get("element", []):
                for tgt in element.get("target", []):
                    if tgt.get("equivalence", "equivalent") not in USABLE_EQUIVALENCE:
                        continue
                    coding: Coding = {"system": target, "code": str(tgt["code"])}
                    if tgt.get("display"):
                        coding["display"] = str(tgt["display"])
                    maps.setdefault((source, str(element["code"])), []).append(coding)

    def translate(self, system: str, code: str) -> list[Coding]:
        """Standard codings for ``system|code`` (copies; empty when there is no mapping)."""
        return [dict(c) for c in self.maps.get((system, code), ())]

    def has_maps_for(self, system: str) -> bool:
        """True when some ConceptMap has ``system`` as its source."""
        return any(key[0] == system for key in self.maps)

    def display(self, system: str, code: str) -> str | None:
        """Display of a code in one of the dictionary's own CodeSystems."""
        return self.displays.get(system, {}).get(code) or None
