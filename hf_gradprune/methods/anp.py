"""ANP (Wu & Wang, 2021): learn a mask in [0, 1] for every batch-norm channel so that the model stays accurate on
clean images even when every channel's scale and shift are perturbed adversarially (eps 0.4, one signed step);
channels a backdoor relies on are fragile and their masks shrink. Then prune (zero the norm's scale of) channels
whose mask is below a threshold: the largest threshold in 0.05 steps up to 0.90 whose validation accuracy stays
within alpha.

The masks act through forward hooks on the norm layers, so the model itself is never rebuilt; they are learned
with the model in eval mode (ANP's code trains in train mode, which on a few-shot batch would overwrite every
norm's running statistics with those of a handful of images)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..layers import batch_norms
from ..masks import ChannelMask
from ..plot import plot_curve
from ..progress import ProgressEvent
from ..prune import accuracy_dropped
from ..units import Unit, grads_only_for
from . import Defence
from .fp import val_correct

if TYPE_CHECKING:
    import torch.nn as nn

    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


class Perturbation:
    """Per-channel mask m and noises (d, x) on a norm's affine output: y = (w (m + d)) x_hat + b (1 + x)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        c, dev = norm.num_features, norm.weight.device
        self.mask = torch.ones(c, device=dev, requires_grad=True)
        self.noise_w = torch.zeros(c, device=dev, requires_grad=True)
        self.noise_b = torch.zeros(c, device=dev, requires_grad=True)
        self.perturbed = False
        self.handle = norm.register_forward_hook(self.hook)

    def hook(self, mod: nn.modules.batchnorm._BatchNorm, inp: tuple[torch.Tensor, ...],
             out: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        bias = mod.bias.view(shape)
        coeff_w = self.mask + self.noise_w if self.perturbed else self.mask
        coeff_b = 1 + self.noise_b if self.perturbed else torch.ones_like(self.noise_b)
        return (out - bias) * coeff_w.view(shape) + bias * coeff_b.view(shape)


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    b, model, t = cfg.baseline, job.loaded.model, job.tensors
    norms = batch_norms(job.loaded, "anp")
    start = time.perf_counter()
    perts = [Perturbation(n) for _, n in norms]
    masks = [q.mask for q in perts]
    noises = [x for q in perts for x in (q.noise_w, q.noise_b)]
    opt = torch.optim.SGD(masks, lr=b.anp_mask_lr, momentum=0.9)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = t.train, t.train_y
    order, pos = torch.randperm(len(y_all), generator=gen), 0
    model.eval()
    emit(ProgressEvent("prune", total=b.anp_iters, message=f"learning masks for {sum(len(m) for m in masks)} "
                                                            f"batch-norm channels ({b.anp_iters} iterations)"))
    with grads_only_for(model, []):  # only the masks learn
        try:
            for it in range(1, b.anp_iters + 1):
                if pos >= len(order):
                    order, pos = torch.randperm(len(y_all), generator=gen), 0
                idx = order[pos:pos + b.anp_batch_size].to(y_all.device)
                pos += b.anp_batch_size
                x, y = x_all[idx], y_all[idx]
                with torch.no_grad():  # random start in [-eps, eps]
                    for v in noises:
                        v.uniform_(-b.anp_eps, b.anp_eps, generator=None if v.is_cuda else gen)
                for q in perts:
                    q.perturbed = True
                for _ in range(b.anp_steps):  # signed ascent on the clean loss
                    grads = torch.autograd.grad(F.cross_entropy(model(x), y), noises)
                    with torch.no_grad():
                        for v, g in zip(noises, grads):
                            v.add_(g.sign(), alpha=b.anp_eps / b.anp_steps).clamp_(-b.anp_eps, b.anp_eps)
                loss_rob = F.cross_entropy(model(x), y)
                for q in perts:
                    q.perturbed = False
                loss = b.anp_alpha * F.cross_entropy(model(x), y) + (1 - b.anp_alpha) * loss_rob
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0, 1)
                if it % 50 == 0 or it == b.anp_iters:
                    emit(ProgressEvent("prune", step=it, total=b.anp_iters, values={"loss": float(loss.detach())}))
        finally:
            for q in perts:
                q.handle.remove()
    timing = {"masks": time.perf_counter() - start}

    start = time.perf_counter()
    values = torch.cat([m.detach() for m in masks])
    owner = [(name, c) for name, n in norms for c in range(n.num_features)]
    ranked = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    n_val = len(t.val_y)
    base = val_correct(model, job, job.batch_size)
    mask, kept, kept_threshold, curve = ChannelMask(), 0, 0.0, [(0.0, base / n_val, 0)]
    modules = dict(norms)
    steps = int(round(b.anp_max_threshold / b.anp_threshold_step))
    for k in range(1, steps + 1):
        threshold = k * b.anp_threshold_step
        for i in ranked[len(mask):]:
            if float(values[i]) >= threshold:
                break
            name, c = owner[i]
            mask.zero(modules[name].weight, 0, c)
        correct = val_correct(model, job, job.batch_size)
        curve.append((threshold, correct / n_val, len(mask)))
        if accuracy_dropped(base, correct, n_val, cfg.prune.alpha):
            break
        kept, kept_threshold = len(mask), threshold
    mask.undo_to(kept)
    timing["prune"] = time.perf_counter() - start
    changed = [Unit("channel", owner[i][0], owner[i][1], float(values[i])).to_dict() for i in ranked[:kept]]
    summary = (f"Masks were learned for {len(values)} batch-norm channels over {b.anp_iters} iterations under "
               f"adversarial neuron perturbation (eps {b.anp_eps:g}, trade-off {b.anp_alpha:g}, mask lr "
               f"{b.anp_mask_lr:g}); the {kept} channels with a mask below {kept_threshold:.2f} (the largest threshold "
               f"within alpha = {cfg.prune.alpha} on the validation split) had their norm scale zeroed.")
    details = {"threshold": kept_threshold, "mask_values": [float(v) for v in values],
               "curve": [{"threshold": th, "val_acc": a, "pruned": k} for th, a, k in curve]}
    return Defence(changed, len(values), summary, details, None, timing,
                   lambda path: plot_curve(
                       path, "ANP: pruning by mask threshold", "mask threshold", [th for th, _, _ in curve],
                       {"val ACC (clean)": [100 * a for _, a, _ in curve],
                        "channels pruned (% of all)": [100 * k / len(values) for _, _, k in curve]},
                       marker=(kept_threshold, f"kept: threshold {kept_threshold:.2f}"),
                       floor=(100 * (base / n_val - cfg.prune.alpha), f"ACC floor (alpha={cfg.prune.alpha:g})")))
