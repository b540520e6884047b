"""The first GPU run, in one short script: each figure beside the CPU figure committed for it.

    bash benchmarks/gpu_check.sh [DATA]                      # on the GPU machine (at most 8 minutes on one H100)

Four checks, each in its own process with its own time limit, each written as one JSON under
benchmarks/results/gpu-check/<device>/ (a check that fails or runs out of time says so in its row; the others run):
- `paper-cell`: one paper-tier cell end to end (`tiers.py paper-cpu`, CIFAR-10 BadNets, SPC 10, seed 0, the default
  recipe): the model trained on the GPU, then defended; beside the CPU row in benchmarks/results/paper-cpu/.
- `accelerate`: the job on 1 process, in bf16, and in an NCCL process group (`multiproc.py`'s `1n`, torchrun with
  one process where one GPU is, since `accelerate launch --multi_gpu` refuses fewer than 2; `accelerate launch` with N
  processes where N GPUs are), the same job as the committed CPU figures; pruning and metrics compared with the plain
  single process.
- `vit-scan`: `hf-gradprune scan` of a ViT-B/16 at 224 px (random weights, 10 classes, SPC 10) at `--scan-steps` 10
  and 30: the difference gives one step's cost, and the default 150 steps are the longer run plus the steps it left
  out. On 2 CPU cores that scan would take more than a day, so its CPU figure is an estimate: the scale benchmark's
  forward + backward seconds per image times the scan's image passes (20 optimisations x 150 steps x 64 images).
- `vit-round`: one Grad-Prune round on the same model (`scale.py`'s cell: seconds per round and the floor), beside
  the committed CPU row (benchmarks/results/scale-avx512/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT = RESULTS / "gpu-check"
VIT = "vit_base_patch16_224"
MULTIPROC_CPU = RESULTS / "multiproc" / "cpu-2cores.json"
# the ViT's CPU figures: the committed scale benchmark's row (Intel Xeon, 2 cores)
SCALE_CPU = RESULTS / "scale-avx512" / "rows" / f"cell-{VIT}-10-spc10-bauto.json"
FULL_STEPS = 150  # ScanConfig.steps, the default a user's scan runs
CHECKS = ("paper-cell", "accelerate", "vit-scan", "vit-round")
CELL = ("cifar10", "badnet", 10, 0)  # the paper-cell check's (dataset, attack, SPC, seed)
GPU_SCAN_STEPS = (10, 30)
SCAN_IMAGE_PASSES = 20 * FULL_STEPS * 64  # 10 classes x 2 trigger families, 150 steps, 64 images a step
LIMITS_S = {"paper-cell": 210, "accelerate": 150, "vit-scan": 80, "vit-round": 40}  # the 8 minutes, 480 s


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else \
        f"cpu-{os.cpu_count()}cores"


def run(cmd: list[str], limit_s: float) -> tuple[int, float, str]:
    """(exit code, seconds, the output's tail); 124 when it ran past its limit."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=ROOT.parent)
        return proc.returncode, time.perf_counter() - t0, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        text = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr)]
        return 124, time.perf_counter() - t0, ("".join(text) or str(e))[-2000:]


def paper_cell(data: Path, cache: Path) -> dict:
    dataset, attack, spc, seed = CELL
    cmd = [sys.executable, "benchmarks/tiers.py", "paper-cpu", "--data", str(data), "--only", dataset, attack,
           "--spc", str(spc), "--seeds", str(seed), "--method", "gradprune", "--tag", "gpu", "--cache", str(cache)]
    code, wall, tail = run(cmd, LIMITS_S["paper-cell"])
    from tiers import row_path
    row_file = row_path(RESULTS / "paper-cpu-gpu", *CELL)
    row = json.loads(row_file.read_text()) if code == 0 and row_file.is_file() else None
    return {"check": "paper-cell", "exit": code, "wall_s": wall, "tail": None if row else tail,
            "figures": _cell_figures(row) if row else None}


def _cell_figures(row: dict) -> dict:
    return {"train_s": row["backdoored_model"]["train_s"], "defence_s": row["wall_s"],
            "acc_before": row["before"]["acc"], "asr_before": row["before"]["asr"],
            "acc_after": row["after"]["acc"], "asr_after": row["after"]["asr"]}


def accelerate_check(data: Path, cache: Path) -> dict:
    import torch
    gpus = torch.cuda.device_count()
    configs = ["1", "1-bf16", str(gpus) if gpus > 1 else "1n"] if gpus else ["1", "1n"]
    # the same job as the committed CPU figures (SPC, rounds, epochs, test images), once
    ref = json.loads(MULTIPROC_CPU.read_text())["args"] if MULTIPROC_CPU.is_file() else {}
    work = [f"--{k.replace('_', '-')}={ref.get(k, v)}" for k, v in
            (("spc", 100), ("rounds", 6), ("epochs", 3), ("eval_limit", 2000))]
    cmd = [sys.executable, "benchmarks/multiproc.py", "--data", str(data), "--cache", str(cache), *work,
           "--repeats", "1", "--configs", *configs]
    code, wall, tail = run(cmd, LIMITS_S["accelerate"])
    table = RESULTS / "multiproc" / f"{device_name()}.json"
    rows = json.loads(table.read_text())["rows"] if code == 0 and table.is_file() else None
    return {"check": "accelerate", "exit": code, "wall_s": wall, "tail": None if rows else tail,
            "figures": {r["config"]: {"wall_s": r["wall_s"], "processes": r["processes"]["count"],
                                      "same_pruning": r["same_pruning"], "same_after": r["same_after"]}
                        for r in rows} if rows else None}


def vit_scan(steps: tuple[int, int], limit_s: float) -> dict:
    """The scan at two step counts: the difference is what one more Adam step of every optimisation costs, the rest
    (loading, the evidence passes) is fixed; the full scan is the longer run plus the steps it left out."""
    from scale import build
    model_dir, data_dir = build(VIT, 10, 10)
    runs = {}
    for n in steps:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "hf_gradprune", "scan", str(model_dir), "--data", str(data_dir), "--spc",
                   "10", "--output", f"{tmp}/scan", "--quiet", "--scan-steps", str(n)]
            code, wall, tail = run(cmd, limit_s * (n + 5) / (sum(steps) + 10))  # the time split as the steps are
            report = Path(tmp) / "scan" / "scan_report.json"
            if code != 0 or not report.is_file():
                return {"check": "vit-scan", "exit": code, "wall_s": wall, "tail": tail, "figures": None}
            runs[n] = json.loads(report.read_text())["timing_s"]["scan"]
    a, b = steps
    per_step = (runs[b] - runs[a]) / (b - a)
    return {"check": "vit-scan", "exit": 0, "wall_s": None, "tail": None,
            "figures": {"steps": f"{a}, {b}", "scan_s": runs[b], "s_per_step": per_step,
                        "full_scan_s": runs[b] + (FULL_STEPS - b) * per_step}}


def vit_round(tag: str) -> dict:
    """`tag`: the results folder scale-<tag> (gpu, or cpu-check for a dry run on a CPU)."""
    results = RESULTS / f"scale-{tag}"
    cmd = [sys.executable, "benchmarks/scale.py", "--models", VIT, "--classes", "10", "--rounds", "2",
           "--floor-repeats", "1", "--results", str(results)]
    code, wall, tail = run(cmd, LIMITS_S["vit-round"])
    figures = _scale_row(results / "rows" / f"cell-{VIT}-10-spc10-bauto.json") if code == 0 else None
    return {"check": "vit-round", "exit": code, "wall_s": wall, "tail": None if figures else tail,
            "figures": figures}


def cpu_figures() -> dict:
    """The committed CPU figures each check is compared with (None where none is committed)."""
    from tiers import row_path
    cell = row_path(RESULTS / "paper-cpu", *CELL)
    return {"paper-cell": _cell_figures(json.loads(cell.read_text())) if cell.is_file() else None,
            "accelerate": {r["config"]: {"wall_s": r["wall_s"], "processes": r["processes"]["count"]}
                           for r in json.loads(MULTIPROC_CPU.read_text())["rows"]} if MULTIPROC_CPU.is_file() else None,
            "vit-scan": _scan_estimate(SCALE_CPU), "vit-round": _scale_row(SCALE_CPU)}


def _scan_estimate(path: Path) -> dict | None:
    """A full scan's seconds from a round's floor (one forward + backward over the training images, one forward over
    the validation images, counted here as training images: an upper estimate)."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    per_image = row["floor_s"] / row["n_train"]
    return {"steps": "estimated", "s_per_step": per_image * 64 * 20, "full_scan_s": per_image * SCAN_IMAGE_PASSES}


def _scale_row(path: Path) -> dict | None:
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return {"round_s": row["median_round_s"], "floor_s": row["floor_s"], "batch": row["batch"]["batch_size"]}


def table(rows: dict, cpu: dict, device: str) -> str:
    def fmt(fig: dict | None, keys: list[str]) -> str:
        if not fig:
            return "-"
        return ", ".join(f"{k} {fig[k]:.3g}" if isinstance(fig[k], float) else f"{k} {fig[k]}" for k in keys
                         if k in fig)
    keys = {"paper-cell": ["train_s", "defence_s", "acc_before", "acc_after", "asr_before", "asr_after"],
            "vit-scan": ["steps", "s_per_step", "full_scan_s"], "vit-round": ["round_s", "floor_s", "batch"]}
    lines = [f"| check | {device} | exit | committed CPU figure |", "|---|---|---|---|"]
    for name in CHECKS:
        r = rows.get(name) or {}
        if name == "accelerate":
            gpu = "; ".join(f"{c}: {f['wall_s']:.1f} s, same pruning {f['same_pruning']}"
                            for c, f in (r.get("figures") or {}).items()) or "-"
            ref = "; ".join(f"{c}: {f['wall_s']:.1f} s" for c, f in (cpu.get(name) or {}).items()) or "-"
        else:
            gpu, ref = fmt(r.get("figures"), keys[name]), fmt(cpu.get(name), keys[name])
        lines.append(f"| {name} | {gpu} | {r.get('exit', '-')} | {ref} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding cifar10/")
    ap.add_argument("--checks", nargs="*", choices=CHECKS, default=list(CHECKS))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    device = device_name()
    out = OUT / device
    out.mkdir(parents=True, exist_ok=True)
    have_data = (args.data / "cifar10").is_dir()
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in args.checks:
            if name in ("paper-cell", "accelerate") and not have_data:
                rows[name] = {"check": name, "exit": "skipped", "tail": f"no {args.data}/cifar10 on this machine"}
            else:
                rows[name] = {"paper-cell": lambda: paper_cell(args.data, Path(cache)),
                              "accelerate": lambda: accelerate_check(args.data, Path(cache)),
                              "vit-scan": lambda: vit_scan(GPU_SCAN_STEPS, LIMITS_S["vit-scan"]),
                              "vit-round": lambda: vit_round(tag="gpu" if "cpu" not in device else "cpu-check")}[name]()
            (out / f"{name}.json").write_text(json.dumps(rows[name], indent=2))
            print(f"{name}: exit {rows[name]['exit']}", flush=True)
    text = table(rows, cpu_figures(), device)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    for r in rows.values():
        if r.get("tail"):
            print(f"\n--- {r['check']} (exit {r['exit']}):\n{r['tail']}")
    return 0 if all(r["exit"] in (0, "skipped") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
