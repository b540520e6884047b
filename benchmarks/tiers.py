"""Real-data benchmark of hf-gradprune, one command per tier:

    python benchmarks/tiers.py smoke            # minutes on 2 CPU cores, built-in digits data (run by the tests)
    python benchmarks/tiers.py cpu [--data ../shared/data]   # CIFAR-10 + GTSRB, 4 attacks, SPC 2/10/100, 3 seeds
    python benchmarks/tiers.py paper-cpu [--data ../shared/data] # aiming at the paper's clean accuracy on CPU
    python benchmarks/tiers.py paper [--data ../shared/data] # ResNetV2-18 (pre-activation), full recipe: a GPU job
    python benchmarks/tiers.py cpu --report     # rebuild table and plots from the rows already on disk
    python benchmarks/tiers.py cpu --method ft fp nad clp ftsam anp   # the baselines, on the same cells
    python benchmarks/tiers.py cpu --variant r-crop --spc 10   # a Grad-Prune variant (variants.py), rows apart
    python benchmarks/tiers.py cpu --compare    # the variants beside the two recipes
    python benchmarks/tiers.py cpu --blind --spc 10 --seeds 0   # the trigger unknown: the defence never sees it

Grad-Prune runs in both recipes: `gradprune` is the default (robust) recipe, `gradprune-paper` the paper's exact one.

Every (dataset, attack, SPC, seed, method) is one row in benchmarks/results/<tier>/rows/ (a variant's, or a
setting's search, in benchmarks/results/experiments/<tier>-<variant>/rows/); rows and trained models
already on disk are reused, so an interrupted run continues where it stopped. All methods of a cell run on the same
backdoored model, the same few-shot draw (same seed) and the same test images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import ATTACKS, trigger_spec  # noqa: E402
from variants import VARIANTS, variant_configs  # noqa: E402
from zoo import CACHE, CLEAN, Recipe, backdoored  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# "gradprune" = Grad-Prune in its default (robust) recipe, "gradprune-paper" = the paper's recipe, then the baselines
METHODS = ("gradprune", "gradprune-paper", "ft", "fp", "nad", "clp", "ftsam", "anp")
GRADPRUNE = ("gradprune", "gradprune-paper")
# FT-SAM's GTSRB settings; no horizontal flips for traffic signs (the zoo trains GTSRB without them too)
GTSRB_BASELINE = {"sam_rho": 8.0, "sam_label_smoothing": 0.0, "augment": "crop"}


VIT_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}
CONVNEXT_ARGS = {"dims": [32, 64, 128, 256], "depths": [2, 2, 4, 2]}
ARCH_METHODS = ("gradprune", "gradprune-paper", "ft", "fp", "nad", "ftsam")


@dataclass
class Tier:
    datasets: list[str]
    attacks: tuple = ATTACKS
    spcs: tuple = (10,)
    seeds: tuple = (0,)
    recipes: dict = field(default_factory=dict)  # dataset -> Recipe
    eval_limit: int | None = None
    methods: tuple = ("gradprune",)
    baseline_attacks: tuple = ATTACKS  # cells the baselines run on (those where the attack takes hold)
    baseline_seeds: dict = field(default_factory=dict)  # SPC -> the seeds the baselines run at that SPC (default: all)
    # dataset -> BaselineConfig overrides (the papers' per-dataset settings)
    baseline: dict = field(default_factory=dict)


TIERS = {
    # batch 32 (as the demo trains) for 12 epochs: at batch 64 for 8 epochs the BadNets and LF backdoors took hold under
    # torch 2.15.0 but not under 2.14.1 (ASR 33 % and 39 %); batch 32 x 12 gave 98.5 / 100 / 99.1 % there
    "smoke": Tier(["digits"], spcs=(10,), seeds=(0,),
                  recipes={"digits": Recipe(model_args={"channels": [16, 32, 64, 128], "stem_width": 16}, epochs=12,
                                            lr=0.05, batch_size=32)},
                  methods=METHODS, baseline_attacks=("badnet",),
                  baseline={"digits": {"anp_iters": 300, "augment": "crop"}}),
    # ANP: each mask iteration costs 3 forward + 2 backward passes; 2000 of them take about 5 min a run on 2 cores,
    # so the cpu tier runs 500 (the paper tiers run ANP's 2000)
    "cpu": Tier(["cifar10", "gtsrb"], spcs=(10, 2, 100), seeds=(0, 1, 2),
                recipes={"cifar10": Recipe(epochs=12, lr=0.05), "gtsrb": Recipe(epochs=8, lr=0.05)},
                methods=METHODS, baseline_attacks=("badnet", "blended", "lf"),
                # SPC 100 baselines on one seed: GTSRB's 4300 few-shot images make each of them 7-19 min on a core
                # (FT, NAD, FP and FT-SAM fine-tune up to 100 epochs); `--seeds 1 2` runs the others
                baseline_seeds={100: (0,)},
                baseline={"cifar10": {"anp_iters": 500}, "gtsrb": {**GTSRB_BASELINE, "anp_iters": 500}}),
    # beyond conv filters: a small ViT (patch 4, 65 tokens, 4 blocks of 3 heads and 192 MLP neurons) and a narrow
    # ConvNeXt, 8 epochs at lr 0.05 (71 and 58 s an epoch on 2 cores); CLP and ANP refuse them (no conv feeds a batch
    # norm). The baselines run on seed 0 (`--seeds 1 2` adds the others); ACC / ASR on the first 2000 test images
    "cpu-vit": Tier(["cifar10"], attacks=("badnet", "blended"), spcs=(10,), seeds=(0, 1, 2),
                    recipes={"cifar10": Recipe(arch="vit_tiny_patch16_224", model_args=VIT_ARGS, epochs=8, lr=0.05)},
                    methods=ARCH_METHODS, baseline_seeds={10: (0,)}, eval_limit=2000),
    "cpu-convnext": Tier(["cifar10"], attacks=("badnet", "blended"), spcs=(10,), seeds=(0, 1, 2),
                         recipes={"cifar10": Recipe(arch="convnext_atto", model_args=CONVNEXT_ARGS, epochs=8, lr=0.05)},
                         methods=ARCH_METHODS, baseline_seeds={10: (0,)}, eval_limit=2000),
    # lr 0.05, not BackdoorBench's 0.01: with 12 epochs instead of 100, lr 0.01 cosine gave a CIFAR-10 BadNets model
    # of 63.8 % ACC that had not learned the backdoor at all (ASR 8.6 %), nothing to defend against
    # BackdoorBench's CIFAR PreActResNet-18 has a 3x3 stride-1 stem; the Hub-loadable pre-activation ResNet-18 is timm's
    # resnetv2_18 (ImageNet stem), the closest a Hub user meets. GPU jobs: see docs/benchmarks.md.
    # aiming at the paper's clean accuracy on 2 CPU cores (issue 30): timm's ResNet-18 at half width reads 32 px images
    # resized to 64 by its own preprocessing (input_size 64 in its pretrained_cfg, as Hub checkpoints fine-tuned on
    # CIFAR-10 upsample), so its first stage works at 16x16 where the cpu tier's works at 8x8; the attacker
    # poisons the resized images, the resolution every defender sees. Channels-last, one-cycle, label smoothing 0.1;
    # BPP as BackdoorBench's default.yaml (8 levels, no dithering, negative samples at 0.1)
    "paper-cpu": Tier(["cifar10", "gtsrb"], spcs=(10, 2, 100), seeds=(0, 1, 2, 3, 4),
                      recipes={d: Recipe(epochs=e, lr=0.1, schedule="onecycle", label_smoothing=0.1,
                                         channels_last=True, input_size=64, bpp_neg_rate=0.1)
                               for d, e in (("cifar10", 20), ("gtsrb", 12))},
                      methods=METHODS, baseline_seeds={10: (0, 1, 2), 2: (0,), 100: (0,)},
                      baseline={"cifar10": {"anp_iters": 500}, "gtsrb": {**GTSRB_BASELINE, "anp_iters": 500}}),
    "paper": Tier(["cifar10", "gtsrb"], spcs=(2, 10, 100), seeds=(0, 1, 2, 3, 4),
                  recipes={d: Recipe(arch="resnetv2_18", model_args={}, epochs=100) for d in ("cifar10", "gtsrb")},
                  methods=METHODS, baseline={"gtsrb": GTSRB_BASELINE}),
    "paper-vgg": Tier(["cifar10", "gtsrb"], spcs=(2, 10, 100), seeds=(0, 1, 2, 3, 4),
                      recipes={d: Recipe(arch="vgg19_bn", model_args={}, epochs=100) for d in ("cifar10", "gtsrb")},
                      methods=METHODS, baseline={"gtsrb": GTSRB_BASELINE}),
}


def row_path(results: Path, dataset: str, attack: str, spc: int, seed: int, method: str = "gradprune") -> Path:
    suffix = "" if method == "gradprune" else f"-{method}"
    return results / "rows" / f"{dataset}-{attack}-spc{spc}-seed{seed}{suffix}.json"


def baseline_config(t: Tier, dataset: str):
    from hf_gradprune.job import BaselineConfig
    overrides = dict(t.baseline.get(dataset, {}))
    cfg = BaselineConfig()
    tune_keys = {k: overrides.pop(k) for k in list(overrides) if k in ("augment",)}
    return replace(cfg, tune=replace(cfg.tune, **tune_keys), **overrides)


def run_row(tier: str, t: Tier, dataset: str, attack: str, spc: int, seed: int, data_root: Path, results: Path,
            cache: Path, log, method: str = "gradprune", variant: str | None = None, blind: bool = False,
            scan: dict | None = None) -> dict:
    """One row; `variant` (variants.py) replaces Grad-Prune's recipe by a variant of it. `blind`: the defence scans
    and synthesises the trigger (--blind); the real one only measures. A clean model's row is its scan's verdict."""
    from hf_gradprune.pipeline import JobConfig, run
    from hf_gradprune.synth import ScanConfig
    prune = tune = None  # None: the recipe's, as JobConfig makes them for the job's SPC
    job_changes = {}
    if variant:
        gp_recipe, prune, tune, job_changes = variant_configs(variant, spc)
    else:
        gp_recipe = "paper" if method == "gradprune-paper" else "robust"
    path = row_path(results, dataset, attack, spc, seed, method)
    if path.is_file():
        return json.loads(path.read_text())
    recipe = t.recipes[dataset]
    zoo = backdoored(dataset, attack, recipe, data_root, cache, log)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run(JobConfig(model=str(zoo.folder), data=str(zoo.dataset_folder), output=f"{tmp}/out", spc=spc,
                            seed=seed,
                            trigger=trigger_spec("badnet" if attack == CLEAN else attack, cache / "triggers"),
                            # blind: the target is the scan's to find; the real one (attack's) measures
                            target="auto" if blind else str(recipe.target), blind=blind,
                            **({"scan": ScanConfig(**scan)} if scan else {}),
                            eval_limit=t.eval_limit, measure_floor=method in GRADPRUNE, recipe=gp_recipe, prune=prune,
                            tune=tune, method="gradprune" if method in GRADPRUNE else method,
                            baseline=baseline_config(t, dataset), **job_changes))
        wall = time.perf_counter() - t0
    r = res.report
    timing = r["timing_s"]
    if not res.written:  # blind: the scan called the model clean and the defence left it as it was
        row = {"tier": tier, "dataset": dataset, "attack": attack, "spc": spc, "seed": seed, "method": method,
               "blind": True, "written": False, "scan": _scan_row(r["scan"], recipe.target), "timing_s": timing,
               "wall_s": wall, "backdoored_model": {k: zoo.info[k] for k in ("acc", "asr", "ra", "weights_sha256")}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2))
        return row
    row = {"tier": tier, "dataset": dataset, "model": f"timm {recipe.arch} {recipe.model_args}", "attack": attack,
           "spc": spc, "seed": seed, "method": method, "recipe": gp_recipe if method in GRADPRUNE else None,
           "variant": variant or "default", "before": r["before"], "after": r["after"], "rounds": r["rounds"],
           "rounds_tried": len(r["prune"].get("rounds", [])), "stop_reason": r["prune"].get("stop_reason"),
           "finetune_epochs": r["finetune_epochs"], "pruned": r["pruned"], "timing_s": timing, "wall_s": wall,
           "per_round_over_floor": timing["per_round"] / timing["round_floor"] if "round_floor" in timing else None,
           "backdoored_model": {k: zoo.info[k] for k in ("acc", "asr", "ra", "train_s", "trigger_changed_pixel_share",
                                                          "weights_sha256")}}
    if blind:
        row.update(blind=True, written=True, scan=_scan_row(r["scan"], recipe.target))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row


def _scan_row(scan: dict, real_target: int) -> dict:
    return {"unlearning_rounds": len((scan.get("unlearning") or {}).get("rounds", [])) or None,
            "rounds": (scan.get("unlearning") or {}).get("rounds"),
            "pull_back": (scan.get("unlearning") or {}).get("pull_back"),
            "backdoored": scan["backdoored"], "target": scan["target"], "real_target": real_target,
            "target_found": scan["target"] == real_target, "anomaly_index": scan["anomaly_index"],
            "family": scan["family"], "scan_s": scan["timing_s"]["scan"],
            "per_class": scan["per_class"], "triggers": scan["triggers"]}


def blind_table(results: Path, baselines: Path | None = None) -> str:
    """The blind rows: detection, target found, ACC / ASR after (real trigger); clean models: the verdict. With
    `baselines` (the tier's non-blind folder), the trigger-free baselines beside it on the same cells and seeds."""
    rows = [json.loads(p.read_text()) for p in sorted((results / "rows").glob("*.json"))]
    lines = ["| dataset | attack | SPC | seed | verdict (anomaly) | target found | ACC before -> after | "
             "ASR before -> after (real trigger) | share of the change kept (pull-back) | scan s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sc = r["scan"]
        verdict = f"{'backdoored' if sc['backdoored'] else 'clean'} ({sc['anomaly_index']:.1f}, {sc['family']})"
        found = "-" if r["attack"] == CLEAN else ("yes" if sc["target_found"] else f"no ({sc['target']})")
        if r.get("written"):
            b, a = r["before"], r["after"]
            acc = f"{100 * b['acc']:.1f} -> {100 * a['acc']:.1f}"
            asr = f"{100 * b['asr']:.1f} -> {100 * a['asr']:.1f}"
        else:
            acc = asr = "untouched"
        pulled = sc.get("pull_back")
        # a defence that pruned units is never pulled back (rows from before the pull-back have no record of it)
        kept = "1 (units pruned)" if r.get("written") and r.get("pruned") else \
            "-" if not pulled else f"{pulled['share']:g}"
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['spc']} | {r['seed']} | {verdict} | {found} | {acc} | "
                     f"{asr} | {kept} | {sc['scan_s']:.0f} | {r['wall_s']:.0f} |")
    text = "\n".join(lines) + "\n\n" + blind_means(rows)
    if baselines and (baselines / "rows").is_dir():
        base = [json.loads(p.read_text()) for p in sorted((baselines / "rows").glob("*.json"))]
        text += "\n\n" + blind_vs_baselines(rows, [r for r in base if r["method"] not in GRADPRUNE])
    (results / "summary.md").write_text(text + "\n")
    return text


def _blind_after(r: dict) -> tuple[float, float, float]:
    """(ACC drop in points, ASR after %, ACC after %) of a backdoored model's blind row; a model the scan called clean
    was left as it was, so its backdoor counts in full (drop 0, ASR as before), not as a missing row."""
    before = r["before"] if r.get("written") else r["backdoored_model"]
    after = r["after"] if r.get("written") else r["backdoored_model"]
    return 100 * (before["acc"] - after["acc"]), 100 * after["asr"], 100 * after["acc"]


def blind_vs_baselines(rows: list[dict], base: list[dict]) -> str:
    """Blind Grad-Prune beside the defences that need no trigger either, per (dataset, SPC, attack), means over the
    seeds that every method has: ACC after / ASR after (%), the fair comparison for `--trigger unknown`."""
    methods = [m for m in METHODS if m not in GRADPRUNE and any(r["method"] == m for r in base)]
    lines = ["| dataset | SPC | attack | seeds | ACC / ASR before | blind Grad-Prune | "
             + " | ".join(m.upper() for m in methods) + " |", "|---" * (6 + len(methods)) + "|"]
    cells = sorted({(r["dataset"], r["spc"], r["attack"]) for r in rows if r["attack"] != CLEAN})
    for d, spc, a in cells:
        blind = {r["seed"]: r for r in rows if (r["dataset"], r["spc"], r["attack"]) == (d, spc, a)}
        by = {m: {r["seed"]: r for r in base if (r["dataset"], r["spc"], r["attack"], r["method"]) == (d, spc, a, m)}
              for m in methods}
        seeds = sorted(set(blind).intersection(*by.values()))
        if not seeds or not methods:
            continue
        b = blind[seeds[0]]["backdoored_model"]
        gp = [_blind_after(blind[s]) for s in seeds]
        cols = [f"{np.mean([g[2] for g in gp]):.1f} / {np.mean([g[1] for g in gp]):.1f}"]
        cols += [f"{np.mean([100 * by[m][s]['after']['acc'] for s in seeds]):.1f} / "
                 f"{np.mean([100 * by[m][s]['after']['asr'] for s in seeds]):.1f}" for m in methods]
        lines.append(f"| {d} | {spc} | {a} | {','.join(map(str, seeds))} | "
                     f"{100 * b['acc']:.1f} / {100 * b['asr']:.1f} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def blind_means(rows: list[dict]) -> str:
    """Per dataset and SPC, against the issue's goals: mean ASR after (real trigger) <= 10 %, mean ACC drop <= 3
    points, target found in >= 90 % of backdoored runs, >= 90 % of clean-model scans clean."""
    lines = ["| dataset | SPC | attack | runs | target found | mean ACC drop (pts) | mean ASR after % | "
             "clean scans clean |", "|---|---|---|---|---|---|---|---|"]
    for d, spc in sorted({(r["dataset"], r["spc"]) for r in rows}):
        cell = [r for r in rows if (r["dataset"], r["spc"]) == (d, spc)]
        attacks = sorted({r["attack"] for r in cell if r["attack"] != CLEAN})
        for a in [*attacks, "all"]:
            rs = [r for r in cell if r["attack"] != CLEAN and a in (r["attack"], "all")]
            drop = [_blind_after(r)[0] for r in rs]
            asr = [_blind_after(r)[1] for r in rs]
            clean = [r for r in cell if r["attack"] == CLEAN] if a == "all" else []
            lines.append(f"| {d} | {spc} | {a} | {len(rs)} | "
                         f"{sum(r['scan']['target_found'] for r in rs)} / {len(rs)} | "
                         f"{np.mean(drop):.1f} | {np.mean(asr):.1f} | "
                         + (f"{sum(not r['scan']['backdoored'] for r in clean)} / {len(clean)} |" if clean else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tier", choices=sorted(TIERS))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding cifar10/ and gtsrb/")
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plots from existing rows")
    ap.add_argument("--compare", action="store_true", help="print the opt-in variants beside the default and exit")
    ap.add_argument("--only", nargs="*", default=[], help="restrict to these datasets and/or attacks")
    ap.add_argument("--spc", type=int, nargs="*", default=None, help="restrict to these SPCs")
    ap.add_argument("--method", nargs="*", choices=METHODS, default=None,
                    help="defences to run (default: the tier's, all seven where the tier lists them)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="restrict to these seeds")
    ap.add_argument("--results", type=Path, default=None,
                    help="result folder (default benchmarks/results/<tier>, a variant's under experiments/)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="trained models, triggers and built-in datasets")
    ap.add_argument("--tag", help="results in <tier>-<tag>[-<variant>]/: rows of models trained on another machine "
                                  "(the same recipe gives other weights on another CPU) are kept apart")
    ap.add_argument("--variant", choices=sorted(VARIANTS),
                    help="a Grad-Prune variant (benchmarks/variants.py) in place of the recipes; "
                         "rows go to <tier>-<variant>/")
    ap.add_argument("--epochs", type=int, help="override the tier's training epochs (a dry run of a GPU tier on CPU)")
    ap.add_argument("--train-limit", type=int, help="train the backdoored models on this many images only (dry run)")
    ap.add_argument("--synth-rounds", type=int, default=None,
                    help="--blind: synthesise -> unlearn rounds (default: the tool's); rows go to <...>-blind-r<N>/")
    ap.add_argument("--synth-from", choices=("original", "defended"), default=None,
                    help="--blind: what later rounds defend (default: the tool's); rows go to <...>-blind[-rN]-<FROM>/")
    ap.add_argument("--blind", action="store_true",
                    help="Grad-Prune with the trigger unknown to it (scan + synthesis); the real trigger only "
                         "measures. Clean models (same recipe, no poison) are scanned too; rows go to "
                         "<tier>-<tag>-blind/")
    args = ap.parse_args(argv)
    t = TIERS[args.tier]
    if args.epochs or args.train_limit:
        t = replace(t, recipes={d: replace(r, epochs=args.epochs or r.epochs,
                                           train_limit=args.train_limit or r.train_limit)
                                for d, r in t.recipes.items()})
    variant = args.variant
    tier = args.tier + (f"-{args.tag}" if args.tag else "")  # this machine's rows of the tier (the baselines' folder)
    name = tier + (f"-{variant}" if variant else "") + \
        ("-dryrun" if args.epochs or args.train_limit else "") + ("-blind" if args.blind else "") + \
        (f"-r{args.synth_rounds}" if args.synth_rounds else "") + (f"-{args.synth_from}" if args.synth_from else "")
    # a variant's or a setting's search goes under experiments/, apart from the published tiers' rows
    searched = variant or args.synth_rounds or args.synth_from
    results = args.results or (RESULTS / "experiments" if searched else RESULTS) / name
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.compare:
        from report import compare_variants
        text = compare_variants(RESULTS, tier)
        (RESULTS / "experiments" / f"{tier}-variants.md").write_text(text + "\n")
        print(text)
        return 0
    if not args.report:
        datasets = [d for d in t.datasets if d in args.only] or t.datasets
        attacks = [a for a in (*t.attacks, *([CLEAN] if args.blind else ())) if a in args.only] or \
            [*t.attacks, *([CLEAN] if args.blind else ())]
        spcs = args.spc or t.spcs
        # per dataset, the cheap SPCs of every attack first, the largest (slowest) SPC last
        methods = args.method or (t.methods if not variant and not args.blind else ("gradprune",))
        cells = [(d, a, s, seed, m) for d in datasets for big in (False, True) for s in spcs
                 for seed in args.seeds or t.seeds for m in methods for a in attacks
                 if (s == max(spcs)) == big and (m in GRADPRUNE or (a in t.baseline_attacks and (
                     args.seeds or seed in t.baseline_seeds.get(s, t.seeds))))]
        for i, (d, a, s, seed, m) in enumerate(cells, 1):
            t0 = time.perf_counter()
            scan = {k: v for k, v in (("rounds", args.synth_rounds), ("rounds_from", args.synth_from)) if v}
            row = run_row(args.tier, t, d, a, s, seed, args.data, results, args.cache, log, m, variant, args.blind,
                          scan)
            if args.blind:
                log(f"[{i}/{len(cells)}] {d} {a} SPC {s} seed {seed} blind: scan "
                    f"{'backdoored' if row['scan']['backdoored'] else 'clean'} -> {row['scan']['target']}"
                    + (f", ASR {100 * row['before']['asr']:.1f} -> {100 * row['after']['asr']:.1f} %, ACC "
                       f"{100 * row['before']['acc']:.1f} -> {100 * row['after']['acc']:.1f} %"
                       if row["written"] else "")
                    + f" ({time.perf_counter() - t0:.0f} s)")
                continue
            log(f"[{i}/{len(cells)}] {d} {a} SPC {s} seed {seed} {m}: ASR {100 * row['before']['asr']:.1f} -> "
                f"{100 * row['after']['asr']:.1f} %, ACC {100 * row['before']['acc']:.1f} -> "
                f"{100 * row['after']['acc']:.1f} % ({time.perf_counter() - t0:.0f} s)")
    if args.blind:
        print(blind_table(results, RESULTS / tier))
        return 0
    from report import write_report
    table = write_report(args.tier, results)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
