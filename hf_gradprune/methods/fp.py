"""FP (Fine-Pruning, Liu et al. 2018): prune the feature channels feeding the classifier that clean images activate
least, 1 % of them per step, while validation accuracy stays within alpha; keep the LAST step within it (not the
first one past it), then fine-tune on clean images with those channels kept at zero.

A channel is removed by zeroing its column of the classifier weight: for global-pooled features this is exactly
the channel being absent, and it is baked into the saved weights (no hooks, no extra modules)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ..finetune import val_loss_acc
from ..layers import classifier_input_means, classifier_layer
from ..masks import ChannelMask
from ..plot import plot_curve
from ..progress import ProgressEvent
from ..prune import accuracy_dropped
from ..units import Unit
from . import Defence
from .ft import tune_clean

if TYPE_CHECKING:
    import torch.nn as nn

    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


def val_correct(model: nn.Module, job: Prepared, batch_size: int) -> int:
    t = job.tensors
    return val_loss_acc(model, t.val, t.val_y, batch_size, job.procs)[1]


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    model, t = job.loaded.model, job.tensors
    start = time.perf_counter()
    name, head = classifier_layer(job.loaded)
    means = classifier_input_means(model, head, t.train, job.batch_size)
    order = means.argsort(stable=True).tolist()  # least active first
    channels = len(order)
    step = max(1, math.ceil(cfg.baseline.fp_step * channels))
    n_val = len(t.val_y)
    base = val_correct(model, job, job.batch_size)
    mask, kept, curve = ChannelMask(), 0, [(0, base / n_val)]
    stop = "all channels but one step"
    emit(ProgressEvent("prune", total=channels // step, message=f"pruning the {channels} input channels of {name}"))
    for k in range(step, channels, step):
        for c in order[len(mask):k]:
            mask.zero(head.weight, 1, c)
        correct = val_correct(model, job, job.batch_size)
        curve.append((k, correct / n_val))
        emit(ProgressEvent("prune", step=k // step, total=channels // step, values={"val_acc": correct / n_val}))
        if accuracy_dropped(base, correct, n_val, cfg.prune.alpha):
            stop = "accuracy"
            break
        kept = k
    mask.undo_to(kept)
    timing = {"prune": time.perf_counter() - start}
    start = time.perf_counter()
    # alpha is one budget for the whole defence: fine-tuning is held to the model before pruning, not after it
    tuned = tune_clean(job, cfg, emit, cfg.baseline.tune, keep=mask, reference_correct=base,
                       what="fine-tuning on clean images with the pruned channels kept at zero")
    timing["finetune"] = time.perf_counter() - start
    changed = [Unit("feature", name, c, float(means[c])).to_dict() for c in order[:kept]]
    summary = (f"{kept} of the {channels} feature channels feeding `{name}` (the least activated by the clean images, "
               f"{step} per step) were pruned; the sweep stopped at {curve[-1][0]} ({stop}) and kept the last step "
               f"within alpha = {cfg.prune.alpha}. Fine-tuning on clean images then ran {tuned.epochs} epochs "
               f"(best: epoch {tuned.best_epoch}).")
    details = {"classifier": name, "step": step, "stop_reason": stop, "kept_channels": kept,
               "curve": [{"pruned": k, "val_acc": a} for k, a in curve]}
    return Defence(changed, channels, summary, details, tuned, timing,
                   lambda path: plot_curve(path, f"FP: pruning the inputs of {name}", "channels pruned",
                                           [k for k, _ in curve], {"val ACC (clean)": [100 * a for _, a in curve]},
                                           marker=(kept, f"kept: {kept}"),
                                           floor=(100 * (base / n_val - cfg.prune.alpha),
                                                  f"ACC floor (alpha={cfg.prune.alpha:g})")))

