"""The job's records, below the pipeline and the defences that both read them: what was asked (JobConfig and the
baselines' settings), what a defence gets (Prepared, FewShotTensors), what the caller gets back (JobResult)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data import FewShot, train_per_class
from .finetune import TuneConfig
from .hub import LoadedModel
from .memory import BatchChoice
from .names import public_name
from .parallel import Procs
from .prune import PruneConfig
from .recipes import DEFAULT_RECIPE, recipe_configs
from .synth import ScanConfig, ScanResult
from .triggers import UNKNOWN, TriggerSpec

if TYPE_CHECKING:
    from .memory import Auto
    from .methods import Method  # methods/ imports this module: a run-time import would be a cycle
    from .parallel import MixedPrecision
    from .recipes import Recipe
    from .report import Report  # report.py imports methods/, which import this module


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
class JobConfig:
    model: str
    data: str
    output: str | None = None  # default ./<model-name>-gradprune
    revision: str | None = None
    data_revision: str | None = None
    split: str = "train"  # few-shot pool
    eval_split: str | None = None  # None: "test" if the dataset has it, else the pool minus the few-shot draw
    image_column: str | None = None
    label_column: str | None = None
    spc: int = 10  # images per class, train + val
    val_ratio: float = 0.1
    seed: int = 0
    eval_limit: int | None = None
    trigger: TriggerSpec = field(default_factory=TriggerSpec)
    backdoor_data: str | None = None  # the defender's own triggered copies, row-aligned with --data
    target: str = "auto"
    method: Method = "gradprune"  # or a baseline: ft, fp, nad, clp, ftsam, anp (see methods/)
    recipe: Recipe = DEFAULT_RECIPE  # Grad-Prune's recipe (recipes.py): "robust" (default) or "paper"
    prune: PruneConfig | None = None  # Grad-Prune (default: the recipe's); alpha also bounds FP's and ANP's sweeps
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    tune: TuneConfig | None = None  # Grad-Prune's fine-tuning (default: the recipe's)
    batch_size: int | Auto = "auto"  # images per forward + backward (memory.py): "auto" fits it to max_memory
    max_memory: int | None = None  # bytes one batch's activations may take (default: memory.memory_budget)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    device: str | None = None  # default: accelerate's choice (GPU when there is one); one process only
    mixed_precision: MixedPrecision | None = None  # for fine-tuning; default: accelerate's config
    repo_id: str | None = None  # where the card says the model lives, when it is pushed
    command: str | None = None  # the command as published in the card: token removed, paths by name (config.py)
    source_id: str | None = None  # the Hub repo a local MODEL folder lives at (--source-id): the card's base_model
    data_id: str | None = None  # the Hub repo a local --data folder lives at (--data-id): the card's datasets
    measure_floor: bool = False  # benchmarks: time one unavoidable round (fwd+bwd train + fwd val) for comparison
    blind: bool = False  # defend as under --trigger unknown; the given trigger only measures ACC / ASR / RA
    force: bool = False  # --trigger unknown: defend even when the scan finds no backdoor
    from_scan: str | None = None  # an earlier `scan`'s output folder: its triggers, instead of scanning again
    scan: ScanConfig = field(default_factory=ScanConfig)

    def __post_init__(self) -> None:
        prune, tune = recipe_configs(self.recipe, train_per_class(self.spc, self.val_ratio), self.synthesises)
        self.prune = self.prune or prune
        self.tune = self.tune or tune

    def scan_config(self, chunk_size: int | None = None) -> ScanConfig:
        """The scan's settings under the job's seed (every process, and every later round, draws the same) and
        the job's memory batch."""
        return replace(self.scan, seed=self.seed, chunk_size=chunk_size)

    @property
    def synthesises(self) -> bool:
        """The defence stamps a synthesised trigger (the real one unknown, or hidden from it under --blind)."""
        return self.blind or self.trigger.kind == UNKNOWN

    @property
    def model_shown(self) -> str:
        """What the card, report and progress call the model: its Hub id or ./<folder name> (names.py)."""
        return public_name(self.model, self.source_id)

    @property
    def data_shown(self) -> str:
        return public_name(self.data, self.data_id)


@dataclass
class JobResult:
    output_dir: Path
    report: Report
    is_main: bool = True  # False on the other processes of an `accelerate launch` job: they print and push nothing
    samples: dict[str, np.ndarray] | None = None  # uint8 (K, 3, H, W) "clean" / "triggered" pixels of report["preview"]
    written: bool = True  # False: --trigger unknown found no backdoor and wrote nothing (report: the scan's)
    scan: ScanResult | None = None


@dataclass(frozen=True)
class FewShotTensors:
    """The images a defence reads, each made once before the loop. The few-shot train / val pixels (uint8), their
    triggered twins and their TRUE labels live on the device; the test set stays in host memory, or is a
    streaming.StreamedImages (decoded a chunk at a time) when it is too large to hold. Frozen: a later synthesis
    round gets a copy with new twins (`restamped`), so no reader sees the triggers change under it."""
    train: torch.Tensor
    train_y: torch.Tensor
    trig_train: torch.Tensor
    val: torch.Tensor
    val_y: torch.Tensor
    trig_val: torch.Tensor
    test: torch.Tensor
    test_y: torch.Tensor
    trig_test: torch.Tensor

    def restamped(self, trig_train: torch.Tensor, trig_val: torch.Tensor) -> FewShotTensors:
        return replace(self, trig_train=trig_train, trig_val=trig_val)


@dataclass
class Prepared:
    """A job's model and data on the device, ready for the defence: every tensor made once, before the loop."""
    loaded: LoadedModel
    data: FewShot
    meta: dict
    tensors: FewShotTensors | None  # None when untouched
    target: int  # the class the defence works against (under --blind: the one the scan found)
    target_auto: bool
    trigger: str
    procs: Procs = field(default_factory=Procs)  # this process's share of an `accelerate launch` job
    scan: ScanResult | None = None  # the trigger unknown: what the scan found and synthesised
    measure_target: int | None = None  # the target ACC / ASR / RA count against, when not `target` (--blind)
    untouched: bool = False  # the scan found no backdoor and --force was not given: no tensors, nothing to defend
    batch: BatchChoice | None = None  # images per forward + backward, as chosen for this model and device

    @property
    def batch_size(self) -> int:
        return self.batch.batch_size if self.batch else 256

    @property
    def metrics_target(self) -> int:
        return self.target if self.measure_target is None else self.measure_target
