"""FT: fine-tune on the clean few-shot images (BackdoorBench's recipe: SGD lr 0.01 cosine, training augmentation),
early-stopped on the clean validation split."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..finetune import finetune, run_epochs
from ..plot import plot_tuning
from ..progress import ProgressEvent
from . import Defence

if TYPE_CHECKING:
    from ..finetune import KeepsMask, LossFn, MakeOptimizer, TuneConfig, TuneResult
    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


def tune_clean(job: Prepared, cfg: JobConfig, emit: ProgressCallback, tune_cfg: TuneConfig,
               keep: KeepsMask | None = None, loss_fn: LossFn | None = None,
               make_optimizer: MakeOptimizer | None = None, what: str = "fine-tuning on clean images",
               reference_correct: int | None = None) -> TuneResult:
    """The clean fine-tuning every fine-tuning baseline runs (FT, FP's repair, NAD's teacher and student, FT-SAM)."""
    t = job.tensors
    epochs = run_epochs(tune_cfg, len(t.train_y))
    emit(ProgressEvent("finetune", total=epochs, message=what))
    return finetune(job.loaded.model, t.train, t.train_y, t.val, t.val_y, tune_cfg, keep, cfg.seed,
                    lambda e, loss: emit(ProgressEvent("finetune", step=e, total=epochs,
                                                       values={"val_loss": loss})),
                    loss_fn=loss_fn, make_optimizer=make_optimizer, reference_correct=reference_correct,
                    procs=job.procs, chunk_size=job.batch_size)


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    start = time.perf_counter()
    tune_cfg = cfg.baseline.tune
    tuned = tune_clean(job, cfg, emit, tune_cfg)
    summary = (f"No channel was pruned. Fine-tuning on the clean few-shot images (lr {tune_cfg.lr:g}, "
               f"{tune_cfg.schedule}, augmentation {tune_cfg.augment}) ran {tuned.epochs} epochs "
               f"(best: epoch {tuned.best_epoch}).")
    return Defence([], 0, summary, {}, tuned, {"finetune": time.perf_counter() - start},
                   lambda path: plot_tuning(tuned, "FT: clean fine-tuning", path))
