"""Curators' CSV maps -> FHIR R4 ConceptMap (and the source CodeSystem). Pure.

A curator keeps a map as a CSV file (``mappings/dictionary/sources/*.csv``) and converts it
with ``gateway dictionary import-csv``. The file starts with ``# key: value`` header lines,
then a CSV header row and one row per source code::

    # id: hosp-t-lis-to-loinc                      (required; the ConceptMap id)
    # title: HOSP-T LIS items to LOINC              (required)
    # source-system: urn:alliance:facility:HOSP-T:cs:LIS   (required)
    # target-system: http://loinc.org               (required)
    # codesystem: yes        (also write the source CodeSystem, with zh designations)
    # codesystem-title: ...  # institution: hosp-t  # copyright: ...  # description: ...
    # source-valueset: ...   # target-valueset: ...   (ConceptMap.sourceUri / targetUri)
    source_code,source_display,source_display_zh,target_code,target_display,equivalence,unit,
    comment

``equivalence`` is an R4 ConceptMapEquivalence (empty: ``equivalent``); ``unit`` (optional)
is the UCUM unit the target concept is reported in, kept as a ``product`` of the target;
``comment`` says why a mapping is not equivalent, and is required for ``narrower`` and
``inexact`` (R4 invariant cmd-1). Several rows with the same source code give several targets.
``source-valueset`` and ``target-valueset`` name the value sets the map is from and to
(ConceptMap.source[x] and target[x] are value sets: for HL7 v2 tables and FHIR code systems
the value sets FHIR R4 defines); without them the code systems' URIs stand in.

Raises :class:`mappings.terminology.DictionaryError` naming the file, line and column.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from mappings.terminology import (
    EQUIVALENCES,
    SOURCE_INSTITUTION_URL,
    UCUM,
    DictionaryError,
)

__all__ = ["COLUMNS", "resources_from_csv"]

COLUMNS = (
    "source_code",
    "source_display",
    "source_display_zh",
    "target_code",
    "target_display",
    "equivalence",
    "unit",
    "comment",
)
#: Equivalences that need a comment (R4 ConceptMap invariant cmd-1).
NEED_COMMENT = frozenset({"narrower", "inexact"})
_REQUIRED = ("id", "title", "source-system", "target-system")
_VERSION = "2026.2"


def _pascal(text: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in text.replace("_", "-").split("-"))


def resources_from_csv(text: str, *, name: str) -> list[dict[str, Any]]:
    """The ConceptMap (first) and, with ``# codesystem: yes``, the source CodeSystem described
    by the CSV ``text`` of file ``name``.

    Raises DictionaryError for a missing header key, an unknown column, an empty source or
    target code, an unknown equivalence, or a narrower or inexact mapping without a comment
    (naming file and line).
    """
    meta: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") and not body:
            key, sep, value = line[1:].partition(":")
            if sep:
                meta[key.strip().lower()] = value.strip()
            continue
        body.append(line)
    header_lines = len(text.splitlines()) - len(body)
    for key in _REQUIRED:
        if not meta.get(key):
            raise DictionaryError(f"{name}: header line '# {key}: ...' is missing")
    reader = csv.DictReader(io.StringIO("\n".join(body)))
    columns = reader.fieldnames or []
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or "source_code" not in columns or "target_code" not in columns:
        raise DictionaryError(
            f"{name}: CSV columns must be among {', '.join(COLUMNS)} and include source_code "
            f"and target_code (unknown: {', '.join(unknown) or 'none'})"
        )
    source, target = meta["source-system"], meta["target-system"]
    elements: dict[str, dict[str, Any]] = {}
    concepts: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(reader):
        lineno = header_lines + n + 2
        code = (row.get("source_code") or "").strip()
        if not code:
            raise DictionaryError(f"{name}: line {lineno}: source_code is empty")
        equivalence = (row.get("equivalence") or "").strip() or "equivalent"
        if equivalence not in EQUIVALENCES:
            raise DictionaryError(
                f"{name}: line {lineno}: equivalence {equivalence!r} is not a ConceptMap "
                "equivalence"
            )
        tcode = (row.get("target_code") or "").strip()
        if not tcode and equivalence != "unmatched":
            raise DictionaryError(f"{name}: line {lineno}: target_code is empty")
        display = (row.get("source_display") or "").strip()
        element = elements.setdefault(code, {"code": code, "target": []})
        if display:
            element.setdefault("display", display)
        tgt: dict[str, Any] = {"equivalence": equivalence}
        if tcode:
            tgt = {"code": tcode, **tgt}
        tdisplay = (row.get("target_display") or "").strip()
        if tdisplay:
            tgt["display"] = tdisplay
        comment = (row.get("comment") or "").strip()
        if comment:
            tgt["comment"] = comment
        elif equivalence in NEED_COMMENT:
            raise DictionaryError(
                f"{name}: line {lineno}: a {equivalence} mapping needs a comment saying how "
                "source and target differ (ConceptMap invariant cmd-1)"
            )
        unit = (row.get("unit") or "").strip()
        if unit:
            tgt["product"] = [{"property": UCUM, "system": UCUM, "value": unit}]
        element["target"].append(tgt)
        if code not in concepts:
            concept: dict[str, Any] = {"code": code}
            if display:
                concept["display"] = display
            zh = (row.get("source_display_zh") or "").strip()
            if zh:
                concept["designation"] = [{"language": "zh", "value": zh}]
            concepts[code] = concept
    cmap: dict[str, Any] = {
        "resourceType": "ConceptMap",
        "id": meta["id"],
        "url": f"urn:alliance:conceptmap:{meta['id']}",
        "version": meta.get("version", _VERSION),
        "name": _pascal(meta["id"]),
        "title": meta["title"],
        "status": "active",
    }
    if meta.get("institution"):
        cmap["extension"] = [{"url": SOURCE_INSTITUTION_URL, "valueString": meta["institution"]}]
    if meta.get("description"):
        cmap["description"] = meta["description"]
    if meta.get("copyright"):
        cmap["copyright"] = meta["copyright"]
    cmap["sourceUri"] = meta.get("source-valueset") or source
    cmap["targetUri"] = meta.get("target-valueset") or target
    cmap["group"] = [{"source": source, "target": target, "element": list(elements.values())}]
    out = [cmap]
    if meta.get("codesystem", "").lower() in ("yes", "true", "1"):
        cs_id = meta.get("codesystem-id") or meta["id"].split("-to-")[0]
        cs: dict[str, Any] = {
            "resourceType": "CodeSystem",
            "id": cs_id,
            "url": source,
            "version": meta.get("version", _VERSION),
            "name": _pascal(cs_id),
            "title": meta.get("codesystem-title", meta["title"]),
            "status": "active",
        }
        if meta.get("codesystem-description"):
            cs["description"] = meta["codesystem-description"]
        if meta.get("codesystem-copyright"):
            cs["copyright"] = meta["codesystem-copyright"]
        cs.update(
            {
                "caseSensitive": True,
                "content": "complete",
                "count": len(concepts),
                "concept": list(concepts.values()),
            }
        )
        out.append(cs)
    return out
