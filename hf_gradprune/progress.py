"""Progress events: how the one pipeline reports to the CLI (tqdm), the Space (gr.Progress) and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ProgressEvent:
    stage: str  # load | data | scan | verdict | prune | finetune | evaluate | save | done
    step: int = 0
    total: int | None = None
    message: str = ""
    values: dict = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]
