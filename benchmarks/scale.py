"""Real-size checkpoints: peak memory and seconds per pruning round against the forward+backward floor, for
224-pixel models at 10, 100 and 1000 classes (SPC 10: 90, 900, 9000 few-shot training images).

    python benchmarks/scale.py [--models resnet50 vit_base_patch16_224] [--classes 10 100 1000] [--rounds 3]
                               [--batch-size auto] [--results benchmarks/results/scale-<tag>]

Random weights (time and memory do not depend on them). Each cell runs in its own process, so its peak resident
memory (ru_maxrss; Linux carries a parent's peak into its child, and this parent holds only numpy) is the job's
alone: load the Hub-layout folder, decode the few-shot draw at 224 px, choose the
batch (`--batch-size auto` unless given), prune `--rounds` rounds (Grad-Prune's engine, BadNets trigger, target 0),
then time the floor: one plain forward+backward over the training images + one forward over the checked images
(hf_gradprune.prune.round_floor), median of `--floor-repeats`. `--full-job` runs the whole CLI job instead
(`hf-gradprune MODEL --data DATA`, fine-tuning included, at most `--max-epochs`): the memory a user sees.
Writes one JSON per cell (resumable), `scale.json` and `scale.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "scale"
RESULTS = ROOT / "results"


def build(arch: str, classes: int, spc: int) -> tuple[Path, Path]:
    """A random-weight timm model in Hub layout and a dataset of `classes` x spc small images (resized to 224
    by the model's own preprocessing, as a user's photos are), 2 test images per class."""
    from hf_gradprune.demo import save_timm, timm_classifier, write_hub_dataset
    folder = CACHE / f"{arch}-{classes}"
    model_dir, data_dir = folder / "model", folder / f"data-spc{spc}"
    names = [f"class{i:04d}" for i in range(classes)]
    if not (model_dir / "model.safetensors").is_file():
        save_timm(timm_classifier(arch, names, size=224), model_dir, {}, names)
    if not (data_dir / "README.md").is_file():
        rng = np.random.default_rng(0)
        splits = {}
        for split, k in (("train", spc), ("test", 2)):
            y = np.repeat(np.arange(classes), k)
            # smooth random images: 8x8 colour fields upsampled, so the PNGs stay small
            x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
            splits[split] = (x, y)
        write_hub_dataset(data_dir, splits, names)
    return model_dir, data_dir


def cell(arch: str, classes: int, spc: int, rounds: int, batch_size: str, floor_repeats: int) -> dict:
    """One cell, in this process: prepare, prune `rounds` rounds, time the floor."""
    import torch

    from hf_gradprune.memory import parse_batch_size
    from hf_gradprune.pipeline import JobConfig, prepare
    from hf_gradprune.prune import PruneConfig, gradient_prune, round_floor
    from hf_gradprune.triggers import TriggerSpec
    from hf_gradprune.units import UnitPruner, find_units
    model_dir, data_dir = build(arch, classes, spc)
    t0 = time.perf_counter()
    cfg = JobConfig(model=str(model_dir), data=str(data_dir), spc=spc, trigger=TriggerSpec("badnet"), target="0",
                    batch_size=parse_batch_size(batch_size), eval_limit=classes,
                    prune=PruneConfig(max_rounds=rounds, patience=rounds + 1, alpha=0.99))
    job = prepare(cfg)
    t_prepare = time.perf_counter() - t0
    model, t = job.loaded.model, job.tensors
    pruner = UnitPruner(find_units(model, job.loaded.net, t.train[:2]))
    stamps = [time.perf_counter()]
    result = gradient_prune(model, pruner, t.trig_train, t.train_y, t.val, t.trig_val, t.val_y,
                            cfg.prune, job.target, job.batch_size, lambda r: stamps.append(time.perf_counter()),
                            job.procs, train_clean=t.train)
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]
    floor = round_floor(model, pruner, t.trig_train, t.train_y, t.val, t.trig_val, job.batch_size,
                        repeats=floor_repeats)
    round_s = statistics.median(per_round[1:] if len(per_round) > 2 else per_round)
    return {"model": arch, "classes": classes, "spc": spc, "n_train": len(t.train_y), "n_val": len(t.val_y),
            "units": pruner.num_units, "batch": job.batch.to_dict(), "rounds": len(per_round),
            "round_s": per_round, "median_round_s": round_s, "floor_s": floor, "round_over_floor": round_s / floor,
            "chosen": [(r.layer, r.index) for r in result.rounds],  # in the order the rounds chose them
            "prepare_s": t_prepare, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def full_job(arch: str, classes: int, spc: int, batch_size: str, max_epochs: int, max_rounds: int) -> dict:
    """The whole CLI job as a user runs it (defaults, but for a bounded fine-tuning), in this process."""
    import tempfile

    from hf_gradprune.cli import main
    model_dir, data_dir = build(arch, classes, spc)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code = main([str(model_dir), "--data", str(data_dir), "--output", f"{tmp}/out", "--quiet", "--target", "0",
                     "--eval-limit", str(classes), "--batch-size", batch_size, "--max-epochs", str(max_epochs),
                     "--max-rounds", str(max_rounds), "--spc", str(spc)])
        report = json.loads((Path(tmp) / "out" / "gradprune_report.json").read_text()) if code == 0 else {}
    return {"model": arch, "classes": classes, "spc": spc, "exit": code, "wall_s": time.perf_counter() - t0,
            "batch": report.get("batch"), "pruned": [(p["layer"], p["index"]) for p in report.get("pruned", [])],
            "timing_s": report.get("timing_s"),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def table(rows: list[dict]) -> str:
    lines = ["| model | classes | train images | batch (auto) | peak memory GiB | s / round | floor s | "
             "round / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["classes"], r["batch"]["source"])):
        b = r["batch"]
        lines.append(f"| {r['model']} | {r['classes']} | {r['n_train']} | {b['batch_size']}"
                     f"{'' if b['source'].startswith('auto') else ' (given)'} | {r['peak_rss_gib']:.2f} | "
                     f"{r['median_round_s']:.1f} | {r['floor_s']:.1f} | {r['round_over_floor']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_base_patch16_224"])
    ap.add_argument("--classes", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--spc", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="pruning rounds timed per cell (the first is not counted)")
    ap.add_argument("--floor-repeats", type=int, default=3)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--full-job", action="store_true", help="run the whole CLI job per cell (memory a user sees)")
    ap.add_argument("--max-epochs", type=int, default=2, help="--full-job: fine-tuning epochs at most")
    ap.add_argument("--results", type=Path, default=None, help="default benchmarks/results/scale-<machine>")
    ap.add_argument("--tag", default=None, help="machine tag in the result folder name (default: the CPU flags)")
    ap.add_argument("--cell", nargs=2, metavar=("MODEL", "CLASSES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        arch, classes = args.cell[0], int(args.cell[1])
        row = full_job(arch, classes, args.spc, args.batch_size, args.max_epochs, args.rounds) if args.full_job \
            else cell(arch, classes, args.spc, args.rounds, args.batch_size, args.floor_repeats)
        print(json.dumps(row))
        return 0
    results = args.results or RESULTS / f"scale-{args.tag or _machine()}"
    (results / "rows").mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.models:
        for classes in args.classes:
            kind = "job" if args.full_job else "cell"
            path = results / "rows" / f"{kind}-{arch}-{classes}-spc{args.spc}-b{args.batch_size}.json"
            if not path.is_file():
                print(f"{kind} {arch} {classes} classes, batch {args.batch_size} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--cell", arch, str(classes), "--spc", str(args.spc), "--rounds",
                       str(args.rounds), "--floor-repeats", str(args.floor_repeats), "--batch-size", args.batch_size,
                       "--max-epochs", str(args.max_epochs)] + (["--full-job"] if args.full_job else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                command = " ".join(["python benchmarks/scale.py"] + (argv or sys.argv[1:]))
                path.write_text(json.dumps({**json.loads(out.stdout.strip().splitlines()[-1]), "command": command},
                                           indent=1))
            row = json.loads(path.read_text())
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in ("chosen", "pruned", "round_s", "command")}),
                  flush=True)
    cells = [r for r in sorted((json.loads(p.read_text()) for p in (results / "rows").glob("cell-*.json")),
                               key=lambda r: (r["model"], r["classes"]))]
    if cells:
        text = table(cells)
        (results / "scale.md").write_text(text + "\n")
        (results / "scale.json").write_text(json.dumps(cells, indent=1))
        print(text)
    return 0


def _machine() -> str:
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    raise SystemExit(main())
