"""What a paper-quality model costs to train on this machine: minutes per CIFAR-10 epoch for the timm
architectures that load in one line from their Hub layout and were candidates for the paper-cpu tier.

    python benchmarks/train_speed.py [--threads 2] [--batch 128] [--results benchmarks/results/train-speed]

One SGD step (forward, backward, update) on a random batch at the model's input size, median of 3 after a warm-up,
scaled to 50,000 images; per candidate the memory layout (channels-last or not) and bf16 autocast where asked.
MACs are one forward pass of one image (torch's flop counter). Writes `train_speed.json` and `train_speed.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

NARROW = {"channels": [32, 64, 128, 256], "stem_width": 32}  # the cpu tier's ResNet-18 at half width
# (name, timm architecture, model args, input px, channels-last, bf16 autocast)
CANDIDATES = [
    ("resnet18 half width (cpu tier)", "resnet18", NARROW, 32, False, False),
    ("resnet18 half width (cpu tier)", "resnet18", NARROW, 32, True, False),
    ("resnet18 half width, 64 px (paper-cpu)", "resnet18", NARROW, 64, False, False),
    ("resnet18 half width, 64 px (paper-cpu)", "resnet18", NARROW, 64, True, False),
    ("resnet18 half width, 64 px (paper-cpu)", "resnet18", NARROW, 64, False, True),
    ("resnet18 full width, 64 px", "resnet18", {}, 64, True, False),
    ("resnet18 half width, 96 px", "resnet18", NARROW, 96, True, False),
    ("dla46_c (stride-1 stem)", "dla46_c", {}, 32, True, False),
    ("dla34 (stride-1 stem)", "dla34", {}, 32, True, False),
    ("vgg11_bn (stride-1 stem), head 1/8", "vgg11_bn", {"mlp_ratio": 0.125}, 32, True, False),
    ("convnext_atto, patch 2", "convnext_atto", {"patch_size": 2}, 32, True, False),
]


def measure(arch: str, args: dict, size: int, channels_last: bool, bf16: bool, batch: int) -> dict:
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **args)
    with FlopCounterMode(display=False) as flops:
        model.eval()(torch.randn(1, 3, size, size))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:])
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "mmacs": flops.get_total_flops() / 2e6,
            "step_s": step, "min_per_epoch": 50_000 / batch * step / 60}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "train-speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, arch, model_args, size, cl, bf16 in CANDIDATES:
        row = {"name": name, "arch": arch, "model_args": model_args, "input_px": size, "channels_last": cl,
               "bf16": bf16, **measure(arch, model_args, size, cl, bf16, args.batch)}
        rows.append(row)
        print(f"{name}, {size} px, channels-last {cl}, bf16 {bf16}: {row['min_per_epoch']:.1f} min / epoch",
              file=sys.stderr, flush=True)
    lines = [f"Threads {args.threads}, batch {args.batch}, {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}: `python benchmarks/train_speed.py --threads {args.threads}`", "",
             "| model | input px | channels-last | bf16 | params M | MMACs / image | s / step | min / CIFAR-10 epoch |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['input_px']} | {'yes' if r['channels_last'] else 'no'} | "
              f"{'yes' if r['bf16'] else 'no'} | {r['params_m']:.2f} | {r['mmacs']:.1f} | {r['step_s']:.3f} | "
              f"{r['min_per_epoch']:.1f} |" for r in rows]
    text = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "train_speed.json").write_text(json.dumps({"threads": args.threads, "batch": args.batch,
                                                               "torch": torch.__version__, "rows": rows}, indent=2))
    (args.results / "train_speed.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
