"""Gradient-based pruning (Dunnett et al., 2024), of every unit kind `units.py` finds.

Each round: the unlearning loss (cross-entropy of the TRIGGERED training images against their TRUE labels)
is back-propagated, every unit (a conv filter, an MLP neuron, an attention head) gets the mean |dL/dW| over the
weights that write it, and the single highest-scoring unit is pruned. Pruning only ever zeroes parameters, so the
best round is rebuilt by undoing the later rounds from the saved slices: no model copies in the loop.

Where the accuracy bound and the kept round are measured, and what a round past the bound does, are the two
choices the recipes (`recipes.py`) differ in: the paper measures on the validation split and stops at the first
such round; the robust recipe measures on all the clean few-shot images and undoes and skips that one filter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import SINGLE, Procs
from .units import Family, Part, Unit, UnitPruner, grads_only_for, unit_rows

if TYPE_CHECKING:
    from .units import UnitKind

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

Score = Literal["grad", "grad_x_weight"]
SCORES: tuple[Score, ...] = get_args(Score)  # --score's choices
Normalisation = Literal["none", "layer"]
NORMALISATIONS: tuple[Normalisation, ...] = get_args(Normalisation)  # --score-norm's choices
CheckOn = Literal["val", "fewshot"]
OnBreak = Literal["stop", "skip"]
KeepOn = Literal["unlearning", "objective"]
StopReason = Literal["max_rounds", "accuracy", "patience", "no_units_left"]  # why gradient_prune stopped


@dataclass
class PruneConfig:
    alpha: float = 0.10  # stop when val accuracy drops by more than this (absolute fraction)
    patience: int = 10  # Pp: stop after this many rounds without a strictly lower val unlearning loss
    max_rounds: int = 500
    score: Score = "grad"  # "grad": mean |dL/dW| (paper Eq. 3); "grad_x_weight": mean |dL/dW * W| (opt-in variant)
    normalise: Normalisation = "none"  # "layer": divide each layer's scores by their mean (opt-in variant), so no
    #                                    layer wins just because its gradients are larger in scale
    check_on: CheckOn = "val"  # where alpha and the kept round are measured: "val" = the validation split (paper);
    #                            "fewshot" = the clean train + validation images and their twins. Scoring only
    #                            back-propagates, nothing is fitted, so the train images are as unseen as the val
    #                            ones, and at SPC 10 the bound is read off 10 images per class instead of 1
    on_break: OnBreak = "stop"  # a round past alpha: "stop" ends pruning (paper); "skip" undoes that filter, never
    #                             tries it again and tries the next one
    max_skips: int = 10  # "skip": pruning ends ("accuracy") after this many filters in a row were undone
    keep_on: KeepOn = "unlearning"  # what the kept round minimises (and patience waits on): "unlearning" = the
    #                                 unlearning loss (paper); "objective" = clean loss + unlearning loss, fine-tuning's
    #                                 objective, so a filter is kept only where it removes more backdoor than clean
    #                                 accuracy


@dataclass
class PruneRound:
    round: int
    kind: UnitKind  # filter, neuron, head
    layer: str
    index: int
    score: float
    val_acc: float
    val_unlearning_loss: float
    val_asr: float | None
    fewshot_acc: float | None = None  # check_on "fewshot": the same on the clean train + val images and their twins
    fewshot_unlearning_loss: float | None = None
    undone: bool = False  # on_break "skip": this unit broke alpha, was restored at once and is never tried again


@dataclass
class PruneResult:
    kept_rounds: int  # the best round by unlearning loss within alpha; filters pruned up to it (not undone) stay pruned
    stop_reason: StopReason
    base_val_acc: float
    base_val_unlearning_loss: float
    base_val_asr: float | None
    rounds: list[PruneRound] = field(default_factory=list)  # every round tried, also those undone
    check_on: CheckOn = "val"
    base_fewshot_acc: float | None = None
    base_fewshot_unlearning_loss: float | None = None

    @property
    def pruned(self) -> list[dict]:
        return [Unit(r.kind, r.layer, r.index, r.score).to_dict() for r in self.rounds[: self.kept_rounds]
                if not r.undone]

    @property
    def skipped(self) -> int:
        return sum(r.undone for r in self.rounds)

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
            def conv_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
                produced[id(out)] = name
                alive.append(out)
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            def norm_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
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


class FilterPruner(UnitPruner):
    """Every conv filter of the net as a unit (the paper's unit set, and CLP's): the filter and its bias, and the
    affine weight and bias of the norm layer it feeds, so that channel leaves the norm as 0 rather than a constant.
    `units.find_units` is the engine's default, which keeps only filters that enter a per-channel batch norm."""

    def __init__(self, model: nn.Module, net: nn.Module, example: torch.Tensor) -> None:
        self.convs = conv_layers(net)
        self.norms = norms_fed_by_convs(model, net, example)
        families = []
        for name, conv in self.convs:
            rows = unit_rows(conv.out_channels)
            parts = [Part(conv.weight, 0, rows, producer=True, scored=True)]
            parts += [Part(p, 0, rows, producer=p is conv.bias) for p in
                      [conv.bias] + [q for n in self.norms.get(name, []) for q in (n.weight, n.bias)] if p is not None]
            families.append(Family("filter", name, conv.out_channels, parts))
        super().__init__(families)

    @property
    def num_filters(self) -> int:
        return self.num_units


def unlearning_grads(model: nn.Module, weights: list[torch.Tensor], triggered: torch.Tensor, labels: torch.Tensor,
                     batch_size: int, procs: Procs = SINGLE) -> list[torch.Tensor]:
    """d unlearning_loss / dW for each of `weights`, the loss summed over the whole training split: each process
    back-propagates its chunks, the gradients are summed across processes. Eval mode (no BN updates); only
    `weights` take gradients."""
    model.eval()
    with grads_only_for(model, weights):
        for _, start, end in procs.chunks(len(labels), batch_size):
            F.cross_entropy(model(triggered[start:end]), labels[start:end], reduction="sum").backward()
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
    if procs.world > 1:
        flat = procs.all_sum(torch.cat([g.flatten() for g in grads]))
        grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
    return grads


def _normalised(scores: torch.Tensor, normalise: Normalisation) -> torch.Tensor:
    """normalise "layer": a layer's scores over their mean, so no layer wins by the scale of its gradients alone."""
    return scores / scores.mean().clamp_min(torch.finfo(scores.dtype).tiny) if normalise == "layer" else scores


def filter_scores(model: nn.Module, convs: list[tuple[str, nn.Conv2d]], triggered: torch.Tensor,
                  labels: torch.Tensor, batch_size: int, score: Score = "grad", normalise: Normalisation = "none",
                  procs: Procs = SINGLE) -> torch.Tensor:
    """Paper Eq. 3: mean |d unlearning_loss / d W_l[i]| over each filter's weights, all layers concatenated.
    `score` and `normalise` select the opt-in variants of PruneConfig."""
    grads = unlearning_grads(model, [c.weight for _, c in convs], triggered, labels, batch_size, procs)
    per_layer = []
    for (_, c), grad in zip(convs, grads):
        g = grad * c.weight.detach() if score == "grad_x_weight" else grad
        per_layer.append(_normalised(g.abs().flatten(1).mean(1), normalise))
    return torch.cat(per_layer)


def unit_scores(model: nn.Module, pruner: UnitPruner, triggered: torch.Tensor, labels: torch.Tensor, batch_size: int,
                score: Score = "grad", normalise: Normalisation = "none", procs: Procs = SINGLE) -> torch.Tensor:
    """Paper Eq. 3 for every unit kind: mean |d unlearning_loss / dW| over the unit's producer weights (a conv
    filter, an MLP neuron's producer row, a head's query / key / value rows), all families concatenated. On a CNN
    it gives filter_scores' numbers."""
    weights = pruner.scored_params()
    grads = unlearning_grads(model, weights, triggered, labels, batch_size, procs)
    by_id = {id(w): g for w, g in zip(weights, grads)}
    return torch.cat([_normalised(fam.scores(by_id, score), normalise) for fam in pruner.families])


@dataclass(frozen=True)
class CheckStats:
    """Sums over a set of clean images and their triggered twins; sums add exactly across sets and processes."""
    correct: int  # clean predictions that are right
    loss_sum: float  # unlearning loss (CE of the twins against the true labels), summed
    hits: int  # twins of non-target images sent to the target
    n: int
    n_non_target: int
    clean_loss_sum: float = 0.0  # CE of the clean images against their labels, summed

    def __add__(self, other: CheckStats) -> CheckStats:
        return CheckStats(self.correct + other.correct, self.loss_sum + other.loss_sum, self.hits + other.hits,
                          self.n + other.n, self.n_non_target + other.n_non_target,
                          self.clean_loss_sum + other.clean_loss_sum)

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.n)

    @property
    def unlearning_loss(self) -> float:
        return self.loss_sum / max(1, self.n)

    @property
    def asr(self) -> float | None:
        return self.hits / self.n_non_target if self.n_non_target else None

    @property
    def objective(self) -> float:
        return (self.clean_loss_sum + self.loss_sum) / max(1, self.n)


@torch.no_grad()
def check_stats(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor,
                target: int | None, batch_size: int, procs: Procs = SINGLE) -> CheckStats:
    """Correct clean predictions, summed unlearning loss on the triggered twins, target hits among non-target twins.

    One host synchronisation: every chunk's numbers are gathered in one table and read back together."""
    model.eval()

    def chunk(start: int, end: int) -> torch.Tensor:
        y = labels[start:end]
        both = model(torch.cat([clean[start:end], triggered[start:end]]))
        c_logits, t_logits = both[: len(y)], both[len(y):]
        hits = (((t_logits.argmax(1) == target) & (y != target)).sum() if target is not None
                else torch.zeros((), device=y.device))
        return torch.stack([(c_logits.argmax(1) == y).sum().float(), F.cross_entropy(t_logits, y, reduction="sum"),
                            hits.float(), F.cross_entropy(c_logits, y, reduction="sum")])
    correct, loss, hits, clean_loss = procs.chunk_sums(len(labels), batch_size, 4, chunk)
    n_non_target = int((labels != target).sum()) if target is not None else 0
    return CheckStats(int(correct), loss, int(hits), len(labels), n_non_target, clean_loss)


def accuracy_dropped(base_correct: int, correct: int, n_val: int, alpha: float) -> bool:
    """True when val accuracy fell by more than alpha, compared in image counts so that 0.1 * 10 is exactly one
    tolerated miss (floats would make 0.1 * 30 = 3.0000000000000004)."""
    return base_correct - correct > Fraction(str(alpha)) * n_val


def gradient_prune(model: nn.Module, pruner: UnitPruner, train_triggered: torch.Tensor, train_labels: torch.Tensor,
                   val_clean: torch.Tensor, val_triggered: torch.Tensor, val_labels: torch.Tensor,
                   cfg: PruneConfig, target: int | None, batch_size: int,
                   on_round: Callable[[PruneRound], None] | None = None, procs: Procs = SINGLE,
                   train_clean: torch.Tensor | None = None) -> PruneResult:
    """Prune round after round until accuracy drops by more than alpha (cfg.on_break "stop"; "skip": until
    cfg.max_skips filters in a row did) or the unlearning loss has not strictly improved for Pp rounds; then keep
    the best round by unlearning loss within alpha. cfg.check_on says on which images both are measured
    ("fewshot" needs `train_clean`, the clean twins of `train_triggered`)."""
    fewshot = cfg.check_on == "fewshot"
    if fewshot and train_clean is None:
        raise ValueError("check_on 'fewshot' needs the clean training images")

    def measure() -> tuple[CheckStats, CheckStats]:
        val = check_stats(model, val_clean, val_triggered, val_labels, target, batch_size, procs)
        if not fewshot:
            return val, val
        return val, val + check_stats(model, train_clean, train_triggered, train_labels, target, batch_size, procs)

    base_val, base = measure()
    result = PruneResult(0, "max_rounds", base_val.acc, base_val.unlearning_loss, base_val.asr, check_on=cfg.check_on,
                         base_fewshot_acc=base.acc if fewshot else None,
                         base_fewshot_unlearning_loss=base.unlearning_loss if fewshot else None)
    def kept_value(stats: CheckStats) -> float:
        return stats.objective if cfg.keep_on == "objective" else stats.unlearning_loss

    best_loss, since_best, skips = kept_value(base), 0, 0
    excluded = torch.zeros(pruner.num_units, dtype=torch.bool, device=train_labels.device)
    for r in range(1, cfg.max_rounds + 1):
        scores = unit_scores(model, pruner, train_triggered, train_labels, batch_size, cfg.score, cfg.normalise, procs)
        scores = scores.masked_fill(pruner.pruned_mask(scores.device) | excluded.to(scores.device), float("-inf"))
        best = scores.max(0)
        flat, score = int(best.indices), float(best.values)
        procs.agree(flat, f"the unit to prune in round {r}")
        if score == float("-inf"):
            result.stop_reason = "no_units_left"
            break
        fam_idx, k = pruner.locate(flat)
        pruner.prune(fam_idx, k)
        val, check = measure()
        broke = accuracy_dropped(base.correct, check.correct, check.n, cfg.alpha)
        fam = pruner.families[fam_idx]
        rnd = PruneRound(r, fam.kind, fam.layer, k, score, val.acc, val.unlearning_loss, val.asr,
                         check.acc if fewshot else None, check.unlearning_loss if fewshot else None,
                         undone=broke and cfg.on_break == "skip")
        result.rounds.append(rnd)
        if on_round:
            on_round(rnd)
        if broke:
            if cfg.on_break == "stop":
                result.stop_reason = "accuracy"
                break
            pruner.undo_last()  # the model is as before this round; the filter is never a candidate again
            excluded[flat] = True
            skips += 1
            if skips >= cfg.max_skips:
                result.stop_reason = "accuracy"
                break
            continue
        skips = 0
        if kept_value(check) < best_loss:
            best_loss, since_best, result.kept_rounds = kept_value(check), 0, r
        else:
            since_best += 1
            if since_best >= cfg.patience:
                result.stop_reason = "patience"
                break
    procs.agree((result.stop_reason, len(result.rounds), result.kept_rounds),
                "where pruning stopped and which round it kept")
    keep = len(result.pruned)
    while len(pruner.pruned) > keep:
        pruner.undo_last()
    return result


def round_floor(model: nn.Module, pruner: UnitPruner, train_triggered: torch.Tensor,
                train_labels: torch.Tensor, val_clean: torch.Tensor, val_triggered: torch.Tensor, batch_size: int,
                repeats: int = 3) -> float:
    """Median seconds of the work no pruning round can skip, written plainly and apart from the engine: one
    forward+backward over the training split giving the scored weights' gradients, and one forward over the images
    the round is checked on (clean images and their triggered twins: the validation split, or with check_on
    "fewshot" the train + validation images). Benchmarks divide the time per round by it."""
    weights = pruner.scored_params()
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
