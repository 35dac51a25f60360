"""Regenerate fixtures/hl7v2/expected/<name>.json from fixtures/hl7v2/<name>.hl7.

Usage: python scripts/regen_hl7_expected.py [name ...]

Review every changed file by eye (git diff) before committing: the expected outputs are
the specification the tests hold the converter to. Options come from
fixtures/hl7v2/options.json. Files named ``batch_*`` are split with ``split_batch`` and
their expected output is a list, one entry per message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mappings.terminology import Terminology
from mappings.v2.convert import ConversionOptions, convert
from mappings.v2.parse import decode, parse, split_batch

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "hl7v2"


def load_options(root: Path = ROOT) -> ConversionOptions:
    """The ConversionOptions the fixtures are converted with."""
    data = json.loads((root / "options.json").read_text(encoding="utf-8"))
    return ConversionOptions(terminology=Terminology.load_default(), **data)


def convert_fixture(path: Path, options: ConversionOptions) -> Any:
    """Convert one fixture file to its expected JSON form (a dict, or a list for a batch)."""
    raw = path.read_bytes()
    if path.name.startswith("batch_"):
        return [_result(parse(m), options) for m in split_batch(decode(raw))]
    return _result(parse(raw), options)


def _result(msg: Any, options: ConversionOptions) -> dict[str, Any]:
    result = convert(msg, options=options)
    out: dict[str, Any] = {
        "message_type": result.message_type,
        "patient_identifiers": [list(p) for p in result.patient_identifiers],
        "master_identifier": list(result.master_identifier) if result.master_identifier else None,
        "resources": result.resources,
    }
    if result.prior_identifiers:  # a merge (A40)
        out["prior_identifiers"] = [list(p) for p in result.prior_identifiers]
    if result.warnings:
        out["warnings"] = [w.text + f" ({w.segment}-{w.field})" for w in result.warnings]
    return out


def dump(value: Any) -> str:
    """The on-disk JSON form (UTF-8, readable Chinese, stable indentation)."""
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


def main(names: list[str]) -> int:
    """Regenerate the named fixtures (all when none); print which files changed."""
    options = load_options()
    paths = [ROOT / f"{n}.hl7" for n in names] if names else sorted(ROOT.glob("*.hl7"))
    for path in paths:
        out = ROOT / "expected" / f"{path.stem}.json"
        text = dump(convert_fixture(path, options))
        old = out.read_text(encoding="utf-8") if out.exists() else None
        if old != text:
            out.write_text(text, encoding="utf-8")
            print(f"{'updated' if old else 'created'} {out.relative_to(ROOT.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
