"""Shared fixtures of the mappings tests: fixture directory, options, the regen module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from mappings.v2.convert import ConversionOptions

ROOT = Path(__file__).resolve().parents[2]
HL7_DIR = ROOT / "fixtures" / "hl7v2"


def _regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "regen_hl7_expected", ROOT / "scripts" / "regen_hl7_expected.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGEN = _regen()


@pytest.fixture(scope="session")
def options() -> ConversionOptions:
    opts: ConversionOptions = REGEN.load_options(HL7_DIR)
    return opts
