"""FT-SAM (Zhu et al., 2023): clean fine-tuning with adaptive sharpness-aware minimisation (ASAM) and label
smoothing; rho 2.0 / smoothing 0.1 are FT-SAM's CIFAR-10 settings, 8.0 / 0.0 its GTSRB ones."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..plot import plot_tuning
from . import Defence
from .ft import tune_clean

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch.nn as nn

    from ..finetune import MakeOptimizer, TuneConfig
    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


def sam_optimizer(rho: float, adaptive: bool = True) -> MakeOptimizer:
    """finetune()'s make_optimizer for a SAM step of this rho, at the TuneConfig's lr / momentum / weight decay."""
    def make(params: list[nn.Parameter], tc: TuneConfig) -> SAM:
        return SAM(params, rho, adaptive, tc.lr, tc.momentum, tc.weight_decay)
    return make


class SAM(torch.optim.Optimizer):
    """Sharpness-aware step: climb to w + e (e = rho * T^2 g / ||T g||, T = |w| when adaptive, else 1), take the
    gradient there, come back and let the base SGD step with it. `step` needs the closure that recomputes the loss."""

    def __init__(self, params: Iterable[nn.Parameter], rho: float, adaptive: bool, lr: float, momentum: float,
                 weight_decay: float) -> None:
        super().__init__(params, dict(rho=rho, adaptive=adaptive, lr=lr))
        self.base = torch.optim.SGD(self.param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.param_groups = self.base.param_groups
        self.defaults.update(self.base.defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        group_params = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        scaled = [(p.abs() if g["adaptive"] else torch.ones_like(p)) * p.grad for g, p in group_params]
        norm = torch.linalg.vector_norm(torch.stack([s.norm(2) for s in scaled])) if scaled else torch.tensor(0.0)
        climbs = []
        for (g, p), s in zip(group_params, scaled):
            e = s * (p.abs() if g["adaptive"] else 1.0) * (g["rho"] / (norm + 1e-12))
            p.add_(e)
            climbs.append((p, e))
        with torch.enable_grad():
            closure()
        for p, e in climbs:
            p.sub_(e)
        self.base.step()
        return loss


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    b = cfg.baseline
    tune_cfg = replace(b.tune, label_smoothing=b.sam_label_smoothing)
    start = time.perf_counter()

    make_optimizer = sam_optimizer(b.sam_rho, b.sam_adaptive)
    tuned = tune_clean(job, cfg, emit, tune_cfg, make_optimizer=make_optimizer,
                       what="fine-tuning on clean images with "
                            f"{'adaptive ' if b.sam_adaptive else ''}SAM (rho {b.sam_rho:g})")
    summary = ("No channel was pruned. Fine-tuning on the clean few-shot images with "
               f"{'adaptive ' if b.sam_adaptive else ''}sharpness-aware minimisation (rho {b.sam_rho:g}, "
               f"label smoothing {b.sam_label_smoothing:g}) ran {tuned.epochs} epochs "
               f"(best: epoch {tuned.best_epoch}).")
    return Defence([], 0, summary, {"rho": b.sam_rho, "adaptive": b.sam_adaptive,
                                    "label_smoothing": b.sam_label_smoothing}, tuned,
                   {"finetune": time.perf_counter() - start},
                   lambda path: plot_tuning(tuned, "FT-SAM: clean fine-tuning", path))
