"""The optional compiled build of the HL7 v2 conversion: which sources, where the build lives,
and whether it may be used.

``mappings.v2`` is ordinary typed Python (mypy strict). ``scripts/build_compiled.py``, which
``scripts/bootstrap.sh`` runs, compiles its modules with mypyc (the compiler that comes with the
type checker the project already uses) into ``.build/compiled``, with a manifest recording the
digest of the sources it was built from. ``mappings.v2`` loads the compiled modules only when
that digest matches the sources as they are now, for this Python: an edited module is never
shadowed by a stale build. Without a build (no C compiler, say), with a stale one, or with
``GATEWAY_PURE_PYTHON`` set, the same modules run as Python. Both give the same output (a test
converts every fixture both ways and compares); the compiled build is about twice as fast
(docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

#: The modules of ``mappings.v2`` that are compiled.
MODULES = ("adt", "common", "convert", "datatypes", "mdm", "orm", "oru", "parse", "siu")

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_DIR = PACKAGE_DIR.parent / ".build" / "compiled"
MANIFEST = "manifest.json"


def sources(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every Python source a build depends on: ``mappings`` and ``mappings.v2``, sorted."""
    return sorted([*package_dir.glob("*.py"), *(package_dir / "v2").glob("*.py")])


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over this Python's version and every source (relative name and content)."""
    digest = hashlib.sha256(sys.version.encode())
    for path in sources(package_dir):
        name = path.relative_to(package_dir).as_posix().encode()
        digest.update(b"%d:%s%d:" % (len(name), name, path.stat().st_size))
        digest.update(path.read_bytes())
    return digest.hexdigest()


def built_digest(build_dir: Path = BUILD_DIR) -> str | None:
    """The source digest recorded by the build in ``build_dir``, or None (no usable build)."""
    try:
        recorded = json.loads((build_dir / MANIFEST).read_text(encoding="utf-8"))["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, str) else None


def usable(build_dir: Path = BUILD_DIR, package_dir: Path = PACKAGE_DIR) -> bool:
    """True when ``build_dir`` holds a build of exactly the sources in ``package_dir`` and
    ``GATEWAY_PURE_PYTHON`` is not set."""
    if os.environ.get("GATEWAY_PURE_PYTHON"):
        return False
    recorded = built_digest(build_dir)
    return recorded is not None and recorded == source_digest(package_dir)
