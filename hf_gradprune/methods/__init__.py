"""The defences `--method` chooses from. Each module has one `defend(job, cfg, emit) -> Defence` and reuses the
shared pieces: the prepared few-shot tensors, the fine-tuning loop, the channel masks and the metrics.

What each method may use is what a defender has: the clean few-shot train split, the validation split where the
method selects something (never the test set), the triggered twins only for Grad-Prune, nothing for CLP.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..finetune import TuneConfig, TuneResult
from ..progress import ProgressCallback

if TYPE_CHECKING:
    from ..pipeline import JobConfig, Prepared

# name -> (title, one line on what it does, reference)
METHODS: dict[str, tuple[str, str, str]] = {
    "gradprune": ("Grad-Prune", "unlearning the trigger through the unlearning loss (triggered images against their "
                  "true labels): gradient-based pruning of conv filters and fine-tuning, as the recipe below says",
                  "Dunnett et al., Unlearning Backdoor Attacks through Gradient-Based Model Pruning, 2024"),
    "ft": ("FT", "fine-tuning on the clean few-shot images", "BackdoorBench (Wu et al., 2022) baseline"),
    "fp": ("FP", "pruning the least-activated channels feeding the classifier, then fine-tuning",
           "Liu et al., Fine-Pruning, RAID 2018"),
    "nad": ("NAD", "attention distillation from a fine-tuned teacher", "Li et al., Neural Attention Distillation, ICLR 2021"),
    "clp": ("CLP", "data-free pruning of channels with a large Lipschitz upper bound",
            "Zheng et al., Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022"),
    "ftsam": ("FT-SAM", "fine-tuning with adaptive sharpness-aware minimisation",
              "Zhu et al., Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization, ICCV 2023"),
    "anp": ("ANP", "pruning batch-norm channels whose masks shrink under adversarial neuron perturbation",
            "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"),
}


def _baseline_tune() -> TuneConfig:
    # BackdoorBench's fine-tuning defences: SGD lr 0.01 cosine over 100 epochs, momentum 0.9, wd 5e-4, training
    # augmentation. Here they keep the latest epoch whose clean validation accuracy is within alpha of the start and
    # stop early only after Pt epochs in a row outside it
    return TuneConfig(lr=0.01, schedule="cosine", augment="crop-flip", select="latest_within_alpha")


@dataclass
class BaselineConfig:
    tune: TuneConfig = field(default_factory=_baseline_tune)  # FT, FP, NAD (student and teacher), FT-SAM
    fp_step: float = 0.01  # share of the classifier's input channels pruned per step
    nad_teacher_epochs: int = 10
    nad_betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)  # attention loss weights for the last stages, in order
    nad_power: float = 2.0
    clp_u: float = 3.0  # prune channels above mean + u * std of their layer
    sam_rho: float = 2.0  # FT-SAM's CIFAR-10 setting (GTSRB: 8.0)
    sam_adaptive: bool = True
    sam_label_smoothing: float = 0.1  # FT-SAM's CIFAR-10 setting (GTSRB: 0.0)
    anp_eps: float = 0.4
    anp_steps: int = 1
    anp_alpha: float = 0.2  # weight of the clean loss against the perturbed loss
    anp_iters: int = 2000
    anp_mask_lr: float = 0.2
    anp_batch_size: int = 128
    anp_max_threshold: float = 0.90
    anp_threshold_step: float = 0.05


@dataclass
class Defence:
    """What a defence did, for the report, the card and the plot."""
    changed: list[dict]  # every channel it zeroed: {"layer", "filter" | "input_channel" | "channel", "score"}
    candidates: int  # how many channels it could have zeroed
    summary: str  # one sentence for the card
    details: dict  # the method's own record (rounds, thresholds, teacher, ...) for the report
    tune: TuneResult | None = None
    timing: dict = field(default_factory=dict)
    plot: Callable[[Path], object] | None = None


def defend(method: str, job: "Prepared", cfg: "JobConfig", emit: ProgressCallback) -> Defence:
    """Run one defence; `pipeline.run` has already checked the name, before anything was loaded."""
    return importlib.import_module(f".{method}", __name__).defend(job, cfg, emit)


def changed_index(entry: dict) -> int:
    return entry.get("filter", entry.get("input_channel", entry.get("channel")))
