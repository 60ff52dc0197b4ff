"""The result of ``lmtune check`` and the writer of its text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from lmtune.tools.check.memory import Engine, MemoryEstimate
from lmtune.tools.check.model import ModelFacts


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: ModelFacts | None = None
    memory: MemoryEstimate | None = None
    engine: Engine | None = None
    rows: int | None = None  # training rows (estimated unless rows_exact)
    rows_exact: bool = False
    iters_per_epoch: int | None = None
    optimizer_steps: int | None = None
    sample_text: str | None = None
    sample_trained: str | None = None


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else f"{text[:limit]} ... [{len(text) - limit:,} more characters]"



class Writer:
    """The report's text: sections and lines."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def section(self, title: str) -> None:
        self.out.write(f"\n== {title}\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")


__all__ = ["CheckReport", "Writer"]
