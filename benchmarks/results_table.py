"""Shared by the benchmark scripts: print a markdown table and record it in a results file."""
from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], output: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
