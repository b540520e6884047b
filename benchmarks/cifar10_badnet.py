"""CIFAR-10 check of the main job: plant a BadNets backdoor in a timm ResNet-18 ourselves, then run
hf-gradprune on it at several SPC, through the same pipeline the CLI uses.

    python benchmarks/cifar10_badnet.py [--data ../shared/data] [--epochs 15] [--spc 10 100] [--seeds 0]

Prints a table and writes benchmarks/results/cifar10_badnet.json. The trained model is cached under
benchmarks/cache/ keyed by its configuration, so a rerun skips training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_gradprune.demo import poison, save_timm, timm_resnet18, train_classifier
from hf_gradprune.metrics import attack_metrics
from hf_gradprune.pipeline import JobConfig, run
from hf_gradprune.triggers import TriggerSpec, make_trigger

ROOT = Path(__file__).resolve().parent
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_numpy(folder: Path):
    from datasets import load_dataset
    ds = load_dataset(str(folder))
    out = {}
    for split in ("train", "test"):
        d = ds[split].with_format("numpy")
        out[split] = (np.asarray(d["img"], dtype=np.uint8), np.asarray(d["label"], dtype=np.int64))
    return out, ds["train"].features["label"].names


def backdoored_model(data_root: Path, epochs: int, channels, seed: int, log) -> tuple[Path, dict]:
    cfg = {"dataset": "cifar10", "attack": "badnet", "rate": 0.1, "target": 0, "epochs": epochs,
           "channels": list(channels), "seed": seed, "arch": "timm resnet18", "lr": 0.05, "batch": 128, "augment": True}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    folder = ROOT / "cache" / f"cifar10-badnet-{key}"
    if (folder / "model.safetensors").is_file():
        return folder, json.loads((folder / "train_info.json").read_text())
    splits, names = load_numpy(data_root / "cifar10")
    stamp = make_trigger(TriggerSpec("badnet"), (32, 32))
    x, y = poison(*splits["train"], rate=0.1, target=0, stamp=stamp, seed=seed)
    model = timm_resnet18(channels, names, mean=CIFAR_MEAN, std=CIFAR_STD, seed=seed)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs, lr=0.05, batch_size=128, seed=seed, augment=True,
                     on_epoch=lambda e: log(f"  epoch {e}/{epochs}  {time.perf_counter() - t0:.0f} s"))
    tx, ty = splits["test"]
    clean = torch.from_numpy(tx).permute(0, 3, 1, 2).contiguous()
    m = attack_metrics(model, clean, stamp(clean), torch.from_numpy(ty), target=0)
    info = {"config": cfg, "train_s": time.perf_counter() - t0, "acc": m.acc, "asr": m.asr, "ra": m.ra}
    save_timm(model, folder, channels, names)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2))
    return folder, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 256])
    ap.add_argument("--spc", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cifar10_badnet.json")
    args = ap.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    log("training (or loading) the backdoored model")
    model_dir, info = backdoored_model(args.data, args.epochs, tuple(args.channels), 0, log)
    log(f"backdoored model: ACC {info['acc']:.4f} ASR {info['asr']:.4f} ({info['train_s']:.0f} s to train)")
    rows = []
    for spc in args.spc:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = run(JobConfig(model=str(model_dir), data=str(args.data / "cifar10"), output=f"{tmp}/out",
                                    spc=spc, seed=seed, eval_limit=args.eval_limit))
                wall = time.perf_counter() - t0
            r = res.report
            rows.append({"dataset": "cifar10", "model": "timm resnet18 " + "-".join(map(str, args.channels)),
                         "attack": "badnet", "spc": spc, "seed": seed, "before": r["before"], "after": r["after"],
                         "rounds": r["rounds"], "rounds_tried": len(r["prune"]["rounds"]),
                         "stop_reason": r["prune"]["stop_reason"], "finetune_epochs": r["finetune_epochs"],
                         "timing_s": r["timing_s"], "wall_s": wall, "target": r["target"]})
            log(f"SPC {spc} seed {seed}: done in {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backdoored_model": info, "rows": rows}, indent=2))
    print("| SPC | seed | ACC before | ACC after | ASR before | ASR after | RA before | RA after | rounds kept/tried | FT epochs | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        b, a = row["before"], row["after"]
        print(f"| {row['spc']} | {row['seed']} | {100*b['acc']:.2f} | {100*a['acc']:.2f} | {100*b['asr']:.2f} | "
              f"{100*a['asr']:.2f} | {100*b['ra']:.2f} | {100*a['ra']:.2f} | {row['rounds']}/{row['rounds_tried']} | "
              f"{row['finetune_epochs']} | {row['wall_s']:.0f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
