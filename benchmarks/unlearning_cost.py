"""Where the default defence's accuracy goes, on the architecture benchmark's dev models (benchmarks/architectures.py;
dev only: this is where a recipe is chosen). Each variant replays the known-trigger defence at SPC 10 as the robust
recipe ran it before issue 31 (`--clean-views 0 --twin-repeats 1`: no pruning, distillation fine-tuning on the clean
images and their triggered twins) with one change:

- `clean-only`: the same fine-tuning on the clean images alone (no twins): what fine-tuning costs without unlearning;
- optimiser changes: FT-SAM's adaptive step (`sam2`), gradient-norm clipping (`clip1`, `clip0.1`), an L2-SP pull
  toward the original weights (`l2sp1`, `l2sp10`), the distillation targets alone (`distill-only`), random crops
  (`crop`), only the first or the second half of the parameters trained (`first-half`, `second-half`);
- `pull-back-S`: the default's weights moved back toward the original, keeping share S of the change;
- clean views (issue 31; rows in experiments/architectures-views/): `shiftK` adds K shifted copies of each clean image
  (`finetune.shifted_views`: what `--clean-views K` adds), `mix4` 4 mixtures of two clean images, `shift4-mix4` both;
  each view learns its source's true label and the original model's output on the view. On top of `shift4`:
  `-tw2` each twin twice (`--twin-repeats 2`: the recipe chosen), `-twins` the views also stamped with the trigger
  AFTER the shift, `-tgt2` the target class's clean images and views twice, `-head` the classifier frozen
  (`head`: the classifier frozen alone).

    python benchmarks/unlearning_cost.py [--shard 0/2] [--threads 1] [--variants V ...] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import RESULTS as ARCH_RESULTS  # noqa: E402
from architectures import cost_cells, digits_architectures, split_of, summarise, trained  # noqa: E402
from hf_gradprune.config import build_config  # noqa: E402
from hf_gradprune.finetune import TuneConfig, finetune, probabilities, shifted_views  # noqa: E402
from hf_gradprune.metrics import attack_metrics  # noqa: E402
from hf_gradprune.pipeline import prepare  # noqa: E402
from hf_gradprune.synth import toward  # noqa: E402

RESULTS = ARCH_RESULTS.parent / "experiments" / "architectures-unlearning"
PULL_BACK = (0.9, 0.8, 0.7, 0.6, 0.5)


class SteeredSGD(torch.optim.SGD):
    """The defence's SGD with the gradient clipped to a norm, or pulled toward the starting weights (L2-SP)."""

    def __init__(self, params: list, cfg: TuneConfig, clip: float | None = None, l2sp: float | None = None):
        super().__init__(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.trained = [p for g in self.param_groups for p in g["params"]]
        self.start = [p.detach().clone() for p in self.trained]
        self.clip, self.l2sp = clip, l2sp

    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        for p, s in zip(self.trained, self.start):
            if self.l2sp and p.grad is not None:
                p.grad.add_(p.detach() - s, alpha=self.l2sp)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.trained, self.clip)
        super().step()
        return loss


def steered(**kw):
    return lambda params, cfg: SteeredSGD(params, cfg, **kw)


def focus(model: torch.nn.Module, clean: torch.Tensor, twins: torch.Tensor, labels: torch.Tensor, share: float) -> None:
    """Train only the parameter tensors the unlearning loss points at: ranked by the norm of the triggered twins'
    cross-entropy gradient over the clean images' (both to the true labels), the top `share` of them by count.
    The two ranking passes run in train mode, so a batch-norm model's running statistics also move one step each
    before the fine-tuning (as the committed `focus-*` rows were measured)."""
    def grads(x: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.train()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        out = {n: p.grad.norm() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out
    g_twin, g_clean = grads(twins), grads(clean)
    ratio = {n: float(g_twin[n] / (g_clean[n] + 1e-12)) for n in g_twin}
    keep = set(sorted(ratio, key=ratio.get, reverse=True)[:max(1, round(share * len(ratio)))])
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def views(pixels: torch.Tensor, k: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`k` new clean images per few-shot image, drawn once: shifted copies ("shift": a random crop of the image padded
    by 1/8 of its side) or mixtures of two few-shot images ("mix": weight U(0.2, 0.8) on the first). Returns the
    images and, per image, the row of `pixels` it mostly shows."""
    if kind == "shift":  # what --clean-views K adds
        return shifted_views(pixels, k, seed)
    gen = torch.Generator().manual_seed(seed)
    src = torch.arange(len(pixels)).repeat(k)
    other = torch.randint(0, len(pixels), (len(src),), generator=gen)
    w = (0.2 + 0.6 * torch.rand(len(src), generator=gen)).view(-1, 1, 1, 1)
    mixed = (w * pixels[src].float() + (1 - w) * pixels[other].float()).round().to(pixels.dtype)
    main = torch.where(w.view(-1) >= 0.5, src, other)
    return mixed, main


# name -> (TuneConfig changes, optimiser maker, which half of the parameters trains, or "focus-S")
VARIANTS = {"default": ({}, None, None), "clean-only": ({}, None, None), "sam2": ({"sam_rho": 2.0}, None, None),
            "clip1": ({}, steered(clip=1.0), None), "clip0.1": ({}, steered(clip=0.1), None),
            "l2sp1": ({}, steered(l2sp=1.0), None), "l2sp10": ({}, steered(l2sp=10.0), None),
            "distill-only": ({"hard_labels": 0.0}, None, None), "crop": ({"augment": "crop"}, None, None),
            "first-half": ({}, None, "first"), "second-half": ({}, None, "second"),
            "focus-0.1": ({}, None, 0.1), "focus-0.25": ({}, None, 0.25), "focus-0.5": ({}, None, 0.5),
            "head": ({}, None, "head")}
# issue 31's clean views (`views`): name -> the views added per clean image; the changes below in `replay`
VIEWS = {"shift2": (("shift", 2),), "shift4": (("shift", 4),), "shift8": (("shift", 8),), "mix4": (("mix", 4),),
         "shift4-mix4": (("shift", 4), ("mix", 4)), "shift4-tgt2": (("shift", 4),), "shift4-head": (("shift", 4),),
         "shift4-twins": (("shift", 4),), "shift4-tw2": (("shift", 4),), "shift2-twins": (("shift", 2),)}
VARIANTS |= {name: ({}, None, "head" if name.endswith("-head") else None) for name in VIEWS}


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The last linear layer(s): timm's get_classifier() (DeiT-distilled: both heads), transformers' classifier."""
    net = model.net
    head = net.get_classifier() if hasattr(net, "get_classifier") else net.classifier
    return torch.nn.ModuleList(head) if isinstance(head, tuple) else head


def predict(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    return probabilities(model, pixels, batch_size).argmax(1)


def replay(family: str, seed: int, variant: str) -> dict:
    """The default defence's fine-tuning, as methods/gradprune.py runs it at SPC 10, with the variant's change."""
    built = trained(family, seed)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({"model": str(built["model"]), "data": str(built["data"]), "output": f"{tmp}/out",
                            "seed": seed})
    changes, make_optimizer, half = VARIANTS[variant]
    if changes.get("sam_rho"):  # as methods/gradprune.py takes FT-SAM's step
        from hf_gradprune.methods.ftsam import sam_optimizer
        make_optimizer = sam_optimizer(changes["sam_rho"])
    torch.manual_seed(seed)
    job = prepare(cfg)
    t, model, target = job.tensors, job.loaded.model, job.metrics_target
    before = attack_metrics(model, t.test, t.trig_test, t.test_y, target, job.batch_size)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before_target = float((predict(model, t.test, job.batch_size)[t.test_y == target] == target).float().mean())
    if isinstance(half, float):
        focus(model, t.train, t.trig_train, t.train_y, half)
    elif half == "head":  # the classifier frozen: unlearning must change the features, not lower the target logit
        for p in classifier_head(model).parameters():
            p.requires_grad_(False)
    elif half:
        params = list(model.parameters())
        for p in params[len(params) // 2:] if half == "first" else params[:len(params) // 2]:
            p.requires_grad_(False)
    soft = probabilities(model, t.train, job.batch_size)
    x, y, s = ((t.train, t.train_y, soft) if variant == "clean-only" else
               (torch.cat([t.train, t.trig_train]), torch.cat([t.train_y, t.train_y]), torch.cat([soft, soft])))
    for kind, k in VIEWS.get(variant, ()):  # extra clean images, taught the original model's output on them
        v, main = views(t.train, k, kind, seed)
        soft_v = probabilities(model, v, 256)
        x, y, s = torch.cat([x, v]), torch.cat([y, t.train_y[main]]), torch.cat([s, soft_v])
        if variant.endswith("-twins"):  # the views stamped AFTER the shift: the trigger where the attacker puts it
            from hf_gradprune.streaming import stamp_images
            from hf_gradprune.triggers import make_trigger
            stamped = stamp_images(make_trigger(cfg.trigger, job.loaded.input_size), v)
            x, y, s = torch.cat([x, stamped]), torch.cat([y, t.train_y[main]]), torch.cat([s, soft_v])
    if variant.endswith("-tw2"):  # the triggered twins twice: the unlearning's weight against the views'
        n = len(t.train_y)
        x, y, s = torch.cat([x, x[n:2 * n]]), torch.cat([y, y[n:2 * n]]), torch.cat([s, s[n:2 * n]])
    if variant.endswith("-tgt2"):  # the target class's clean images and their views once more
        again = torch.cat([t.train_y == target, torch.zeros_like(t.trig_train[:, 0, 0, 0], dtype=torch.bool),
                           t.train_y[main] == target])
        x, y, s = torch.cat([x, x[again]]), torch.cat([y, y[again]]), torch.cat([s, s[again]])
    finetune(model, x, y, t.val, t.val_y, replace(cfg.tune, **changes), None, cfg.seed, val_triggered=t.trig_val,
             soft_targets=s, make_optimizer=make_optimizer, chunk_size=job.batch_size)
    out = {"family": family, "seed": seed, "variant": variant, "before": before.acc, "asr_before": before.asr}
    after = attack_metrics(model, t.test, t.trig_test, t.test_y, target, job.batch_size)
    out |= {"acc_drop": before.acc - after.acc, "asr": after.asr}
    with torch.no_grad():  # where the accuracy went: the target class's clean images, or the others
        is_target = t.test_y == target
        out["target_class_acc_drop"] = before_target - float((predict(model, t.test, job.batch_size)[is_target]
                                                              == target).float().mean())
    if variant == "default":
        defended = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for share in PULL_BACK:
            model.load_state_dict({k: toward(original[k], v, share) for k, v in defended.items()})
            m = attack_metrics(model, t.test, t.trig_test, t.test_y, target, job.batch_size)
            out[f"pull-back-{share}"] = {"acc_drop": before.acc - m.acc, "asr": m.asr}
    return out


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append({"acc_drop": r["acc_drop"], "after": {"asr": r["asr"]}})
        for share in PULL_BACK:
            if f"pull-back-{share}" in r:
                pulled = r[f"pull-back-{share}"]
                by.setdefault(f"pull-back-{share}", []).append({"acc_drop": pulled["acc_drop"],
                                                                "after": {"asr": pulled["asr"]}})
    lines = ["| variant | rows | ACC drop mean (max) | ASR after mean (max) |", "|---|---|---|---|"]
    lines += [f"| {name} | {len(rs)} | {cost_cells(summarise(rs))} |" for name, rs in by.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard", default="0/1", help="I/N: every N-th row from the I-th (parallel workers)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=RESULTS, help="rows and table folder (one machine's rows together)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="only these (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [(f, s, v) for s in (0, 1) for f in digits_architectures() if split_of(f, s) == "dev"
             for v in (args.variants or VARIANTS)]
    i, n = (int(v) for v in args.shard.split("/"))
    for family, seed, variant in cells[i::n]:
        path = args.out / "rows" / f"{family}-s{seed}-{variant}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(replay(family, seed, variant), indent=1))
    rows = [json.loads(q.read_text()) for q in sorted((args.out / "rows").glob("*.json"))]
    heading = "# Where the default defence's accuracy goes (dev models)\n\n"
    (args.out / "table.md").write_text(heading + table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
