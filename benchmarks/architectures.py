"""What a defence costs on every architecture family: a small digits classifier of each family
(`hf_gradprune.demo.digits_architectures`: timm ViT, DeiT, Swin, ConvNeXt, MobileNetV3, ResNetV2; transformers ViT,
Swin, ConvNeXt, ResNet) with a real BadNets backdoor, seeds 0-2, defended through the CLI as a user would (known
trigger, SPC 10, default settings unless the variant says otherwise).

Split once, before any choice: dev = five families (DEV) on seeds 0-1, where recipes are chosen; test = the other
five families on every seed and the dev families on seed 2, reported only.

    python benchmarks/architectures.py run [--variant default] [--split dev] [--only vit] [--shard 0/2]
    python benchmarks/architectures.py report          # summary.json + table.md of every variant's rows

Each model is trained once and cached by its configuration (benchmarks/cache/architectures/); each defence is one
row in benchmarks/results/architectures/rows/<variant>/<family>-s<seed>.json, so an interrupted run continues where
it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_gradprune.cli import main as cli
from hf_gradprune.demo import build_backdoored_digits, digits_architectures

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "architectures"
RESULTS = ROOT / "results" / "architectures"
SEEDS = (0, 1, 2)
DEV = ("timm-vit", "timm-convnext", "timm-mobilenetv3", "hf-swin", "hf-resnet")  # chosen on, seeds 0-1
DEV_SEEDS = (0, 1)
NO_VIEWS = ["--clean-views", "0", "--twin-repeats", "1"]  # the default before issue 31: the variants below it were
#                                                           measured against it
VARIANTS: dict[str, list[str]] = {  # name -> the CLI flags it adds to the default job
    "default": [],
    "paper": ["--recipe", "paper"],
    "views0": NO_VIEWS,
    "steps80": [*NO_VIEWS, "--max-steps", "80"],
    "distill10": [*NO_VIEWS, "--distill", "10"],
    "lr3e-4": [*NO_VIEWS, "--lr", "0.0003"],
    "prune": [*NO_VIEWS, "--max-rounds", "500"],  # the robust recipe's pruning rules, switched on at SPC 10
    "prune-steps80": [*NO_VIEWS, "--max-rounds", "500", "--max-steps", "80"],
    "prune-views": ["--max-rounds", "500"],  # the architecture tests' settings
    "views4-twins1": ["--twin-repeats", "1"],  # the clean views alone (rows measured with the shifted views only)
    # the synthesised-trigger path (--blind: the defence sees only what the scan synthesised, ASR is measured with
    # the real trigger; --force: a model the scan calls clean is defended against its most anomalous class all the
    # same), as the default runs it (no views) and with the known-trigger default's views
    "blind": ["--blind", "--force"],
    "blind-views": ["--blind", "--force", "--clean-views", "4", "--twin-repeats", "2"],
}


def split_of(family: str, seed: int) -> str:
    return "dev" if family in DEV and seed in DEV_SEEDS else "test"


def model_key(family: str, seed: int) -> str:
    """The cache key: the family's recipe (config objects by their JSON) and the seed."""
    recipe = digits_architectures()[family]
    text = json.dumps({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in recipe.items()} | {"seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def trained(family: str, seed: int, log=print) -> dict:
    """The backdoored model and its digits data in Hub layout, trained once per configuration."""
    folder = CACHE / f"{family}-s{seed}-{model_key(family, seed)}"
    info = folder / "info.json"
    if not info.is_file():
        log(f"training {family} seed {seed}")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.is_dir() else None) as tmp:
            built = build_backdoored_digits(Path(tmp), seed=seed, **digits_architectures()[family])
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left
            folder.mkdir(parents=True)
            for part in ("model", "data"):
                Path(tmp, part).rename(folder / part)
        info.write_text(json.dumps({"asr": built["asr"], "training_runs": built["training_runs"],
                                    "train_s": time.perf_counter() - t0}))
    return {"model": folder / "model", "data": folder / "data", **json.loads(info.read_text())}


def run_row(family: str, seed: int, variant: str, log=print) -> Path:
    path = RESULTS / "rows" / variant / f"{family}-s{seed}.json"
    if path.is_file():
        return path
    built = trained(family, seed, log)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        code = cli([str(built["model"]), "--data", str(built["data"]), "--output", str(out), "--seed", str(seed),
                    "--quiet", *VARIANTS[variant]])
        wall = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"{family} seed {seed}: the defence exited {code}")
        report = json.loads((out / "gradprune_report.json").read_text())
    row = {"family": family, "seed": seed, "split": split_of(family, seed), "variant": variant,
           "flags": VARIANTS[variant], "model_key": model_key(family, seed), "training_runs": built["training_runs"],
           "before": report["before"], "after": report["after"],
           "acc_drop": report["before"]["acc"] - report["after"]["acc"], "finetune_epochs": report["finetune_epochs"],
           "pruned": len(report["pruned"]), "recipe": report["method"].get("recipe"), "wall_s": wall,
           "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    log(f"{family} seed {seed} [{variant}]: ACC {100 * row['before']['acc']:.1f} -> {100 * row['after']['acc']:.1f}, "
        f"ASR {100 * row['before']['asr']:.1f} -> {100 * row['after']['asr']:.1f} ({wall:.0f} s)")
    return path


def rows(variant: str) -> list[dict]:
    folder = RESULTS / "rows" / variant
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def cost_cells(m: dict) -> str:
    """A summary's two table cells: ACC drop and ASR after, mean (max), in points."""
    return (f"{_pts(m['acc_drop_mean'])} ({_pts(m['acc_drop_max'])}) | "
            f"{_pts(m['asr_after_mean'])} ({_pts(m['asr_after_max'])})")


def summarise(rs: list[dict]) -> dict:
    drops = [r["acc_drop"] for r in rs]
    asrs = [r["after"]["asr"] for r in rs]
    return {"n": len(rs), "acc_drop_mean": statistics.fmean(drops) if rs else None,
            "acc_drop_max": max(drops, default=None), "asr_after_mean": statistics.fmean(asrs) if rs else None,
            "asr_after_max": max(asrs, default=None)}


def summary() -> dict:
    out = {}
    for variant in VARIANTS:
        rs = rows(variant)
        if rs:
            out[variant] = {part: summarise([r for r in rs if r["split"] == part]) for part in ("dev", "test")}
    return out


def _pts(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(variant: str = "default") -> str:
    """Per family: ACC before -> after and ASR after, mean over its seeds on each side of the split."""
    rs = rows(variant)
    trigger = ("trigger synthesised by the scan (ASR with the real BadNets trigger)" if "--blind" in VARIANTS[variant]
               else "known trigger (BadNets)")
    lines = [f"Variant `{variant}` (flags: `{' '.join(VARIANTS[variant]) or 'none'}`), digits, SPC 10, {trigger}; "
             "points of ACC lost and ASR after, mean over seeds (`python benchmarks/architectures.py run "
             f"--variant {variant}`):", "",
             "| part | family | seeds | ACC before | ACC after | ACC drop (max) | ASR before | ASR after (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for part in ("dev", "test"):
        for family in digits_architectures():
            cell = [r for r in rs if r["split"] == part and r["family"] == family]
            if not cell:
                continue
            mean = (lambda f, cell=cell: statistics.fmean(f(r) for r in cell))
            lines.append(f"| {part} | {family} | {','.join(str(r['seed']) for r in cell)} | "
                         f"{_pts(mean(lambda r: r['before']['acc']))} | {_pts(mean(lambda r: r['after']['acc']))} | "
                         f"{_pts(mean(lambda r: r['acc_drop']))} ({_pts(max(r['acc_drop'] for r in cell))}) | "
                         f"{_pts(mean(lambda r: r['before']['asr']))} | {_pts(mean(lambda r: r['after']['asr']))} "
                         f"({_pts(max(r['after']['asr'] for r in cell))}) |")
        s = summarise([r for r in rs if r["split"] == part])
        if s["n"]:
            lines.append(f"| **{part}** | all ({s['n']} rows) | | | | **{_pts(s['acc_drop_mean'])}** "
                         f"({_pts(s['acc_drop_max'])}) | | **{_pts(s['asr_after_mean'])}** "
                         f"({_pts(s['asr_after_max'])}) |")
    return "\n".join(lines)


def summary_table() -> str:
    """Every variant measured, dev and test apart: the figures the issue's bar is read on."""
    lines = ["| variant | flags | part | rows | ACC drop mean (max) | ASR after mean (max) |",
             "|---|---|---|---|---|---|"]
    for variant, parts in summary().items():
        for part, m in parts.items():
            if m["n"]:
                lines.append(f"| {variant} | `{' '.join(VARIANTS[variant]) or '-'}` | {part} | {m['n']} | "
                             f"{cost_cells(m)} |")
    return "\n".join(lines)


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary(), indent=1))
    (RESULTS / "table.md").write_text("# Defence cost per architecture\n\n" + summary_table() + "\n\n" +
                                      "\n\n".join(table(v) for v in VARIANTS if rows(v)) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--variant", default="default", choices=list(VARIANTS))
    p.add_argument("--split", choices=["dev", "test"], help="only this part")
    p.add_argument("--only", nargs="*", default=[], help="only families whose name contains one of these")
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--shard", default="0/1", help="I/N: every N-th row from the I-th (parallel workers)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "report":
        report()
        return 0
    cells = [(f, s) for s in args.seeds for f in digits_architectures()
             if (args.split in (None, split_of(f, s))) and (not args.only or any(o in f for o in args.only))]
    i, n = (int(v) for v in args.shard.split("/"))
    for family, seed in cells[i::n]:
        run_row(family, seed, args.variant, log=lambda m: print(m, file=sys.stderr, flush=True))
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
