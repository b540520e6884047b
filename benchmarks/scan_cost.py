"""What the scan (`hf-gradprune scan`, `--trigger unknown`) costs as the number of classes grows: 10 (CIFAR-10), 43
(GTSRB), 100 and 1000 (ImageNet) classes.

    python benchmarks/scan_cost.py [--model cpu-tier] [--classes 10 43 100 1000] [--spc 10] [--full 20]
        [--select screen] [--results DIR]

`--model`: the cpu tier's model (timm resnet18 at half width, 32 px; the default), a full-width timm resnet18 at
32 px, or the detection benchmark's transformers ViT and timm ConvNeXt (`benchmarks/detection.py`'s FAMILIES).
Random weights and random few-shot images: the scan
runs a fixed number of Adam steps whatever the weights, so time does not depend on them. Up to `max_classes` (10)
classes every class is scanned (path `all`, 2 optimisations each); above it 10 classes are scanned in full, chosen
by the screen (path `screen`, up to 100 classes: 15 steps of both searches for every class on 16 images a step,
which count towards the scanned classes' 150) or by the untargeted probe (path `probe`, `--select probe`, and above
100 classes: the optimisations stay at 20 and only the probe's last pass, one forward over all few-shot images,
grows with K).
`--full K` also times the per-class scan of every one of K classes (`max_classes=K`, path `full`).
Writes `scan_cost.json` and `scan_cost.md`; each cell is one JSON (resumable).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from hf_gradprune.demo import timm_classifier
from hf_gradprune.synth import FAMILIES, ScanConfig, how_chosen, scan

ROOT = Path(__file__).resolve().parent

MODEL_ARGS = {"channels": [32, 64, 128, 256], "stem_width": 32}  # the cpu tier's CIFAR-10 / GTSRB model
MODELS = ("cpu-tier", "resnet18-full", "detection-vit", "detection-convnext")


def build(name: str, classes: int):
    """The model to time, with random weights (the scan's cost does not depend on them)."""
    labels = [f"class{i}" for i in range(classes)]
    if name == "cpu-tier":
        return timm_classifier("resnet18", labels, size=32, **MODEL_ARGS)
    if name == "resnet18-full":
        return timm_classifier("resnet18", labels, size=32)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from detection import Spec
    from detection import build as build_family
    family = {"detection-vit": "hf-vit", "detection-convnext": "timm-convnext"}[name]
    spec = Spec(name=name, split="dev", dataset="cifar10", family=family, trigger=None, target=None, poison_rate=0.0,
                augment=False, seed=0)
    return build_family(spec, labels)[0]


def path_of(classes: int, select: str, full: bool) -> str:
    """Which path the scan takes: every class forced ("full"), or as the scan chooses (synth.how_chosen: "all",
    "screen" or "probe")."""
    return "full" if full else how_chosen(classes, ScanConfig(select=select))


def cell(model_name: str, classes: int, spc: int, full: bool, select: str = ScanConfig.select) -> dict:
    model = build(model_name, classes).eval()
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.repeat(np.arange(classes), spc))
    pixels = torch.from_numpy(rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8))
    cfg = ScanConfig(max_classes=classes) if full else ScanConfig(select=select)
    res = scan(model, pixels, labels, classes, cfg)
    optimisations = len(res.scanned) * len(FAMILIES)
    path = path_of(classes, select, full)
    steps = optimisations * cfg.steps + {"probe": len(FAMILIES) * cfg.probe_steps,  # the screen's steps count
                                         "screen": (classes - len(res.scanned)) * len(FAMILIES) * cfg.screen_steps,
                                         }.get(path, 0)  # towards the scanned classes' own
    batch = min(cfg.batch_size, spc * (classes - 1))  # a search's images: the few-shot images of the other classes
    screened = classes * len(FAMILIES) * cfg.screen_steps if path == "screen" else 0  # steps on screen_batch images
    passes = (steps - screened) * batch + screened * min(cfg.screen_batch, batch)  # as synth.scan takes them
    return {"model": model_name, "parameters": sum(p.numel() for p in model.parameters()),
            "classes": classes, "spc": spc, "images": len(labels), "path": path,
            "scanned_classes": len(res.scanned), "optimisations": optimisations, "adam_steps": steps,
            "batch": cfg.batch_size, "screen_batch": cfg.screen_batch if path == "screen" else None,
            "image_passes": passes, "probe_s": res.timing_s["probe"], "scan_s": res.timing_s["scan"],
            "ms_per_step": 1000 * res.timing_s["scan"] / steps, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | classes | few-shot images | path | classes scanned | optimisations | "
             "Adam steps | image passes (k) | probe or screen s | scan s (probe or screen included) | "
             "ms / 1k image passes |", "|---" * 12 + "|"]
    for r in sorted(rows, key=lambda r: (MODELS.index(r.get("model", "cpu-tier")), r["classes"], r["path"])):
        params = f"{r['parameters'] / 1e6:.2f} M" if "parameters" in r else "-"
        lines.append(f"| {r.get('model', 'cpu-tier')} | {params} | {r['classes']} | {r['images']} | {r['path']} | "
                     f"{r['scanned_classes']} | {r['optimisations']} | "
                     f"{r['adam_steps']} | {r['image_passes'] / 1e3:.0f} | {r['probe_s']:.1f} | {r['scan_s']:.1f} | "
                     f"{1e6 * r['scan_s'] / r['image_passes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="cpu-tier", help="the model to time (see above)")
    ap.add_argument("--classes", type=int, nargs="*", default=[10, 43, 100, 1000])
    ap.add_argument("--spc", type=int, default=10, help="few-shot images per class")
    ap.add_argument("--full", type=int, nargs="*", default=[20], help="class counts to time the per-class scan at too")
    ap.add_argument("--select", choices=("screen", "probe"), default=ScanConfig.select,
                    help="above 10 classes, how the classes scanned in full are chosen (--scan-select)")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "scan-cost")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    prefix = "" if args.model == "cpu-tier" else f"{args.model}-"  # the cpu tier's rows keep their names
    for classes, full in [(k, False) for k in args.classes] + [(k, True) for k in args.full if k > 10]:
        path = args.results / "rows" / f"{prefix}k{classes}-spc{args.spc}-{path_of(classes, args.select, full)}.json"
        if not path.is_file():
            row = cell(args.model, classes, args.spc, full, args.select)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2))
            print(f"{args.model}, {classes} classes, {row['path']}: {row['optimisations']} optimisations, "
                  f"{row['scan_s']:.1f} s", file=sys.stderr, flush=True)
    rows = [json.loads(p.read_text()) for p in sorted((args.results / "rows").glob("*.json"))]  # every model's rows
    text = table(rows)
    (args.results / "scan_cost.json").write_text(json.dumps(rows, indent=2))
    (args.results / "scan_cost.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
