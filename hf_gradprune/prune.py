"""Gradient-based filter pruning (Dunnett et al., 2024).

Each round: the unlearning loss (cross-entropy of the TRIGGERED training images against their TRUE labels)
is back-propagated, every conv filter gets the mean |dL/dW| over its weights, and the single
highest-scoring filter is pruned. Pruning only ever zeroes parameters, so the best round is rebuilt by
undoing the later rounds from the saved slices: no model copies in the loop.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import SINGLE, Procs

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class PruneConfig:
    alpha: float = 0.10  # stop when val accuracy drops by more than this (absolute fraction)
    patience: int = 10  # Pp: stop after this many rounds without a strictly lower val unlearning loss
    max_rounds: int = 500
    score: str = "grad"  # "grad": mean |dL/dW| (paper Eq. 3); "grad_x_weight": mean |dL/dW * W| (opt-in variant)
    normalise: str = "none"  # "layer": divide each layer's scores by their mean (opt-in variant), so no layer
    #                          wins just because its gradients are larger in scale


SCORES = ("grad", "grad_x_weight")
NORMALISATIONS = ("none", "layer")


@dataclass
class PruneRound:
    round: int
    layer: str
    filter: int
    score: float
    val_acc: float
    val_unlearning_loss: float
    val_asr: float | None


@dataclass
class PruneResult:
    kept_rounds: int  # the best round by val unlearning loss within alpha; filters pruned up to it stay pruned
    stop_reason: str
    base_val_acc: float
    base_val_unlearning_loss: float
    base_val_asr: float | None
    rounds: list[PruneRound] = field(default_factory=list)  # every round tried, also those undone

    @property
    def pruned(self) -> list[dict]:
        return [{"layer": r.layer, "filter": r.filter, "score": r.score} for r in self.rounds[: self.kept_rounds]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pruned"] = self.pruned
        return d


def conv_layers(net: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d: stem, shortcuts, depthwise and grouped convs alike."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def norms_fed_by_convs(model: nn.Module, net: nn.Module, example: torch.Tensor) -> dict[str, list[nn.Module]]:
    """Trace one forward pass: which norm layers take a conv's output tensor directly as their input.

    Following tensors (not module order) pairs each norm with the conv that really feeds it."""
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so ids stay unique during the pass
    pairs: dict[str, list[nn.Module]] = {}
    handles = []
    out_channels = {name: m.out_channels for name, m in conv_layers(net)}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            def conv_hook(mod, inp, out, name=name):
                produced[id(out)] = name
                alive.append(out)
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            def norm_hook(mod, inp):
                src = produced.get(id(inp[0])) if inp else None
                if src is not None and mod.weight.numel() == out_channels[src] \
                        and mod not in pairs.setdefault(src, []):
                    pairs[src].append(mod)
            handles.append(m.register_forward_pre_hook(norm_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


class FilterPruner:
    """Makes a conv output channel truly inactive: zero filter and bias, and zero the affine weight and bias
    of the norm layer it feeds, so that channel leaves the norm as 0 rather than a constant."""

    def __init__(self, model: nn.Module, net: nn.Module, example: torch.Tensor):
        self.convs = conv_layers(net)
        self.norms = norms_fed_by_convs(model, net, example)
        self.offsets = [0]
        for _, conv in self.convs:
            self.offsets.append(self.offsets[-1] + conv.out_channels)
        self.pruned: list[tuple[int, int]] = []  # (conv index, filter) in pruning order
        self._saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    @property
    def num_filters(self) -> int:
        return self.offsets[-1]

    def locate(self, flat: int) -> tuple[int, int]:
        for i in range(len(self.convs)):
            if flat < self.offsets[i + 1]:
                return i, flat - self.offsets[i]
        raise IndexError(flat)

    def _slices(self, conv_idx: int, f: int) -> list[torch.Tensor]:
        name, conv = self.convs[conv_idx]
        params = [conv.weight, conv.bias] + [p for n in self.norms.get(name, []) for p in (n.weight, n.bias)]
        return [p.data[f] for p in params if p is not None]

    @torch.no_grad()
    def prune(self, conv_idx: int, f: int) -> None:
        slices = self._slices(conv_idx, f)
        self._saved.append([(s, s.clone()) for s in slices])
        for s in slices:
            s.zero_()
        self.pruned.append((conv_idx, f))

    @torch.no_grad()
    def undo_last(self) -> None:
        for view, original in self._saved.pop():
            view.copy_(original)
        self.pruned.pop()

    @torch.no_grad()
    def reapply(self) -> None:
        """Keep pruned channels at zero after an optimizer step (fine-tuning must not revive them)."""
        for conv_idx, f in self.pruned:
            for s in self._slices(conv_idx, f):
                s.zero_()

    def pruned_mask(self, device) -> torch.Tensor:
        mask = torch.zeros(self.num_filters, dtype=torch.bool, device=device)
        for conv_idx, f in self.pruned:
            mask[self.offsets[conv_idx] + f] = True
        return mask


def filter_scores(model: nn.Module, convs: list[tuple[str, nn.Conv2d]], triggered: torch.Tensor,
                  labels: torch.Tensor, batch_size: int, score: str = "grad", normalise: str = "none",
                  procs: Procs = SINGLE) -> torch.Tensor:
    """Paper Eq. 3: mean |d unlearning_loss / d W_l[i]| over each filter's weights, all layers concatenated.

    The loss is summed over the whole training split (each process back-propagates its chunks; the gradients are
    summed across processes before scoring); the model stays in eval mode (no BN updates) and only conv weights
    take gradients. `score` and `normalise` select the opt-in variants of PruneConfig."""
    conv_weights = {id(c.weight) for _, c in convs}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in conv_weights)
    model.eval()
    for _, c in convs:
        c.weight.grad = None
    try:
        for _, start, end in procs.chunks(len(labels), batch_size):
            F.cross_entropy(model(triggered[start:end]), labels[start:end], reduction="sum").backward()
        grads = [c.weight.grad if c.weight.grad is not None else torch.zeros_like(c.weight) for _, c in convs]
        if procs.world > 1:
            flat = procs.all_sum(torch.cat([g.flatten() for g in grads]))
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        per_layer = []
        for (_, c), grad in zip(convs, grads):
            g = grad * c.weight.detach() if score == "grad_x_weight" else grad
            s = g.abs().flatten(1).mean(1)
            if normalise == "layer":
                s = s / s.mean().clamp_min(torch.finfo(s.dtype).tiny)
            per_layer.append(s)
        return torch.cat(per_layer)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for _, c in convs:
            c.weight.grad = None


@torch.no_grad()
def val_stats(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor,
              target: int | None, batch_size: int, procs: Procs = SINGLE) -> tuple[int, float, float | None]:
    """Correct clean predictions, mean unlearning loss on triggered images, ASR on triggered non-target images.

    One host synchronisation: every chunk's numbers are gathered in one table and read back together."""
    model.eval()

    def chunk(start: int, end: int) -> torch.Tensor:
        y = labels[start:end]
        both = model(torch.cat([clean[start:end], triggered[start:end]]))
        c_logits, t_logits = both[: len(y)], both[len(y):]
        hits = ((t_logits.argmax(1) == target) & (y != target)).sum() if target is not None else torch.zeros((), device=y.device)
        return torch.stack([(c_logits.argmax(1) == y).sum().float(), F.cross_entropy(t_logits, y, reduction="sum"),
                            hits.float()])
    correct, loss, hits = procs.chunk_sums(len(labels), batch_size, 3, chunk)
    n_non_target = int((labels != target).sum()) if target is not None else 0
    asr = hits / n_non_target if n_non_target else None
    return int(correct), loss / max(1, len(labels)), asr


def accuracy_dropped(base_correct: int, correct: int, n_val: int, alpha: float) -> bool:
    """True when val accuracy fell by more than alpha, compared in image counts so that 0.1 * 10 is exactly one
    tolerated miss (floats would make 0.1 * 30 = 3.0000000000000004)."""
    return base_correct - correct > Fraction(str(alpha)) * n_val


def gradient_prune(model: nn.Module, pruner: FilterPruner, train_triggered: torch.Tensor, train_labels: torch.Tensor,
                   val_clean: torch.Tensor, val_triggered: torch.Tensor, val_labels: torch.Tensor,
                   cfg: PruneConfig, target: int | None, batch_size: int,
                   on_round: Callable[[PruneRound], None] | None = None, procs: Procs = SINGLE) -> PruneResult:
    """Prune round after round until val accuracy drops by more than alpha or the val unlearning loss has not
    strictly improved for Pp rounds; then keep the best round by val unlearning loss within alpha."""
    n_val = len(val_labels)
    base_correct, base_loss, base_asr = val_stats(model, val_clean, val_triggered, val_labels, target, batch_size, procs)
    result = PruneResult(0, "max_rounds", base_correct / n_val, base_loss, base_asr)
    best_loss, since_best = base_loss, 0
    for r in range(1, cfg.max_rounds + 1):
        scores = filter_scores(model, pruner.convs, train_triggered, train_labels, batch_size, cfg.score, cfg.normalise,
                               procs)
        scores = scores.masked_fill(pruner.pruned_mask(scores.device), float("-inf"))
        best = scores.max(0)
        flat, score = int(best.indices), float(best.values)
        procs.agree(flat, f"the filter to prune in round {r}")
        if score == float("-inf"):
            result.stop_reason = "no_filters_left"
            break
        conv_idx, f = pruner.locate(flat)
        pruner.prune(conv_idx, f)
        correct, loss, asr = val_stats(model, val_clean, val_triggered, val_labels, target, batch_size, procs)
        rnd = PruneRound(r, pruner.convs[conv_idx][0], f, score, correct / n_val, loss, asr)
        result.rounds.append(rnd)
        if on_round:
            on_round(rnd)
        if accuracy_dropped(base_correct, correct, n_val, cfg.alpha):
            result.stop_reason = "accuracy"
            break
        if loss < best_loss:
            best_loss, since_best, result.kept_rounds = loss, 0, r
        else:
            since_best += 1
            if since_best >= cfg.patience:
                result.stop_reason = "patience"
                break
    procs.agree((result.stop_reason, len(result.rounds), result.kept_rounds), "where pruning stopped and which round it kept")
    while len(pruner.pruned) > result.kept_rounds:
        pruner.undo_last()
    return result


def round_floor(model: nn.Module, convs: list[tuple[str, nn.Conv2d]], train_triggered: torch.Tensor,
                train_labels: torch.Tensor, val_clean: torch.Tensor, val_triggered: torch.Tensor, batch_size: int,
                repeats: int = 3) -> float:
    """Median seconds of the work no pruning round can skip, written plainly and apart from the engine: one
    forward+backward over the training split giving the conv weight gradients, and one forward over the
    validation split (clean images and their triggered twins). Benchmarks divide the time per round by it."""
    weights = [c.weight for _, c in convs]
    model.eval()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        grads = [torch.zeros_like(w) for w in weights]
        for start in range(0, len(train_labels), batch_size):
            loss = F.cross_entropy(model(train_triggered[start:start + batch_size]),
                                   train_labels[start:start + batch_size], reduction="sum")
            for g, d in zip(grads, torch.autograd.grad(loss, weights)):
                g += d
        with torch.no_grad():
            for start in range(0, len(val_clean), batch_size):
                model(torch.cat([val_clean[start:start + batch_size], val_triggered[start:start + batch_size]]))
        float(sum(g.sum() for g in grads))
        times.append(time.perf_counter() - t)
    return statistics.median(times)
