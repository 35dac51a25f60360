"""Write a benchmark's result into its own section of docs/benchmarks.md."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path


def write_section(path: Path, name: str, body: str, *, command: str) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    block = (
        f"<!-- bench:{name} -->\n{body}\n\nMeasured {stamp}. Reproduce: `{command}`\n"
        f"<!-- /bench:{name} -->"
    )
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = (
        pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    path.write_text(text, encoding="utf-8")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc), 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


class CpuMeter:
    """CPU seconds used by named groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        self.used = {name: end[name] - self._start.get(name, 0.0) for name in end}
        return self.used


def machine_busy() -> Callable[[], float]:
    """Start measuring; the returned function gives the fraction of all CPUs busy since."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()

    def busy() -> float:
        total1, idle1 = sample()
        return 1 - (idle1 - idle0) / max(1, total1 - total0)

    return busy
