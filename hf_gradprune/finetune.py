"""Fine-tuning after pruning: clean images and their triggered twins, both with TRUE labels.

SGD lr 1e-3, momentum 0.9, wd 5e-4, batch 128, no augmentation; early stop on the clean validation loss with
patience Pt, restoring the best epoch. Pruned channels are re-zeroed after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prune import FilterPruner


@dataclass
class TuneConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    patience: int = 10  # Pt
    max_epochs: int = 100


@dataclass
class TuneResult:
    epochs: int  # epochs run
    best_epoch: int  # 0 = the pruned model before any fine-tuning was best
    val_losses: list[float] = field(default_factory=list)  # index 0 = before fine-tuning


@torch.no_grad()
def mean_loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    total = torch.zeros((), device=labels.device)
    for start in range(0, len(labels), batch_size):
        total += F.cross_entropy(model(pixels[start:start + batch_size]), labels[start:start + batch_size], reduction="sum")
    return total.item() / max(1, len(labels))


def finetune(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, val_pixels: torch.Tensor,
             val_labels: torch.Tensor, cfg: TuneConfig, pruner: FilterPruner | None, seed: int,
             on_epoch: Callable[[int, float], None] | None = None) -> TuneResult:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best_loss = mean_loss(model, val_pixels, val_labels)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = TuneResult(0, 0, [best_loss])
    since_best = 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=gen).to(labels.device)
        for start in range(0, len(labels), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2 and len(labels) >= 2:  # BatchNorm cannot train on a batch of one
                continue
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(pixels[idx]), labels[idx]).backward()
            opt.step()
            if pruner is not None:
                pruner.reapply()
        loss = mean_loss(model, val_pixels, val_labels)
        result.epochs, result.val_losses = epoch, result.val_losses + [loss]
        if on_epoch:
            on_epoch(epoch, loss)
        if loss < best_loss:
            best_loss, since_best, result.best_epoch = loss, 0, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return result
