"""The unified dictionary: loading, versioning, translation, validity of its resources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mappings.terminology import DEFAULT_DIR, DictionaryError, Terminology


def test_default_dictionary_translates() -> None:
    term = Terminology.load_default()
    assert term.translate("urn:alliance:codesystem:lab", "GLU") == [
        {
            "system": "http://loinc.org",
            "code": "14749-6",
            "display": "Glucose [Moles/volume] in Serum or Plasma",
        }
    ]
    assert term.translate("urn:alliance:codesystem:diagnosis", "D002")[0]["code"] == "I10"
    assert term.translate("urn:alliance:codesystem:lab", "NOPE") == []
    assert term.aliases["ALB"] == "urn:alliance:codesystem:lab"
    assert term.display("urn:alliance:codesystem:lab", "K") == "钾"
    assert term.has_maps_for("urn:alliance:codesystem:lab")
    assert Terminology.empty().translate("urn:alliance:codesystem:lab", "GLU") == []


def test_dictionary_files_are_valid_r4() -> None:
    paths = sorted(DEFAULT_DIR.glob("*.json"))
    assert len(paths) >= 4
    for path in paths:
        resource = json.loads(path.read_text("utf-8"))
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_version_is_a_hash_of_the_files(tmp_path: Path) -> None:
    copy = tmp_path / "dict"
    shutil.copytree(DEFAULT_DIR, copy)
    assert Terminology.load(copy).version == Terminology.load_default().version
    path = next(copy.glob("ConceptMap-*.json"))
    path.write_text(path.read_text("utf-8").replace("2026.1", "2026.2"), "utf-8")
    assert Terminology.load(copy).version != Terminology.load_default().version


def test_bad_files_raise(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json", "utf-8")
    with pytest.raises(DictionaryError):
        Terminology.load(tmp_path)
    (tmp_path / "x.json").write_text('{"resourceType": "Patient"}', "utf-8")
    with pytest.raises(DictionaryError):
        Terminology.load(tmp_path)
