"""Public FHIR packages as test data, fetched at test time from the npm registry.

HL7 publishes the examples of each FHIR release as an npm-format package; the npm registry
serves ``hl7.fhir.r4.examples`` 4.0.1 (every example resource of FHIR R4, one JSON file each)
and ``hl7.fhir.r4b.examples`` 4.3.0. :func:`examples` downloads one with ``npm pack`` (once:
cached under ``~/.cache/alliance-gateway/fhir-packages``, or ``GATEWAY_FHIR_PACKAGES``) and
returns its resources. Nothing from them is copied into this repository.

Raises :class:`PackageUnavailable` when npm or the registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

R4_EXAMPLES = ("hl7.fhir.r4.examples", "4.0.1")
R4B_EXAMPLES = ("hl7.fhir.r4b.examples", "4.3.0")
FETCH_TIMEOUT_S = 300.0


class PackageUnavailable(Exception):
    """The package could not be fetched (no npm, registry unreachable, bad archive)."""


def _cache() -> Path:
    env = os.environ.get("GATEWAY_FHIR_PACKAGES")
    return Path(env) if env else Path.home() / ".cache" / "alliance-gateway" / "fhir-packages"


def package_dir(name: str, version: str) -> Path:
    """The unpacked package (its ``package/`` directory). Raises PackageUnavailable."""
    target = _cache() / f"{name}-{version}"
    if (target / "ok").exists():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise PackageUnavailable("npm is not installed")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", f"{name}@{version}", "--silent", "--pack-destination", tmp],
                capture_output=True,
                text=True,
                timeout=FETCH_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PackageUnavailable(f"npm pack {name}@{version}: {exc}") from exc
        archives = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(archives) != 1:
            raise PackageUnavailable(f"npm pack {name}@{version}: {proc.stderr.strip()[-300:]}")
        unpacked = Path(tmp) / "unpacked"
        try:
            with tarfile.open(archives[0]) as tar:
                tar.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise PackageUnavailable(f"{archives[0].name}: {exc}") from exc
        (unpacked / "ok").touch()
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return target / "package"


def examples(name: str, version: str) -> dict[str, dict[str, Any]]:
    """Every resource of the package, by file name. Raises PackageUnavailable."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(package_dir(name, version).glob("*.json")):
        if path.name == "package.json" or path.name.startswith("."):
            continue
        try:
            value = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
            out[path.name] = value
    return out
