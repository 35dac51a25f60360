"""Compile the HL7 v2 conversion (``mappings.v2``) with mypyc into ``.build/compiled``.

Run by ``scripts/bootstrap.sh``; idempotent (nothing to do when the build matches the sources).
Without a C compiler, or when the compilation fails, it says so and leaves the conversion to
run as Python (see ``mappings/compiled.py``); it never fails the bootstrap for that.

    .venv/bin/python scripts/build_compiled.py [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mappings import compiled  # noqa: E402


def say(text: str) -> None:
    print(f"[build-compiled] {text}", file=sys.stderr)


def build() -> bool:
    """Compile into a staging directory, then replace the build. True when it worked."""
    digest = compiled.source_digest()
    with tempfile.TemporaryDirectory(prefix="mypyc-") as tmp:
        src = Path(tmp)
        for path in compiled.sources():
            target = src / "mappings" / path.relative_to(compiled.PACKAGE_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        command = [
            sys.executable,
            "-m",
            "mypyc",
            *(f"mappings/v2/{name}.py" for name in compiled.MODULES),
        ]
        started = time.monotonic()
        done = subprocess.run(command, cwd=src, capture_output=True, text=True)
        if done.returncode != 0:
            say("mypyc failed; the conversion runs as Python. Its output ends:")
            print("\n".join((done.stdout + done.stderr).splitlines()[-15:]), file=sys.stderr)
            return False
        stage = compiled.BUILD_DIR.with_name("compiled.new")
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "mappings" / "v2").mkdir(parents=True)
        for lib in (src / "mappings" / "v2").glob("*.so"):
            shutil.move(lib, stage / "mappings" / "v2" / lib.name)
        for lib in src.glob("*.so"):  # the group's shared library
            shutil.move(lib, stage / lib.name)
        manifest = {
            "digest": digest,
            "modules": [f"mappings.v2.{name}" for name in compiled.MODULES],
            "python": sys.version,
        }
        (stage / compiled.MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        shutil.rmtree(compiled.BUILD_DIR, ignore_errors=True)
        stage.rename(compiled.BUILD_DIR)
    say(f"compiled {len(compiled.MODULES)} modules in {time.monotonic() - started:.0f} s")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args()
    if not args.force and compiled.built_digest() == compiled.source_digest():
        return 0
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        say("no C compiler found: the conversion runs as Python (about half the speed)")
        return 0
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
