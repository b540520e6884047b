"""1 process against N: the same user command, timed and its results compared.

    python benchmarks/multiproc.py [--data ../shared/data] [--spc 100] [--rounds 6] [--epochs 3] [--repeats 3]

Runs the CLI on the cpu tier's CIFAR-10 BadNets model (cached by `tiers.py cpu`, or trained here) with a fixed
amount of work (alpha 0.99 and a patience above --rounds: exactly --rounds pruning rounds; exactly --epochs epochs of
fine-tuning), in these configurations (--configs):
- `1`: one process, torch's default threads (all cores);
- `1t`: one process, OMP_NUM_THREADS=1, which is what each process of a 2-process CPU job gets;
- `2`: `accelerate launch --multi_gpu --num_processes 2` (a gloo group on CPU: ACCELERATE_USE_CPU=true);
- `1n`: one process in a process group (`torchrun --nproc_per_node 1`; an NCCL group on a GPU), the distributed path
  where only one device is (`accelerate launch --multi_gpu` refuses fewer than 2 processes);
- `1-bf16`, `1-fp16`: one process with `--mixed-precision` (GPU machines).
Per configuration: the median wall time of the whole command (launcher included) and of each stage from the report,
and, against the first configuration, whether the pruned filters and the before / after metrics are the same and the
largest weight difference. Writes benchmarks/results/multiproc/<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiers import TIERS  # noqa: E402
from zoo import CACHE, backdoored  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "multiproc"
STAGES = ("load", "evaluate_before", "prune", "finetune", "evaluate_after")


def command(config: str, args: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ}
    bindir = Path(sys.executable).parent
    if config == "1n":
        # one process in a process group (NCCL on a GPU, gloo on CPU): the distributed path where one device is.
        # `accelerate launch --multi_gpu` refuses fewer than 2 processes; torchrun sets the same LOCAL_RANK / WORLD_SIZE
        # that accelerate's state reads to start the group
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        return [str(bindir / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "hf_gradprune", *args], env
    if config.startswith("1"):
        cmd = [sys.executable, "-m", "hf_gradprune", *args]
        if config == "1t":
            env["OMP_NUM_THREADS"] = "1"
        if "-" in config:
            cmd += ["--mixed-precision", config.split("-", 1)[1]]
        return cmd, env
    n = int(config)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "hf_gradprune", *args], env


def run_once(config: str, job_args: list[str], out: Path, home: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = command(config, [*job_args, "--output", str(out)])
    env["HF_HOME"] = str(home)  # no user accelerate config is read
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{config}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "gradprune_report.json").read_text())
    return {"wall_s": wall, "report": report}


def compare(ref: dict, other: dict, ref_dir: Path, other_dir: Path) -> dict:
    from safetensors.torch import load_file
    a, b = load_file(ref_dir / "model.safetensors"), load_file(other_dir / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    pick = lambda r: [(p["layer"], p["index"]) for p in r["prune"]["rounds"]]  # noqa: E731
    return {"same_pruning": pick(ref) == pick(other), "same_before": ref["before"] == other["before"],
            "same_after": ref["after"] == other["after"], "after_acc": other["after"]["acc"],
            "after_asr": other["after"]["asr"], "max_weight_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding cifar10/")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--spc", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="*", default=None, help="default: 1 1t 2 on CPU, 1 1-bf16 1n on one GPU")
    args = ap.parse_args(argv)
    gpus = torch.cuda.device_count()
    configs = args.configs or (["1", "1t", "2"] if not gpus else ["1", "1-bf16", str(gpus) if gpus > 1 else "1n"])
    zoo = backdoored("cifar10", "badnet", TIERS["cpu"].recipes["cifar10"], args.data, args.cache)
    job_args = [str(zoo.folder), "--data", str(zoo.dataset_folder), "--spc", str(args.spc), "--target", "0",
                "--alpha", "0.99", "--prune-patience", str(args.rounds + 1), "--max-rounds", str(args.rounds),
                "--max-epochs", str(args.epochs), "--tune-patience", str(args.epochs + 1),
                "--eval-limit", str(args.eval_limit), "--quiet"]
    device = torch.cuda.get_device_name(0) if gpus else f"cpu-{os.cpu_count()}cores"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rep in range(args.repeats):  # interleaved, so a slow spell of the machine hits every configuration
            for config in configs:
                r = run_once(config, job_args, tmp / f"out-{config}", tmp / "home")
                results.setdefault(config, []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {config}: {r['wall_s']:.1f} s", flush=True)
        ref = configs[0]
        rows = []
        for config in configs:
            runs = results[config]
            row = {"config": config, "processes": runs[0]["report"]["processes"],
                   "wall_s": statistics.median(r["wall_s"] for r in runs),
                   "stages_s": {s: statistics.median(r["report"]["timing_s"].get(s, 0.0) for r in runs)
                                for s in STAGES},
                   **compare(results[ref][-1]["report"], runs[-1]["report"], tmp / f"out-{ref}",
                             tmp / f"out-{config}")}
            rows.append(row)
    base = rows[0]["wall_s"]
    lines = [f"# 1 vs N processes: {device}", "",
             f"CIFAR-10 BadNets (cpu tier model), SPC {args.spc}, {args.rounds} pruning rounds, {args.epochs} "
             f"fine-tuning epochs, {args.eval_limit} test images; median of {args.repeats} runs; "
             f"`python benchmarks/multiproc.py --spc {args.spc} --rounds {args.rounds} --epochs {args.epochs} "
             f"--repeats {args.repeats}`", "",
             f"| config | wall s | speed-up vs {configs[0]} | prune s | fine-tune s | evaluate s | same pruning | "
             "same metrics before / after | after ACC / ASR % | max weight diff |", "|" + "---|" * 10]
    for r in rows:
        st = r["stages_s"]
        lines.append(f"| {r['config']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | {st['prune']:.1f} | "
                     f"{st['finetune']:.1f} | {st['evaluate_before'] + st['evaluate_after']:.1f} | "
                     f"{r['same_pruning']} | {r['same_before']} / {r['same_after']} | "
                     f"{100 * r['after_acc']:.2f} / {100 * r['after_asr']:.2f} | "
                     f"{r['max_weight_diff']:.2e} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    name = device.replace(" ", "-")
    (OUT / f"{name}.md").write_text(table + "\n")
    (OUT / f"{name}.json").write_text(json.dumps({"device": device, "args": vars(args) | {"data": str(args.data),
                                                                                           "cache": str(args.cache)},
                                                  "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
