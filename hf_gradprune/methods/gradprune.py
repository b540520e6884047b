"""Grad-Prune (Dunnett et al., 2024): prune the filters the unlearning loss points at, then fine-tune on clean +
triggered-with-true-label images. The only method that uses the triggered twins."""

from __future__ import annotations

import time
import torch

from ..finetune import finetune
from ..plot import plot_rounds
from ..progress import ProgressEvent
from ..prune import FilterPruner, PruneRound, gradient_prune, round_floor
from . import Defence


def defend(job, cfg, emit) -> Defence:
    model, t = job.loaded.model, job.tensors
    timing = {}
    start = time.perf_counter()
    pruner = FilterPruner(model, job.loaded.net, t["train"][:1])
    emit(ProgressEvent("prune", total=cfg.prune.max_rounds, message=f"scoring {pruner.num_filters} filters"))

    def on_round(r: PruneRound) -> None:
        emit(ProgressEvent("prune", step=r.round, total=cfg.prune.max_rounds, message=f"{r.layer}[{r.filter}]",
                           values={"val_acc": r.val_acc, "val_unlearning_loss": r.val_unlearning_loss, "val_asr": r.val_asr}))
    pruned = gradient_prune(model, pruner, t["trig_train"], t["train_y"], t["val"], t["trig_val"], t["val_y"],
                            cfg.prune, job.target, cfg.batch_size, on_round, job.procs)
    timing["prune"] = time.perf_counter() - start
    timing["per_round"] = timing["prune"] / max(1, len(pruned.rounds))
    if cfg.measure_floor:
        timing["round_floor"] = round_floor(model, pruner.convs, t["trig_train"], t["train_y"], t["val"], t["trig_val"],
                                            cfg.batch_size)
    start = time.perf_counter()
    emit(ProgressEvent("finetune", total=cfg.tune.max_epochs, message="fine-tuning on clean + triggered images"))
    tuned = finetune(model, torch.cat([t["train"], t["trig_train"]]), torch.cat([t["train_y"], t["train_y"]]),
                     t["val"], t["val_y"], cfg.tune, pruner, cfg.seed,
                     lambda e, loss: emit(ProgressEvent("finetune", step=e, total=cfg.tune.max_epochs,
                                                        values={"val_loss": loss})), procs=job.procs)
    timing["finetune"] = time.perf_counter() - start
    layers = len({p["layer"] for p in pruned.pruned})
    summary = (f"{len(pruned.pruned)} filters in {layers} conv layers (of {pruner.num_filters} filters), chosen one per "
               f"round by {score_desc(cfg.prune)}; pruning stopped after {len(pruned.rounds)} rounds "
               f"({pruned.stop_reason}) and kept the round with the lowest validation unlearning loss within "
               f"alpha = {cfg.prune.alpha}. Fine-tuning on clean + triggered images ran {tuned.epochs} epochs "
               f"(best: epoch {tuned.best_epoch}).")
    return Defence(pruned.pruned, pruner.num_filters, summary, pruned.to_dict(), tuned, timing,
                   lambda path: plot_rounds(pruned, cfg.prune.alpha, path))


def score_desc(prune_cfg) -> str:
    what = {"grad": "the mean absolute gradient of the unlearning loss",
            "grad_x_weight": "the mean absolute gradient x weight of the unlearning loss (variant --score grad_x_weight)"}
    desc = what[prune_cfg.score]
    if prune_cfg.normalise == "layer":
        desc += ", divided by its layer's mean (variant --score-norm layer)"
    return desc

