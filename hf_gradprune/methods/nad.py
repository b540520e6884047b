"""NAD (Li et al., 2021): fine-tune a copy of the model on the clean images for a few epochs (the teacher), then
train the model on the same images with cross-entropy plus attention-distillation losses that pull the attention
maps of its last stages towards the teacher's (betas 500 / 1000 / 1000, p = 2, as BackdoorBench's NAD)."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..layers import stage_outputs
from ..plot import plot_tuning
from . import Defence
from .ft import tune_clean

if TYPE_CHECKING:
    import torch.nn as nn

    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


def attention(features: torch.Tensor, p: float) -> torch.Tensor:
    """Spatial attention map: channel mean of |f|^p, flattened and L2-normalised per image. Feature maps are
    (N, C, H, W); a transformer's hidden states (N, tokens, C) give one value per token."""
    channel_dim = 1 if features.dim() == 4 else -1
    return F.normalize(features.abs().pow(p).mean(channel_dim).flatten(1), dim=1)


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    b = cfg.baseline
    start = time.perf_counter()
    teacher_job = replace(job, loaded=replace(job.loaded, model=copy.deepcopy(job.loaded.model)))
    teacher_tuned = tune_clean(teacher_job, cfg, emit, replace(b.tune, max_epochs=b.nad_teacher_epochs),
                               what=f"fine-tuning the teacher ({b.nad_teacher_epochs} epochs)")
    teacher = teacher_job.loaded.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    timing = {"teacher": time.perf_counter() - start}
    n = len(b.nad_betas)
    student_forward, teacher_forward = stage_outputs(job.loaded, n), stage_outputs(teacher_job.loaded, n)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, feats = student_forward(x)
        with torch.no_grad():
            _, teacher_feats = teacher_forward(x)
        at = sum(beta * (attention(s, b.nad_power) - attention(t, b.nad_power)).pow(2).mean()
                 for beta, s, t in zip(b.nad_betas, feats, teacher_feats))
        return F.cross_entropy(logits, y) + at

    start = time.perf_counter()
    tuned = tune_clean(job, cfg, emit, b.tune, loss_fn=loss_fn, what="attention distillation from the teacher")
    timing["finetune"] = time.perf_counter() - start
    summary = (f"No channel was pruned. A teacher was fine-tuned on the clean images for {teacher_tuned.epochs} "
               f"epochs; the model was then trained on them with cross-entropy + attention distillation on its last "
               f"{n} stages (betas {', '.join(f'{x:g}' for x in b.nad_betas)}, p {b.nad_power:g}) for {tuned.epochs} "
               f"epochs (best: epoch {tuned.best_epoch}).")
    details = {"betas": list(b.nad_betas), "p": b.nad_power, "teacher": {"epochs": teacher_tuned.epochs,
                                                                         "best_epoch": teacher_tuned.best_epoch}}
    return Defence([], 0, summary, details, tuned, timing,
                   lambda path: plot_tuning(tuned, "NAD: attention distillation (student)", path))
