"""When nobody knows the trigger: find out whether a model is backdoored, to which class, and synthesise a trigger
that the defence can stamp on the few-shot images in place of the real one.

Two synthesisers, because the field's leaderboard shows that one family misses the other's triggers (Neural
Cleanse finds patches but not blends; a universal perturbation finds blends but patches poorly):
- patch: x' = (1 - m) x + m p with a per-pixel mask m, kept small in area (Neural Cleanse's mask + pattern);
- blend: x' = (1 - a) x + a p with one blend ratio a over the whole image, kept small (covers Blended and, for
  small a, additive low-frequency triggers, which are x + a (p - x) with p - x nearly image-independent).
For each scanned class t and family, Adam finds the smallest trigger that sends `flip` of the few-shot images of
other classes to t. A backdoor's target needs a far smaller trigger than the other classes: the anomaly index of
its size (median absolute deviation over the scanned classes, on log sizes, small side; Neural Cleanse's rule)
above `threshold` in either family is the verdict.

Cost: with K classes, a full scan costs K x 2 optimisations. Above `max_classes` classes only `max_classes` are
scanned in full: the `candidates` most promising plus seeded reference classes (the anomaly statistic's baseline).
Up to `screen_classes` classes a screen picks the candidates (K-Arm's idea: `screen_steps` of every class's two
searches on `screen_batch` images a step, then the steps go to the classes whose triggers are already smallest; the
screen's steps count towards theirs), so the cost grows by K x 2 x screen_steps x screen_batch image passes (at 43
classes about what the probe costs); above it one untargeted probe per family (push every image away
from its own label with a small trigger) ranks the classes the images fall into, and the cost no longer grows with
K. The probe costs the same at any K but collapses onto one or two classes per family (measured on the detection
benchmark's GTSRB dev models: docs/decisions.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .progress import ProgressCallback, ProgressEvent
from .units import grads_only_for

TriggerFamily = Literal["patch", "blend"]
FAMILIES: tuple[TriggerFamily, ...] = get_args(TriggerFamily)
ScanSelect = Literal["screen", "probe"]
SCAN_SELECTS: tuple[ScanSelect, ...] = get_args(ScanSelect)  # --scan-select's choices
RoundsFrom = Literal["original", "defended"]
ROUNDS_FROM: tuple[RoundsFrom, ...] = get_args(RoundsFrom)  # --synth-from's choices
# the share of the fine-tuning's weight change that a pull-back keeps, tried in this order: the first that lets a
# synthesised trigger back in ends the search (flips need not fall monotonically with the share)
PULL_BACK_SHARES = (0.9, 0.75, 0.6, 0.5)
MIN_SPREAD = float(np.log(1.5))  # the smallest robust deviation of log trigger sizes the anomaly index divides by


@dataclass
class ScanConfig:
    steps: int = 150  # Adam steps per class and family
    lr: float = 0.1
    flip: float = 0.9  # share of other classes' few-shot images the trigger must send to the class
    threshold: float = 2.5  # anomaly index above which a class is a backdoor's target (Neural Cleanse uses 2; 2.5
    # separates the detection benchmark's dev models, where clean GTSRB models reach 2.29: docs/decisions.md)
    also_share: float = 0.35  # another class is a suspect too when its index is above the threshold and at least
    # this share of the target's (a second backdoor is planted as strongly as the first; a brittle clean class is not)
    max_classes: int = 10  # classes scanned in full; above it, `select` picks which
    candidates: int = 3  # of those, the most promising by the screen or the probe (the rest: seeded reference classes)
    probe_steps: int = 60
    select: ScanSelect = "screen"  # above max_classes, how candidates are chosen: "screen" (a short targeted
    # synthesis for every class, up to screen_classes; the most promising continue) or "probe" (one untargeted trigger
    # per family)
    screen_steps: int = 15  # screen: Adam steps per class and family before the candidates are chosen
    screen_batch: int = 16  # screen: few-shot images per step (a quarter of batch_size: the ranking needs the steps
    # more than the images; docs/decisions.md)
    screen_classes: int = 100  # screen: above this many classes the probe chooses instead (the screen's cost grows
    # with the classes, the probe's does not)
    mask_init_logit: float = -2.0  # the patch mask's starting logit at every pixel (-2: 0.12 of the pattern;
    # Neural Cleanse starts near 0, half the pattern)
    batch_size: int = 64  # few-shot images per optimisation step
    chunk_size: int | None = None  # the most images one forward + backward takes (the job's memory batch)
    seed: int = 0
    rounds: int = 3  # synthesise -> unlearn rounds; later ones re-synthesise the target's triggers on the
    # defended model
    rounds_from: RoundsFrom = "original"  # what each later round defends: the "original" model (with every trigger
    # found so far) or the "defended" one (unlearning on unlearning, which costs accuracy each round)
    keep_flip: float | None = 0.1  # after the last round the weights are pulled back toward the original model, keeping
    # the smallest of PULL_BACK_SHARES at which no synthesised trigger sends more than this share of the other classes'
    # few-shot images to the target (None: keep the defended weights)


@dataclass
class Synthesised:
    """One synthesised trigger, stampable like a real one: uint8 pixels in, uint8 pixels out."""
    family: TriggerFamily
    target: int
    mask: torch.Tensor  # (1, H, W) in [0, 1]; a blend: (1, 1, 1)
    pattern: torch.Tensor  # (3, H, W) in pixel units [0, 255]
    size: float  # mean of the mask over the image: the share of the image the trigger replaces
    flip: float  # share of the other classes' few-shot images it sends to the target

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.mask.to(x.device), self.pattern.to(x.device)
        return ((1 - m) * x.float() + m * p).clamp(0, 255).to(torch.uint8)

    def describe(self) -> str:
        what = (f"a patch covering {100 * self.size:.1f} % of the image (mask-weighted)" if self.family == "patch"
                else f"a full-image blend at ratio {self.size:.3f}")
        return (f"synthesised ({self.family} family): {what}, sending {100 * self.flip:.0f} % of the few-shot images "
                f"of other classes to class {self.target}")

    def image(self, example: torch.Tensor | None = None, scale: int = 4) -> Image.Image:
        """What people look at: the trigger (mask x pattern over black), and an example image before / after."""
        m, p = self.mask.expand(1, *self.pattern.shape[1:]), self.pattern
        panels = [(m * p).clamp(0, 255).to(torch.uint8)]
        if self.family == "blend":  # the pattern itself; at ratio a it would be too faint to see
            panels = [p.clamp(0, 255).to(torch.uint8)]
        if example is not None:
            panels += [example.cpu(), self(example[None].cpu())[0]]
        row = torch.cat([torch.nn.functional.pad(q.cpu(), (1, 1, 1, 1), value=255) for q in panels], dim=2)
        img = Image.fromarray(row.permute(1, 2, 0).numpy())
        return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


@dataclass
class ScanResult:
    backdoored: bool
    target: int | None  # the suspected target (None when clean)
    best_class: int  # the class with the highest anomaly index, backdoored or not
    anomaly: float  # the verdict's evidence: the highest anomaly index over classes and families
    family: TriggerFamily  # the family whose trigger gave it
    scanned: list[int]  # the classes synthesised for
    per_class: list[dict]  # per scanned class: sizes, flips, anomaly indices per family
    triggers: dict[TriggerFamily, Synthesised]  # family -> the trigger synthesised for best_class
    probe: dict | None  # above max_classes, how the scanned classes were chosen: the probe's hit counts or the
    # screen's promise per class
    config: dict
    timing_s: dict = field(default_factory=dict)
    suspects: list[int] = field(default_factory=list)  # the target, then every class above the threshold with at least
    # config["also_share"] of its index, most anomalous first
    suspect_triggers: dict[int, dict[TriggerFamily, Synthesised]] = field(default_factory=dict)  # per defence target

    @property
    def defence_target(self) -> int:
        """The class a defence works against: the target found, or (under --force on a clean verdict) the class
        that came nearest."""
        return self.target if self.target is not None else self.best_class

    @property
    def defence_targets(self) -> list[int]:
        """Every class the defence works against: the defence target first, then the other suspects (a model may
        carry two backdoors to two classes)."""
        return [self.defence_target] + [c for c in self.suspects if c != self.defence_target]

    @property
    def runner_up(self) -> dict | None:
        """The class with the highest anomaly index after the best one: how far ahead the verdict's class is."""
        ranked = sorted(self.per_class, key=lambda r: (-r["anomaly"], r["class"]))
        return ranked[1] if len(ranked) > 1 else None

    @property
    def trigger(self) -> Synthesised:
        """The trigger the defence stamps: the family that gave the evidence."""
        return self.triggers[self.family]

    def _index(self, c: int) -> float:
        return next(r["anomaly"] for r in self.per_class if r["class"] == c)

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        name = (lambda i: class_names[i] if class_names and i is not None else None)
        up = self.runner_up
        return {"backdoored": self.backdoored, "target": self.target, "target_name": name(self.target),
                "best_class": self.best_class, "best_class_name": name(self.best_class),
                "anomaly_index": self.anomaly, "threshold": self.config["threshold"], "family": self.family,
                "suspects": [{"class": c, "name": name(c), "anomaly_index": self._index(c)} for c in self.suspects],
                "runner_up": None if up is None else {"class": up["class"], "name": name(up["class"]),
                                                      "anomaly_index": up["anomaly"]},
                "evidence": evidence(self),
                "scanned_classes": self.scanned, "per_class": self.per_class, "probe": self.probe,
                "triggers": {f: {"size": t.size, "flip": t.flip, "target": t.target, "description": t.describe()}
                             for f, t in self.triggers.items()},
                "config": self.config, "timing_s": self.timing_s}


def _params(family: TriggerFamily, shape: tuple[int, int], gen: torch.Generator, device: torch.device,
            mask_init_logit: float = -2.0) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = shape
    mask_shape = (1, h, w) if family == "patch" else (1, 1, 1)
    start = mask_init_logit if family == "patch" else -2.0
    mask_logit = torch.full(mask_shape, start) + 0.1 * torch.randn(mask_shape, generator=gen)
    pattern_logit = 0.1 * torch.randn((3, h, w), generator=gen)
    return mask_logit.to(device).requires_grad_(), pattern_logit.to(device).requires_grad_()


def _apply(x: torch.Tensor, mask_logit: torch.Tensor, pattern_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.sigmoid(mask_logit)
    return (1 - m) * x + m * 255 * torch.sigmoid(pattern_logit), m


def _step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, mask_logit: torch.Tensor,
          pattern_logit: torch.Tensor, size_loss: Callable[[torch.Tensor], torch.Tensor], chunk: int | None,
          sign: float = 1.0) -> tuple[torch.Tensor, float]:
    """Back-propagate one step's loss, sign x cross-entropy to `labels` + size_loss(trigger size), over chunks of at
    most `chunk` images (the memory batch); returns the predictions on the stamped images and the size."""
    if chunk is None or len(x) <= chunk:
        stamped, m = _apply(x, mask_logit, pattern_logit)
        logits = model(stamped)
        size = m.mean()
        (sign * F.cross_entropy(logits, labels) + size_loss(size)).backward()
        return logits.argmax(1).detach(), float(size.detach())
    preds = []
    for s in range(0, len(x), chunk):
        logits = model(_apply(x[s:s + chunk], mask_logit, pattern_logit)[0])
        (sign * F.cross_entropy(logits, labels[s:s + chunk], reduction="sum") / len(x)).backward()
        preds.append(logits.argmax(1).detach())
    size = torch.sigmoid(mask_logit).mean()
    size_loss(size).backward()
    return torch.cat(preds), float(size.detach())


@dataclass
class _Search:
    """One (class, family) trigger search in progress: screening runs a few steps of every class's search and
    continues only the promising ones, from where they stopped."""
    family: TriggerFamily
    target: int
    mask_logit: torch.Tensor
    pattern_logit: torch.Tensor
    opt: torch.optim.Optimizer
    lam: float = 1e-2
    best: tuple | None = None  # (size, flip, mask_logit, pattern_logit) of the smallest trigger that met the goal
    best_flip: float = 0.0
    steps: int = 0

    @property
    def promise(self) -> float:
        """Lower is more promising: the smallest size that met the flip goal, else 1 + the flip still missing."""
        return self.best[0] if self.best is not None else 2.0 - self.best_flip


def _start(pixels: torch.Tensor, labels: torch.Tensor, target: int, family: TriggerFamily, cfg: ScanConfig,
           gen: torch.Generator) -> _Search:
    mask_logit, pattern_logit = _params(family, tuple(pixels.shape[2:]), gen, pixels.device, cfg.mask_init_logit)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
    return _Search(family, target, mask_logit, pattern_logit, opt)


def _advance(model: nn.Module, search: _Search, pixels: torch.Tensor, labels: torch.Tensor, steps: int,
             cfg: ScanConfig, gen: torch.Generator) -> _Search:
    """Neural Cleanse's loop, shortened for a few images: CE to the target + lam x size; lam grows while the flip
    goal is met (shrinking the trigger) and falls while it is not. The smallest trigger that met the goal is kept."""
    target = search.target
    x = pixels[labels != target].float()  # the few-shot images of other classes
    goal = torch.full((min(cfg.batch_size, len(x)),), target, dtype=torch.long, device=x.device)
    for _ in range(steps):
        rows = torch.randperm(len(x), generator=gen)[: cfg.batch_size].to(x.device) if len(x) > cfg.batch_size \
            else torch.arange(len(x), device=x.device)
        search.opt.zero_grad(set_to_none=True)
        lam = search.lam
        pred, size = _step(model, x[rows], goal[: len(rows)], search.mask_logit, search.pattern_logit,
                           lambda v, lam=lam: lam * v * 10, cfg.chunk_size)
        flip = float((pred == target).float().mean())
        if flip >= cfg.flip and (search.best is None or size < search.best[0]):
            search.best = (size, flip, search.mask_logit.detach().clone(), search.pattern_logit.detach().clone())
        search.best_flip = max(search.best_flip, flip)
        search.lam = min(max(lam * 1.5 if flip >= cfg.flip else lam / 1.5 ** 1.5, 1e-4), 1e3)
        search.opt.step()
        search.steps += 1
    return search


def _found(search: _Search) -> Synthesised:
    """The search's trigger: the smallest that met the goal; a class no trigger of the family reached gets size 1
    (the whole image)."""
    if search.best is None:
        with torch.no_grad():
            m = torch.sigmoid(search.mask_logit)
        return Synthesised(search.family, search.target, m.detach().cpu(),
                           255 * torch.sigmoid(search.pattern_logit.detach()).cpu(), 1.0, search.best_flip)
    size, flip, mask_logit, pattern_logit = search.best
    return Synthesised(search.family, search.target, torch.sigmoid(mask_logit).cpu(),
                       255 * torch.sigmoid(pattern_logit).cpu(), size, flip)


def synthesise(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, target: int, family: TriggerFamily,
               cfg: ScanConfig, gen: torch.Generator) -> Synthesised:
    """The smallest trigger of `family` that sends cfg.flip of the images of other classes to `target`."""
    return _found(_advance(model, _start(pixels, labels, target, family, cfg, gen), pixels, labels, cfg.steps, cfg,
                           gen))


def probe(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ScanConfig,
          gen: torch.Generator) -> torch.Tensor:
    """Untargeted: one small trigger per family that pushes every image away from its own label. Returns how many
    stamped images of other classes fall into each class: a backdoor's target draws them (the trigger is the
    shortest way out of every class)."""
    hits = torch.zeros(num_classes, dtype=torch.long)
    x = pixels.float()
    for family in FAMILIES:
        mask_logit, pattern_logit = _params(family, tuple(pixels.shape[2:]), gen, pixels.device)
        opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
        for _ in range(cfg.probe_steps):
            rows = torch.randperm(len(x), generator=gen)[: cfg.batch_size].to(x.device)
            opt.zero_grad(set_to_none=True)
            # away from the own label, with the trigger held small (area or blend ratio at most about 0.1)
            _step(model, x[rows], labels[rows], mask_logit, pattern_logit, lambda v: 10 * F.relu(v - 0.1),
                  cfg.chunk_size, sign=-1.0)
            opt.step()
        with torch.no_grad():
            for s in range(0, len(x), cfg.batch_size):
                pred = model(_apply(x[s:s + cfg.batch_size], mask_logit, pattern_logit)[0]).argmax(1).cpu()
                away = pred != labels[s:s + cfg.batch_size].cpu()
                hits += torch.bincount(pred[away], minlength=num_classes)
    return hits


def anomaly_index(sizes: list[float], min_spread: float = MIN_SPREAD) -> list[float]:
    """Neural Cleanse's anomaly index on the small side, on log sizes: how many robust standard deviations a
    class's trigger is below the median class's."""
    logs = np.log(np.asarray(sizes, dtype=np.float64) + 1e-6)
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    # classes alike (a clean model: sizes within a few per cent of each other) must not make a class somewhat
    # below the median look like a target: one robust deviation is at least a factor of 1.5, so at the threshold
    # 2 a target's trigger is at least 2.25x smaller than the median class's
    mad = max(mad, min_spread)
    return [float((med - v) / mad) for v in logs]


def how_chosen(num_classes: int, cfg: ScanConfig) -> ScanSelect | Literal["all"]:
    """How the classes scanned in full are chosen: "all" of them (up to max_classes), by the "screen" (up to
    screen_classes) or by the "probe"."""
    if num_classes <= cfg.max_classes:
        return "all"
    return "screen" if cfg.select == "screen" and num_classes <= cfg.screen_classes else "probe"


def scan_classes(num_classes: int, cfg: ScanConfig, ranked: list[int] | None, forced: int | None) -> list[int]:
    """All classes up to cfg.max_classes; above it, the `candidates` classes ranked most suspicious (by the probe or
    the screen) plus seeded reference classes (the anomaly statistic's baseline)."""
    if num_classes <= cfg.max_classes:
        return list(range(num_classes))
    chosen = ([forced] if forced is not None else []) + [c for c in ranked if c != forced]
    chosen = chosen[: cfg.candidates]
    rest = [c for c in range(num_classes) if c not in chosen]
    rng = np.random.default_rng(cfg.seed)
    chosen += sorted(rng.choice(rest, size=cfg.max_classes - len(chosen), replace=False).tolist())
    return chosen


DEFAULT_SCAN = ScanConfig()  # scan's default config; scan never changes its cfg (variants are made with replace)


def scan(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int,
         cfg: ScanConfig = DEFAULT_SCAN, target: int | None = None,
         emit: ProgressCallback = lambda event: None) -> ScanResult:
    """Detect a backdoor and synthesise its trigger from the few-shot images (uint8 (N, 3, H, W), true labels).

    `target` (the user's --target): that class's triggers are the ones returned, and it is always scanned."""
    t0 = time.perf_counter()
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ranked, searches, selection = None, {}, None
    with grads_only_for(model, []):
        how = how_chosen(num_classes, cfg)
        if how == "screen":
            # K-Arm's idea: a few steps for every class, then the budget goes to the promising ones
            emit(ProgressEvent("scan", message=f"screening all {num_classes} classes ({cfg.screen_steps} steps each)"))
            screen_cfg = replace(cfg, batch_size=min(cfg.screen_batch, cfg.batch_size))
            promise = {}
            for c in range(num_classes):
                searches[c] = {f: _advance(model, _start(pixels, labels, c, f, cfg, gen), pixels, labels,
                                           cfg.screen_steps, screen_cfg, gen) for f in FAMILIES}
                promise[c] = float(np.prod([searches[c][f].promise for f in FAMILIES]))
                emit(ProgressEvent("scan", step=c + 1, total=num_classes, values={"screened": c,
                                                                                  "promise": promise[c]}))
            ranked, selection = sorted(searches, key=lambda c: (promise[c], c)), {"screen_promise": promise}
        elif how == "probe":
            emit(ProgressEvent("scan",
                               message=f"probing which of {num_classes} classes a small trigger sends images to"))
            hits = probe(model, pixels, labels, num_classes, cfg, gen)
            ranked, selection = torch.argsort(hits, descending=True, stable=True).tolist(), {"hits": hits.tolist()}
        t_probe = time.perf_counter() - t0
        classes = scan_classes(num_classes, cfg, ranked, target)
        found: dict[int, dict[TriggerFamily, Synthesised]] = {}
        total = len(classes) * len(FAMILIES)
        emit(ProgressEvent("scan", step=0, total=total))
        for i, c in enumerate(classes):
            found[c] = {}
            for j, family in enumerate(FAMILIES):
                if c in searches:  # screened: continue where it stopped, to the same total of steps
                    search = searches[c][family]
                    found[c][family] = _found(_advance(model, search, pixels, labels, cfg.steps - search.steps, cfg,
                                                       gen))
                else:
                    found[c][family] = synthesise(model, pixels, labels, c, family, cfg, gen)
                emit(ProgressEvent("scan", step=i * len(FAMILIES) + j + 1, total=total,
                                   values={"class": c, family: found[c][family].size}))
    index = {f: dict(zip(classes, anomaly_index([found[c][f].size for c in classes]))) for f in FAMILIES}
    # the evidence: one index over the product of the two families' sizes. A target shrinks in both (CIFAR-10,
    # 150 steps: BadNets 10x in patch, 1.2x in blend; Blended 2x and 2x; LF 3x and 3x), a clean class's
    # sizes wander independently
    both = dict(zip(classes, anomaly_index([found[c]["patch"].size * found[c]["blend"].size for c in classes])))
    per_class = [{"class": c, **{f"{f}_size": found[c][f].size for f in FAMILIES},
                  **{f"{f}_flip": found[c][f].flip for f in FAMILIES},
                  **{f"{f}_anomaly": index[f][c] for f in FAMILIES}, "anomaly": both[c]} for c in classes]
    best = max(classes, key=lambda c: (both[c], -c))
    anomaly = both[best]
    backdoored = anomaly > cfg.threshold
    chosen = target if target is not None else best
    suspects = [c for c in sorted(classes, key=lambda c: (-both[c], c))
                if both[c] > cfg.threshold and (c == best or both[c] >= cfg.also_share * anomaly)]
    # the trigger the defence stamps first: the family in which the chosen class stands out more
    family = max(FAMILIES, key=lambda f: (found[chosen][f].size < 1.0, index[f][chosen]))
    result = ScanResult(backdoored, chosen if backdoored or target is not None else None, best, float(anomaly),
                        family, classes, per_class, found[chosen], selection, asdict(cfg),
                        {"probe": t_probe, "scan": time.perf_counter() - t0}, suspects)
    result.suspect_triggers = {c: found[c] for c in result.defence_targets}
    return result


def evidence(result: ScanResult) -> str:
    """How strong the verdict is, in words a release gate can show: the best class's index against the threshold
    and against the runner-up's (a class that barely leads is a weak naming of the target)."""
    th, up = result.config["threshold"], result.runner_up
    lead = result.anomaly - up["anomaly"] if up else float("inf")
    if len(result.suspects) > 1:
        return (f"{len(result.suspects)} classes stand out above the threshold {th}: the model may carry more than "
                "one backdoor; --trigger unknown defends each" + _screened(result))
    if not result.backdoored:
        return (f"no class stands out: the highest index {result.anomaly:.2f} is "
                f"{'close to' if result.anomaly > 0.75 * th else 'below'} the threshold {th}" + _screened(result))
    strength = "strong" if result.anomaly >= 2 * th and lead >= th else "weak"
    said = (f"{strength}: index {result.anomaly:.2f} against the threshold {th}; the runner-up class "
            f"{up['class'] if up else '-'} is at {up['anomaly'] if up else float('nan'):.2f}")
    if up and up["anomaly"] > th:  # above the threshold but weak beside the target: said, not defended
        said += (f", above the threshold too but under {100 * result.config['also_share']:.0f} % of the target's "
                 "index, so taken for a brittle clean class rather than a second backdoor")
    return said + _screened(result)


def _screened(result: ScanResult) -> str:
    """Where the screen chose the classes scanned in full: how it ranked the verdict's class among all of them (a
    class it ranked first was the most promising before the full scan too)."""
    promise = (result.probe or {}).get("screen_promise")
    if not promise:
        return ""
    c = result.target if result.backdoored else result.best_class
    rank = sorted(promise, key=lambda k: (promise[k], k)).index(c) + 1
    return f"; the screen put class {c} at rank {rank} of {len(promise)} before the full scan"


def verdict(result: ScanResult, class_names: list[str] | None = None) -> str:
    """The one line a person reads first: the verdict's class, then every other class above the threshold (a model
    may carry two backdoors) or the runner-up."""
    c = result.target if result.backdoored else result.best_class
    label = (lambda k: f"{k} ({class_names[k]})" if class_names else f"{k}")
    up = result.runner_up
    others = [k for k in result.suspects if k != c]
    if others:
        also = (f"; also above the threshold: class{'es' if len(others) > 1 else ''} "
                f"{', '.join(f'{label(k)} at {result._index(k):.2f}' for k in others)} "
                "(the model may carry more than one backdoor)")
    else:
        also = f"; runner-up class {label(up['class'])} at {up['anomaly']:.2f}" if up else ""
    if result.backdoored:
        return (f"backdoored: target class {label(c)}, anomaly index {result.anomaly:.2f} > "
                f"{result.config['threshold']} ({result.family} trigger, "
                f"{result.trigger.describe().split(': ', 1)[1].split(',')[0]}){also}")
    return (f"no backdoor found: highest anomaly index {result.anomaly:.2f} <= {result.config['threshold']} "
            f"(class {label(c)}, {result.family} family)")


def usable_triggers(result: ScanResult) -> list[Synthesised]:
    """The triggers the defence stamps, for every defence target: the evidence's family first, then the other
    family's trigger for the same class where it reached the flip goal too (a backdoor often answers to both, and
    unlearning both covers a patch-like and a blend-like real trigger)."""
    first = result.trigger
    out = [first] + [t for f, t in result.triggers.items() if f != first.family and t.size < 1.0]
    for c in result.defence_targets[1:]:
        out += [t for t in result.suspect_triggers[c].values() if t.size < 1.0]
    return out


def resynthesise(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, target: int, cfg: ScanConfig,
                 round_: int, nth: int = 0) -> list[Synthesised]:
    """After a round of unlearning: the target's triggers that still work on the defended model (BTI-DBF's
    invert-and-unlearn loop; the next-easiest way in is often nearer the real trigger). nth: which of the defence
    targets this is (each draws its own seed)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * round_ + 100_000 * nth)
    model.eval()
    with grads_only_for(model, []):
        found = [synthesise(model, pixels, labels, target, f, cfg, gen) for f in FAMILIES]
    return [t for t in found if t.size < 1.0]


def standing(result: ScanResult, target: int, fresh: list[Synthesised]) -> float:
    """The scan's anomaly index of the target's re-synthesised triggers among the scan's other classes (the product
    of the two families' sizes; a family that no longer reaches the flip goal counts as the whole image): whether
    the target still stands out after a round of unlearning."""
    sizes = {t.family: t.size for t in fresh}
    others = [c["patch_size"] * c["blend_size"] for c in result.per_class if c["class"] != target]
    return anomaly_index(others + [float(np.prod([sizes.get(f, 1.0) for f in FAMILIES]))])[-1]


def stamp_twins(triggers: list[Synthesised], x: torch.Tensor) -> torch.Tensor:
    """Triggered twins of uint8 images: row i gets trigger i mod n, so every trigger is unlearned."""
    out = x.clone()
    for i, t in enumerate(triggers):
        out[i::len(triggers)] = t(x[i::len(triggers)])
    return out


@torch.no_grad()
def trigger_flips(model: nn.Module, triggers: list[Synthesised], pixels: torch.Tensor, labels: torch.Tensor,
                  chunk: int = 256) -> list[float]:
    """Per synthesised trigger: the share of the few-shot images of classes other than its target that it sends
    to its target."""
    model.eval()
    flips = []
    for t in triggers:
        x = pixels[labels != t.target]
        flips.append(float(torch.cat([model(t(x[s:s + chunk])).argmax(1) for s in range(0, len(x), chunk)])
                           .eq(t.target).float().mean()) if len(x) else 0.0)
    return flips


@torch.no_grad()
def pull_back(model: nn.Module, original: dict[str, torch.Tensor], triggers: list[Synthesised], pixels: torch.Tensor,
              labels: torch.Tensor, keep_flip: float, chunk: int = 256) -> dict:
    """Move the defended weights back toward the original ones, keeping share s of the change (s < 1), as far as no
    synthesised trigger sends more than `keep_flip` of the other classes' few-shot images to its target.

    Why: unlearning every synthesised trigger costs clean accuracy (GTSRB: 2-5 points), and part of the weight
    change is not needed to keep the triggers out; where it is (CIFAR-10 BadNets), the triggers' flips rise at once
    and the defended weights stay. The weights that come back keep the defended model's integer buffers."""
    defended = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flips = trigger_flips(model, triggers, pixels, labels, chunk)
    tried, kept = [{"share": 1.0, "flips": flips}], 1.0
    for share in PULL_BACK_SHARES:
        model.load_state_dict({k: toward(original[k], v, share) for k, v in defended.items()})
        flips = trigger_flips(model, triggers, pixels, labels, chunk)
        tried.append({"share": share, "flips": flips})
        if max(flips, default=0.0) > keep_flip:
            break
        kept = share
    model.load_state_dict(defended if kept == 1.0 else
                          {k: toward(original[k], v, kept) for k, v in defended.items()})
    model.eval()
    return {"share": kept, "keep_flip": keep_flip, "tried": tried}


def toward(original: torch.Tensor, defended: torch.Tensor, share: float) -> torch.Tensor:
    """original + share x (defended - original) for float tensors; integer buffers (counts) stay as defended."""
    if not defended.is_floating_point():
        return defended
    start = original.to(defended.device, defended.dtype)
    return start + share * (defended - start)
