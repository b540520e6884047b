"""Progress events: how the one pipeline reports to the CLI (tqdm), the Space (gr.Progress) and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["load", "data", "scan", "verdict", "prune", "finetune", "evaluate", "save", "done"]


@dataclass
class ProgressEvent:
    stage: Stage
    step: int = 0
    total: int | None = None
    message: str = ""
    values: dict = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]
