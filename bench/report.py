"""Write a benchmark's result into its own section of docs/benchmarks.md."""

from __future__ import annotations

import re
import time
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
