"""The one fine-tuning loop every defence shares: Grad-Prune's repair stage, FT, FP, NAD, the NAD teacher and FT-SAM.

SGD with momentum and weight decay, optional cosine schedule and augmentation, early stop with patience Pt on what
`select` measures on the validation split (restoring the best epoch), masked channels re-zeroed after every step.
A method changes the loss (`loss_fn`) or the optimiser (`make_optimizer`), never the loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import SINGLE, Procs, synced_batch_norm
from .prune import accuracy_dropped

Augmentation = Literal["none", "crop", "crop-flip"]
AUGMENTATIONS: tuple[Augmentation, ...] = get_args(Augmentation)  # --augment's choices
Schedule = Literal["constant", "cosine"]
EpochSelect = Literal["loss", "latest_within_alpha", "unlearning_within_alpha", "unlearning"]  # TuneConfig.select


@dataclass
class TuneConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    patience: int = 10  # Pt
    max_epochs: int = 100
    max_steps: int | None = None  # the run (and the cosine schedule) ends after about this many optimiser steps:
    #                               ceil(max_steps / steps per epoch) epochs, at most max_epochs. Sets the length by
    #                               how far the weights move, whatever the number of classes (None: max_epochs)
    schedule: Schedule = "constant"  # "cosine": CosineAnnealingLR over max_epochs, as BackdoorBench's defences
    augment: Augmentation = "none"  # "crop": random crop with zero padding of 1/8 of the side; "crop-flip":
    #                                 + horizontal flip
    label_smoothing: float = 0.0
    select: EpochSelect = "loss"  # which epoch to keep: "loss" = the lowest clean val loss (Grad-Prune's paper
    #                               recipe); "latest_within_alpha" = the LATEST epoch whose clean val accuracy is
    #                               within alpha of the model's before fine-tuning, stopping after Pt epochs in a row
    #                               outside it (baselines: their val loss is lowest at the untouched backdoored
    #                               model, so "loss" would undo the defence);
    #                               "unlearning_within_alpha" = the lowest clean val loss + val unlearning loss (CE
    #                               of the triggered twins against their true labels: the training objective, on
    #                               held-out images) among epochs within alpha (needs the triggered val twins);
    #                               "unlearning" = the same objective with no accuracy bound (the validation split,
    #                               1 image per class at SPC 10, is then never what vetoes an epoch: distillation
    #                               holds accuracy)
    alpha: float = 0.10
    distill: float = 0.0  # weight of KL(soft target || model) where the method gives per-row soft targets (Grad-Prune:
    #                       the original model's output on the CLEAN image, for the clean image and its twin alike)
    hard_labels: float = 1.0  # weight of the cross-entropy against the true labels
    frozen_norm_stats: bool = False  # batch norms keep the statistics they came with (train in eval mode): batches
    #                                  half of triggered twins would otherwise move them away from clean images
    sam_rho: float = 0.0  # Grad-Prune: > 0 takes FT-SAM's adaptive sharpness-aware step (methods/ftsam.py) with
    #                       this rho
    clean_views: int = 0  # Grad-Prune: this many shifted copies of each clean training image (`shifted_views`) join
    #                       the fine-tuning, taught their true label and the original model's output on them, so the
    #                       unlearning must keep the original's behaviour on that many more clean images
    twin_repeats: int = 1  # Grad-Prune: each triggered twin is this many rows of the fine-tuning set, its weight in the
    #                        loss against the clean images and their views (more views hold the function harder)


@dataclass
class TuneResult:
    epochs: int  # epochs run
    best_epoch: int  # 0 = the model before any fine-tuning was best
    val_losses: list[float] = field(default_factory=list)  # index 0 = before fine-tuning
    val_accs: list[float] = field(default_factory=list)
    val_unlearning_losses: list[float] = field(default_factory=list)  # select "unlearning_within_alpha" only


class KeepsMask(Protocol):
    def reapply(self) -> None: ...


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
MakeOptimizer = Callable[[list[nn.Parameter], TuneConfig], torch.optim.Optimizer]


@torch.no_grad()
def val_loss_acc(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                 procs: Procs = SINGLE) -> tuple[float, int]:
    """Mean cross-entropy and correct count, read back in one host sync."""
    model.eval()

    def chunk(start: int, end: int) -> torch.Tensor:
        logits, y = model(pixels[start:end]), labels[start:end]
        return torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum().float()])
    loss, correct = procs.chunk_sums(len(labels), batch_size, 2, chunk)
    return loss / max(1, len(labels)), int(correct)


@torch.no_grad()
def probabilities(model: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's softmax output per image, chunked (soft targets for distillation)."""
    model.eval()
    return torch.cat([F.softmax(model(pixels[s:s + batch_size]), 1) for s in range(0, len(pixels), batch_size)])


def augment(pixels: torch.Tensor, mode: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 1/8 of the side, 4 px at 32x32) and horizontal flip on uint8 batches, on the device,
    drawn from a seeded CPU generator so runs repeat exactly."""
    if mode == "none":
        return pixels
    n, _, h, w = pixels.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(pixels, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    if mode == "crop-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip.to(out.device)] = out[flip.to(out.device)].flip(-1)
    return out


def shifted_views(pixels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`k` shifted copies of every image (a random crop of it zero-padded by 1/8 of its side, as `augment` draws),
    drawn once from `seed`, and per copy the row of `pixels` it shows. A shifted copy leaves a corner patch out or
    moves it, so only CLEAN images are shifted: a triggered twin keeps its trigger where the attacker put it."""
    src = torch.arange(len(pixels), device=pixels.device).repeat(k)
    return augment(pixels[src], "crop" if k else "none", torch.Generator().manual_seed(seed)), src


def finetune(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, val_pixels: torch.Tensor,
             val_labels: torch.Tensor, cfg: TuneConfig, keep: KeepsMask | None, seed: int,
             on_epoch: Callable[[int, float], None] | None = None, loss_fn: LossFn | None = None,
             make_optimizer: MakeOptimizer | None = None,
             reference_correct: int | None = None, procs: Procs = SINGLE,
             val_triggered: torch.Tensor | None = None, soft_targets: torch.Tensor | None = None,
             chunk_size: int = 256) -> TuneResult:
    """Train on (pixels, labels) and keep the epoch cfg.select picks. `reference_correct` is the validation count alpha
    is measured from, when that is not the model as it enters fine-tuning (FP and Grad-Prune: the model before their
    pruning). `val_triggered`: the triggered twins of `val_pixels`, for select "unlearning_within_alpha".
    `soft_targets`: a probability row per training row, distilled with weight cfg.distill (the default loss only).
    `chunk_size`: the most images one forward + backward takes (memory.py); a step's batch of cfg.batch_size images
    is accumulated over chunks of it (batch norm then normalises each chunk by its own statistics).

    On N processes every process draws the same global batches and augmentations and trains on its contiguous part
    of each (data-parallel through `accelerator.prepare`, batch norm over the global batch); the loss is scaled so
    that the averaged gradient is the global batch's mean, as on one process."""
    if loss_fn is None and soft_targets is not None:
        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = m(x)
            return (cfg.hard_labels * F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    + cfg.distill * F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean"))
    elif loss_fn is None:
        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (make_optimizer or _sgd)(params, cfg)
    epochs = run_epochs(cfg, len(labels))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) \
        if cfg.schedule == "cosine" else None  # stepped by hand once per epoch, on the unwrapped optimiser
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, len(val_labels))
    unlearning = cfg.select in ("unlearning_within_alpha", "unlearning")
    bounded = cfg.select != "unlearning"  # whether an epoch outside alpha may be kept
    if unlearning and val_triggered is None:
        raise ValueError(f"select '{cfg.select}' needs the triggered validation twins")
    best, start_correct = val_loss_acc(model, val_pixels, val_labels, chunk_size, procs)
    base_correct = start_correct if reference_correct is None else reference_correct
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = TuneResult(0, 0, [best], [start_correct / n_val])
    if unlearning:
        unlearning_loss = val_loss_acc(model, val_triggered, val_labels, chunk_size, procs)[0]
        result.val_unlearning_losses.append(unlearning_loss)
        # the model as it enters fine-tuning is the fallback; under a bound it competes only if it is within alpha
        best = (best + unlearning_loss
                if not (bounded and accuracy_dropped(base_correct, start_correct, n_val, cfg.alpha)) else float("inf"))
    since_best = 0
    train_model, train_opt = _prepare(model, opt, procs)
    smallest = max(2, procs.world)  # BatchNorm cannot train on one image; every process needs one
    chunk = max(2, chunk_size)
    with synced_batch_norm(model, procs):
        for epoch in range(1, epochs + 1):
            train_model.train()
            if cfg.frozen_norm_stats:
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            order = torch.randperm(len(labels), generator=gen).to(labels.device)
            for start in range(0, len(labels), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < smallest and len(labels) >= smallest:
                    continue
                x, y = augment(pixels[idx], cfg.augment, gen), labels[idx]  # the global batch, on every process
                part = procs.shard(len(idx))
                x, y, scale = x[part], y[part], len(y[part]) * procs.world / len(idx)
                extra = () if soft_targets is None else (soft_targets[idx][part],)

                def closure(x: torch.Tensor = x, y: torch.Tensor = y, extra: tuple[torch.Tensor, ...] = extra,
                            scale: float = scale) -> torch.Tensor:  # this step's batch
                    train_opt.zero_grad(set_to_none=True)
                    if len(y) <= chunk:
                        loss = loss_fn(train_model, x, y, *extra)
                        _backward(loss * scale if scale != 1 else loss, procs)
                        return loss
                    total = 0.0
                    parts = _chunks(len(y), chunk)
                    for k, part in enumerate(parts):  # the step's mean loss, a chunk at a time
                        share = (part.stop - part.start) / len(y)
                        with _no_sync(train_model, procs, k < len(parts) - 1):
                            loss = loss_fn(train_model, x[part], y[part], *(e[part] for e in extra))
                            _backward(loss * (share * scale), procs)
                        total = total + loss.detach() * share
                    return total
                train_opt.step(closure)
                if keep is not None:
                    keep.reapply()
            if sched is not None:
                sched.step()
            loss, correct = val_loss_acc(model, val_pixels, val_labels, chunk_size, procs)
            result.epochs = epoch
            result.val_losses, result.val_accs = result.val_losses + [loss], result.val_accs + [correct / n_val]
            if on_epoch:
                on_epoch(epoch, loss)
            within = not accuracy_dropped(base_correct, correct, n_val, cfg.alpha)
            if cfg.select == "loss":
                better, value = loss < best, loss
            elif unlearning:
                unlearning_loss = val_loss_acc(model, val_triggered, val_labels, chunk_size, procs)[0]
                result.val_unlearning_losses.append(unlearning_loss)
                value = loss + unlearning_loss
                better = (within or not bounded) and value < best
            else:
                better, value = within, best
            if better:
                best, since_best, result.best_epoch = value, 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break
    _release(model, procs)
    model.load_state_dict(best_state)
    model.eval()
    return result


def run_epochs(cfg: TuneConfig, n_rows: int) -> int:
    """The epochs a run takes: max_epochs, or fewer where max_steps optimiser steps are reached first."""
    if cfg.max_steps is None:
        return cfg.max_epochs
    per_epoch = max(1, math.ceil(n_rows / cfg.batch_size))
    return min(cfg.max_epochs, max(1, math.ceil(cfg.max_steps / per_epoch)))


def _prepare(model: nn.Module, opt: torch.optim.Optimizer, procs: Procs) -> tuple[nn.Module, torch.optim.Optimizer]:
    """DDP and mixed precision come from accelerate; one plain process trains the model as it is."""
    return procs.accelerator.prepare(model, opt) if procs.wraps else (model, opt)


def _chunks(n: int, size: int) -> list[slice]:
    """Rows 0..n in chunks of at most `size`, none of one row (batch norm cannot train on one image)."""
    cuts = list(range(0, n, size)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < 2:
        cuts.pop(-2)
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def _no_sync(model: nn.Module, procs: Procs, skip: bool) -> contextlib.AbstractContextManager[None]:
    """Across processes, gradients are averaged once per step, after its last chunk."""
    return procs.accelerator.no_sync(model) if skip and procs.world > 1 else contextlib.nullcontext()


def _backward(loss: torch.Tensor, procs: Procs) -> None:
    if procs.wraps:
        procs.accelerator.backward(loss)
    else:
        loss.backward()


def _release(model: nn.Module, procs: Procs) -> None:
    """Drop the DDP wrapper and the mixed-precision forward, so that evaluation and saving see the plain model."""
    if not procs.wraps:
        return
    procs.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    procs.accelerator.free_memory()


def _sgd(params: list[nn.Parameter], cfg: TuneConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
