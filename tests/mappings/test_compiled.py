"""The compiled build of ``mappings.v2`` (mappings/compiled.py): used only when it was built
from exactly the sources present, and converting every fixture and mutated message exactly as
the pure build does."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mappings.v2
from mappings import compiled
from mappings.v2 import parse as parse_module

from .conftest import HL7_DIR, ROOT
from .test_fuzz import _mutate as mutate

#: Converts every fixture and prints which build ran and what each fixture gave.
CONVERT_ALL = f"""
import json
from pathlib import Path
import mappings.v2
from scripts.regen_hl7_expected import convert_fixture, dump, load_options
root = Path({str(HL7_DIR)!r})
options = load_options(root)
out = {{p.name: dump(convert_fixture(p, options)) for p in sorted(root.glob("*.hl7"))}}
print(json.dumps({{"compiled": mappings.v2.COMPILED, "out": out}}))
"""


#: Converts the messages in a file (length-prefixed) and prints each one's outcome: a digest
#: of what it became, or the error's class, HL7 code and location.
CONVERT_MESSAGES = f"""
import hashlib, json, struct, sys
import mappings.v2
from mappings.errors import MappingError
from mappings.v2.convert import convert
from mappings.v2.parse import parse
from scripts.regen_hl7_expected import dump, load_options
from pathlib import Path
options = load_options(Path({str(HL7_DIR)!r}))
data = open(sys.argv[1], "rb").read()
out, pos = [], 0
while pos < len(data):
    (size,) = struct.unpack_from(">I", data, pos)
    raw = data[pos + 4 : pos + 4 + size]
    pos += 4 + size
    try:
        result = convert(parse(raw), options=options)
        out.append("ok " + hashlib.sha256(dump(result.resources).encode()).hexdigest())
    except MappingError as exc:
        out.append(" ".join(map(str, (type(exc).__name__, exc.hl7_code, exc.ack_code,
            exc.segment, exc.segment_index, exc.field, exc.component, exc.repetition, exc))))
print(json.dumps({{"compiled": mappings.v2.COMPILED, "out": out}}))
"""


def test_the_build_in_use_is_the_one_its_manifest_allows() -> None:
    allowed = compiled.usable()
    assert mappings.v2.COMPILED is allowed
    assert str(parse_module.__file__).endswith(".so") is allowed
    if os.environ.get("GATEWAY_REQUIRE_COMPILED"):  # set by CI, which builds it
        assert allowed, "no current compiled build: run scripts/build_compiled.py"


def test_a_missing_stale_or_unreadable_build_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_PURE_PYTHON", raising=False)
    package = tmp_path / "mappings"
    (package / "v2").mkdir(parents=True)
    (package / "errors.py").write_text("x = 1\n")
    (package / "v2" / "parse.py").write_text("y = 2\n")
    build = tmp_path / "build"
    build.mkdir()
    assert not compiled.usable(build, package)  # nothing built
    manifest = build / compiled.MANIFEST
    manifest.write_text(json.dumps({"digest": compiled.source_digest(package)}))
    assert compiled.usable(build, package)
    monkeypatch.setenv("GATEWAY_PURE_PYTHON", "1")
    assert not compiled.usable(build, package)  # asked for the pure build
    monkeypatch.delenv("GATEWAY_PURE_PYTHON")
    (package / "v2" / "parse.py").write_text("y = 3\n")  # edited after the build
    assert not compiled.usable(build, package)
    (package / "v2" / "parse.py").write_text("y = 2\n")
    (package / "v2" / "new.py").write_text("z = 1\n")  # a module added after the build
    assert not compiled.usable(build, package)
    (package / "v2" / "new.py").unlink()
    assert compiled.usable(build, package)
    manifest.write_text("{not json")
    assert not compiled.usable(build, package)


def _in_build(pure: bool, script: str, *args: str) -> list[Any] | dict[str, Any]:
    """Run ``script`` (which prints ``{"compiled": ..., "out": ...}``) in a fresh interpreter
    with the pure build or with whichever build is current; check that it ran that build and
    return its ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE_PYTHON"}
    if pure:
        env["GATEWAY_PURE_PYTHON"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    answer = json.loads(done.stdout)
    current = compiled.built_digest() == compiled.source_digest()
    assert answer["compiled"] is (False if pure else current)
    out: list[Any] | dict[str, Any] = answer["out"]
    return out


def test_compiled_and_pure_builds_convert_every_fixture_alike() -> None:
    pure, current = _in_build(True, CONVERT_ALL), _in_build(False, CONVERT_ALL)
    fixtures = sorted(p.name for p in HL7_DIR.glob("*.hl7"))
    assert isinstance(pure, dict) and sorted(pure) == fixtures
    assert current == pure


def test_compiled_and_pure_builds_treat_mutated_messages_alike(tmp_path: Path) -> None:
    """2,000 seeded mutations of the fixtures: the same resources or the same error (class,
    code, location, text) from both builds; neither raises anything but MappingError."""
    rng = random.Random(20261129)
    samples = [p.read_bytes() for p in sorted(HL7_DIR.glob("*.hl7"))]
    messages = [mutate(rng, rng.choice(samples)) for _ in range(2000)]
    batch = tmp_path / "messages"
    batch.write_bytes(b"".join(struct.pack(">I", len(m)) + m for m in messages))
    pure = _in_build(True, CONVERT_MESSAGES, str(batch))
    current = _in_build(False, CONVERT_MESSAGES, str(batch))
    assert isinstance(pure, list) and len(pure) == len(messages)
    # Both kinds of outcome occur, so the comparison covers errors and conversions.
    assert any(o.startswith("ok ") for o in pure)
    assert any(not o.startswith("ok ") for o in pure)
    assert current == pure
