"""hf-gradprune: remove backdoors from Hub vision models by gradient-based pruning (conv filters, MLP neurons,
attention heads) + fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import build_config  # noqa: E402
from .errors import UserError  # noqa: E402
from .finetune import TuneConfig  # noqa: E402
from .job import BaselineConfig, JobConfig  # noqa: E402
from .methods import METHODS  # noqa: E402
from .prune import PruneConfig  # noqa: E402
from .triggers import TriggerSpec  # noqa: E402

if TYPE_CHECKING:
    from .job import JobResult


def run(*args: Any, **kwargs: Any) -> JobResult:
    """See :func:`hf_gradprune.pipeline.run` (imported lazily: the CLI starts fast)."""
    from .pipeline import run as _run
    return _run(*args, **kwargs)


__all__ = ["BaselineConfig", "JobConfig", "METHODS", "PruneConfig", "TuneConfig", "TriggerSpec", "UserError",
           "build_config", "run", "__version__"]
