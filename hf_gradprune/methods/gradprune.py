"""Grad-Prune (Dunnett et al., 2024): prune the units the unlearning loss points at (conv filters, MLP neurons,
attention heads: `units.find_units`), then fine-tune on clean + triggered-with-true-label images. The only method
that uses the triggered twins."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..finetune import finetune, probabilities, run_epochs, shifted_views
from ..plot import plot_curve, plot_rounds
from ..progress import ProgressEvent
from ..prune import PruneRound, gradient_prune, round_floor
from ..units import UnitPruner, count_kinds, find_units
from . import Defence

if TYPE_CHECKING:
    from pathlib import Path

    from ..finetune import TuneConfig, TuneResult
    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback
    from ..prune import PruneConfig


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    model, t = job.loaded.model, job.tensors
    timing = {}
    start = time.perf_counter()
    pruner = UnitPruner(find_units(model, job.loaded.net, t.train[:2]))
    if cfg.prune.max_rounds and not pruner.num_units:
        raise UserError(f"MODEL {job.loaded.source}: no prunable units found (conv filters into a batch norm, MLP "
                        "neurons, attention heads); fine-tune without pruning: --method ft")
    # what a triggered image should give: the original model's output on its CLEAN twin, taken before any change
    clean_outputs = probabilities(model, t.train, job.batch_size) if cfg.tune.distill > 0 else None
    views, shown = shifted_views(t.train, cfg.tune.clean_views, cfg.seed)
    view_outputs = (None if clean_outputs is None else
                    probabilities(model, views, job.batch_size) if len(views) else clean_outputs[:0])
    if cfg.prune.max_rounds:
        emit(ProgressEvent("prune", total=cfg.prune.max_rounds, message=f"scoring {describe_units(pruner.counts())}"))

    def on_round(r: PruneRound) -> None:
        emit(ProgressEvent("prune", step=r.round, total=cfg.prune.max_rounds, message=f"{r.layer} {r.kind} {r.index}",
                           values={"val_acc": r.val_acc, "val_unlearning_loss": r.val_unlearning_loss,
                                   "val_asr": r.val_asr}))
    pruned = gradient_prune(model, pruner, t.trig_train, t.train_y, t.val, t.trig_val, t.val_y,
                            cfg.prune, job.target, job.batch_size, on_round, job.procs, train_clean=t.train)
    timing["prune"] = time.perf_counter() - start
    timing["per_round"] = timing["prune"] / max(1, len(pruned.rounds))
    if cfg.measure_floor:
        checked = ((t.val, t.trig_val) if cfg.prune.check_on == "val" else
                   (torch.cat([t.val, t.train]), torch.cat([t.trig_val, t.trig_train])))
        timing["round_floor"] = round_floor(model, pruner, t.trig_train, t.train_y, *checked, job.batch_size)
    start = time.perf_counter()
    twins = cfg.tune.twin_repeats
    rows = torch.cat([t.train, *[t.trig_train] * twins, views])
    labels = torch.cat([t.train_y, *[t.train_y] * twins, t.train_y[shown]])
    soft = None if clean_outputs is None else torch.cat([clean_outputs, *[clean_outputs] * twins, view_outputs])
    epochs = run_epochs(cfg.tune, tuning_rows(cfg.tune, len(t.train_y)))
    emit(ProgressEvent("finetune", total=epochs, message="fine-tuning on clean + triggered images"))
    make_optimizer = None
    if cfg.tune.sam_rho > 0:
        from .ftsam import sam_optimizer
        make_optimizer = sam_optimizer(cfg.tune.sam_rho)
    tuned = finetune(model, rows, labels, t.val, t.val_y, cfg.tune, pruner, cfg.seed,
                     lambda e, loss: emit(ProgressEvent("finetune", step=e, total=epochs,
                                                        values={"val_loss": loss})), procs=job.procs,
                     reference_correct=round(pruned.base_val_acc * len(t.val_y)), val_triggered=t.trig_val,
                     make_optimizer=make_optimizer,
                     soft_targets=soft, chunk_size=job.batch_size)
    timing["finetune"] = time.perf_counter() - start
    layers = len({p["layer"] for p in pruned.pruned})
    where = "validation split" if cfg.prune.check_on == "val" else "clean few-shot images (train + validation)"
    skipped = (f" {pruned.skipped} units whose removal broke the bound were restored and never tried again."
               if pruned.skipped else "")
    kept = {"loss": "lowest clean validation loss",
            "unlearning_within_alpha": "lowest clean + unlearning validation loss within alpha",
            "unlearning": "lowest clean + unlearning validation loss",
            "latest_within_alpha": "latest epoch within alpha"}[cfg.tune.select]
    if cfg.prune.max_rounds == 0:
        pruning = (f"No unit pruned (the {cfg.recipe} recipe does not prune at 5 or more training images per class: "
                   f"after its fine-tuning, pruning was measured to cost clean accuracy and to remove no more of the "
                   f"backdoor; `--max-rounds N` prunes).")
    else:
        pruning = (f"{describe_units(count_kinds(pruned.pruned)) or 'no unit'} in {layers} layers pruned (of "
                   f"{describe_units(pruner.counts())}), chosen one per round by {score_desc(cfg.prune)}; pruning "
                   f"stopped after {len(pruned.rounds)} rounds "
                   f"({pruned.stop_reason}) and kept the round with the lowest unlearning loss within alpha = "
                   f"{cfg.prune.alpha}, both measured on the {where}.{skipped}")
    length = (f"{cfg.tune.schedule} over {epochs} epochs: about {cfg.tune.max_steps} optimiser steps"
              if cfg.tune.max_steps else cfg.tune.schedule)
    summary = (f"Recipe {cfg.recipe}. {pruning} Fine-tuning on clean + triggered images (lr {cfg.tune.lr:g}, "
               f"{length}; {targets(cfg.tune)}) ran {tuned.epochs} epochs and kept epoch "
               f"{tuned.best_epoch} ({kept}).")
    return Defence(pruned.pruned, pruner.num_units, summary, pruned.to_dict(), tuned, timing,
                   lambda path: plot_rounds(pruned, cfg.prune.alpha, path) if pruned.rounds else
                   plot_finetune(tuned, path))


def tuning_rows(tune_cfg: TuneConfig, n_train: int) -> int:
    """Rows of Grad-Prune's fine-tuning set: each clean training image, its twin `twin_repeats` times, its views."""
    return n_train * (1 + tune_cfg.twin_repeats + tune_cfg.clean_views)


def describe_units(counts: dict[str, int]) -> str:
    """{"filter": 3, "head": 1} -> "3 conv filters and 1 attention head"."""
    names = {"filter": "conv filter", "neuron": "MLP neuron", "head": "attention head"}
    parts = [f"{n} {names.get(k, k)}{'s' if n != 1 else ''}" for k, n in counts.items() if n]
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)


def plot_finetune(tuned: TuneResult, path: Path) -> Path:
    """Without pruning rounds the picture is the fine-tuning: how the validation losses moved, and the kept epoch."""
    series = {"clean val loss": tuned.val_losses}
    if len(tuned.val_unlearning_losses) == len(tuned.val_losses):
        series["val unlearning loss (triggered twins vs true labels)"] = tuned.val_unlearning_losses
    return plot_curve(path, f"Fine-tuning on clean + triggered images: {tuned.epochs} epochs", "epoch",
                      list(range(len(tuned.val_losses))), series, ylabel="cross-entropy",
                      marker=(tuned.best_epoch, f"kept: epoch {tuned.best_epoch}"))


def targets(tune_cfg: TuneConfig) -> str:
    """What fine-tuning teaches a clean image and its triggered twin."""
    parts = ["their true label"] if tune_cfg.hard_labels > 0 else []
    if tune_cfg.distill > 0:
        parts.append("the original model's output on the clean image" +
                     (f" (weight {tune_cfg.distill:g})" if tune_cfg.hard_labels > 0 else ""))
    both = "both learn " + " and ".join(parts)
    if tune_cfg.twin_repeats > 1:
        both += f", each twin counted {tune_cfg.twin_repeats} times"
    if tune_cfg.clean_views:
        both += (f"; {tune_cfg.clean_views} shifted copies of each clean image learn its true label and the original "
                 "model's output on the copy")
    return both


def score_desc(prune_cfg: PruneConfig) -> str:
    what = {"grad": "the mean absolute gradient of the unlearning loss",
            "grad_x_weight": "the mean absolute gradient x weight of the unlearning loss "
                             "(variant --score grad_x_weight)"}
    desc = what[prune_cfg.score]
    if prune_cfg.normalise == "layer":
        desc += ", divided by its layer's mean (variant --score-norm layer)"
    return desc

