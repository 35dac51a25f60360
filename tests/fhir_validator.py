"""The FHIR R4 reference validator (HAPI FHIR's instance validator) as a test helper.

``tools/validator`` is a small Java program around HAPI FHIR's R4 (4.0.1) instance validator,
offline (no terminology server; URL connections are refused and counted). This module
starts it once (``ReferenceValidator``, one JVM per test session) and sends it resources as
NDJSON on its standard input; it answers one JSON line per resource with the issues found,
each with its severity and FHIRPath location.

Independent of the gateway package: it needs only the build that
``scripts/install-validator.sh`` makes (the directory it prints, or ``GATEWAY_VALIDATOR_HOME``).
Raises :class:`ValidatorUnavailable` when the validator cannot be built or started, and
:class:`ValidatorFailed` when it dies or does not answer in time.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "fixtures" / "fhir" / "profiles"
#: The unified dictionary's extension definitions (equivalence, original code, ...), kept with
#: the dictionary; the validator loads them beside the ledger-receipt extension.
DICTIONARY_DIR = ROOT / "mappings" / "dictionary"


def profile_dirs() -> list[Path]:
    """Directories of StructureDefinitions the validator loads: the fixtures' profiles and a
    temporary copy of the dictionary's extension definitions (its other files are not
    conformance resources the validator should load)."""
    extra = Path(tempfile.mkdtemp(prefix="validator-profiles-"))
    for sd in sorted(DICTIONARY_DIR.glob("StructureDefinition-*.json")):
        shutil.copy(sd, extra / sd.name)
    return [PROFILES_DIR, extra]


INSTALL_SCRIPT = ROOT / "scripts" / "install-validator.sh"
#: First build: HAPI FHIR from Maven Central (about 150 MB) and a compile.
BUILD_TIMEOUT_S = 1200.0
#: One answer: the first one includes the JVM start and the loading of the R4 definitions.
ANSWER_TIMEOUT_S = 600.0


class ValidatorUnavailable(Exception):
    """The validator could not be built or started (no JDK, no Maven Central ...)."""


class ValidatorFailed(Exception):
    """The running validator died, answered garbage, or did not answer in time."""


@dataclass(frozen=True)
class Issue:
    """One finding of the validator."""

    severity: str  # fatal, error, warning, information
    location: str
    message: str
    message_id: str

    @property
    def is_error(self) -> bool:
        """True for error and fatal."""
        return self.severity in ("error", "fatal")


@dataclass
class Result:
    """The validator's findings for one resource."""

    resource_type: str
    id: str
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        """The error and fatal issues."""
        return [i for i in self.issues if i.is_error]

    @property
    def warnings(self) -> list[Issue]:
        """The warnings."""
        return [i for i in self.issues if i.severity == "warning"]


def validator_home() -> Path:
    """The validator build: ``GATEWAY_VALIDATOR_HOME``, else what the install script prints
    (instant when cached, a build otherwise). Raises ValidatorUnavailable."""
    env = os.environ.get("GATEWAY_VALIDATOR_HOME")
    if env:
        home = Path(env)
    else:
        try:
            proc = subprocess.run(
                ["bash", str(INSTALL_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValidatorUnavailable(f"install-validator.sh failed: {exc}") from exc
        if proc.returncode != 0 or not proc.stdout.strip():
            tail = proc.stderr.strip().splitlines()[-5:]
            raise ValidatorUnavailable(f"install-validator.sh failed: {' | '.join(tail)}")
        home = Path(proc.stdout.strip().splitlines()[-1])
    if not (home / "ok").exists():
        raise ValidatorUnavailable(f"no validator build in {home}")
    return home


class ReferenceValidator:
    """One running validator JVM; :meth:`validate` may be called many times."""

    def __init__(self, home: Path, *, profiles: Iterable[Path] | None = None) -> None:
        java = shutil.which("java")
        if java is None:
            raise ValidatorUnavailable("no java on PATH")
        cmd = [
            java,
            # A short-lived batch tool: the quick JIT tier and one GC thread start faster on
            # a loaded machine.
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xss4m",
            "-cp",
            f"{home / 'classes'}{os.pathsep}{home / 'lib' / '*'}",
            "alliance.validator.Main",
        ]
        for directory in profile_dirs() if profiles is None else profiles:
            cmd += ["--profiles", str(directory)]
        cmd.append("-")
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
            )
        except OSError as exc:
            raise ValidatorUnavailable(f"cannot start the validator: {exc}") from exc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.totals: Counter[str] = Counter()
        self.warning_kinds: Counter[str] = Counter()
        self.network_attempts: int | None = None

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line.rstrip())

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty as exc:
            raise ValidatorFailed(f"no answer from the validator in {timeout:.0f} s") from exc
        if line is None:
            raise ValidatorFailed(
                f"the validator exited ({self._proc.poll()}): {' | '.join(self._stderr[-5:])}"
            )
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidatorFailed(f"the validator answered {line[:200]!r}") from exc
        if not isinstance(value, dict):
            raise ValidatorFailed(f"the validator answered {line[:200]!r}")
        return value

    def validate(
        self,
        resources: Iterable[dict[str, Any]],
        *,
        timeout: float = ANSWER_TIMEOUT_S,
        tally: bool = True,
    ) -> list[Result]:
        """Validate each resource; one Result per resource, in order. ``tally=False`` leaves
        them out of the session summary (resources broken on purpose). Raises ValidatorFailed."""
        docs = [json.dumps(r, ensure_ascii=False) for r in resources]
        assert self._proc.stdin is not None
        try:
            for doc in docs:
                self._proc.stdin.write(doc.replace("\n", " ") + "\n")
            self._proc.stdin.flush()
        except OSError as exc:
            raise ValidatorFailed(f"cannot write to the validator: {exc}") from exc
        results = []
        for _ in docs:
            raw = self._next(timeout)
            result = Result(
                resource_type=str(raw.get("resourceType", "")),
                id=str(raw.get("id", "")),
                issues=[
                    Issue(
                        severity=str(i.get("severity")),
                        location=str(i.get("location", "")),
                        message=str(i.get("message", "")),
                        message_id=str(i.get("messageId", "")),
                    )
                    for i in raw.get("issues", [])
                ],
            )
            if tally:
                self.totals["resources"] += 1
                self.totals["errors"] += len(result.errors)
                self.totals["warnings"] += len(result.warnings)
                for w in result.warnings:
                    self.warning_kinds[warning_kind(result, w)] += 1
            results.append(result)
        return results

    def close(self, timeout: float = 60.0) -> None:
        """End the run: read the validator's summary (``network_attempts``) and wait for it."""
        try:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                self._proc.stdin.close()
            summary = self._next(timeout).get("summary")
            if isinstance(summary, dict):
                self.network_attempts = int(summary.get("networkAttempts", -1))
            self._proc.wait(timeout=timeout)
        except (ValidatorFailed, subprocess.TimeoutExpired, OSError):
            self._proc.kill()
            self._proc.wait(timeout=timeout)


def warning_kind(result: Result, issue: Issue) -> str:
    """A short name for a kind of warning, for the session summary."""
    location = issue.location.split("[")[0] if issue.location else result.resource_type
    return f"{issue.message_id or 'warning'} at {location}"


def describe(results: Iterable[Result], *, severities: tuple[str, ...] = ("error", "fatal")) -> str:
    """The issues of the given severities, one line each (for assertion messages)."""
    return "\n".join(
        f"{r.resource_type}/{r.id} {i.severity} {i.location}: {i.message}"
        for r in results
        for i in r.issues
        if i.severity in severities
    )
