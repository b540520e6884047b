"""The defences `--method` chooses from. Each module has one `defend(job, cfg, emit) -> Defence` and reuses the
shared pieces: the prepared few-shot tensors, the fine-tuning loop, the channel masks and the metrics.

What each method may use is what a defender has: the clean few-shot train split, the validation split where the
method selects something (never the test set), the triggered twins only for Grad-Prune, nothing for CLP.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..finetune import TuneResult
from ..job import JobConfig, Prepared
from ..progress import ProgressCallback

Method = Literal["gradprune", "ft", "fp", "nad", "clp", "ftsam", "anp"]  # keep equal to METHODS' keys
# name -> (title, one line on what it does, reference)
METHODS: dict[Method, tuple[str, str, str]] = {
    "gradprune": ("Grad-Prune", "unlearning the trigger through the unlearning loss (triggered images against their "
                  "true labels): gradient-based pruning of conv filters and fine-tuning, as the recipe below says",
                  "Dunnett et al., Unlearning Backdoor Attacks through Gradient-Based Model Pruning, 2024"),
    "ft": ("FT", "fine-tuning on the clean few-shot images", "BackdoorBench (Wu et al., 2022) baseline"),
    "fp": ("FP", "pruning the least-activated channels feeding the classifier, then fine-tuning",
           "Liu et al., Fine-Pruning, RAID 2018"),
    "nad": ("NAD", "attention distillation from a fine-tuned teacher",
            "Li et al., Neural Attention Distillation, ICLR 2021"),
    "clp": ("CLP", "data-free pruning of channels with a large Lipschitz upper bound",
            "Zheng et al., Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022"),
    "ftsam": ("FT-SAM", "fine-tuning with adaptive sharpness-aware minimisation",
              "Zhu et al., Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization, ICCV 2023"),
    "anp": ("ANP", "pruning batch-norm channels whose masks shrink under adversarial neuron perturbation",
            "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"),
}


@dataclass
class Defence:
    """What a defence did, for the report, the card and the plot."""
    changed: list[dict]  # every unit it zeroed: units.Unit.to_dict() ({"kind", "layer", "index", "score"})
    candidates: int  # how many channels it could have zeroed
    summary: str  # one sentence for the card
    details: dict  # the method's own record (rounds, thresholds, teacher, ...) for the report
    tune: TuneResult | None = None
    timing: dict = field(default_factory=dict)
    plot: Callable[[Path], object] | None = None


def defend(method: Method, job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    """Run one defence; `pipeline.run` has already checked the name, before anything was loaded."""
    return importlib.import_module(f".{method}", __name__).defend(job, cfg, emit)

