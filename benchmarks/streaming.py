"""A test set held whole against one streamed from its dataset rows: peak memory, and whether decoding or the
model is the bottleneck of a measurement (ACC / ASR / RA over clean + triggered test images).

    python benchmarks/streaming.py [--model resnet50] [--images 1000] [--source-size 320] [--tag avx512]

Random weights at 224 px, a Hub-layout dataset of `--images` PNG test images at `--source-size` px (the model's own
preprocessing resizes them, as a user's photos are), BadNets trigger. Each mode runs in its own process so that its
peak resident memory (VmHWM) is its own: "held" decodes the whole set, then measures it (the two times apart:
which one is the bottleneck); "streamed" measures while decoding chunk by chunk in the measuring thread (what a job
on a CPU does, hf_gradprune.streaming); "streamed-bg" decodes the next chunk ahead in background threads (what a
job on a GPU does). Writes rows/<mode>.json (resumable), streaming.json and streaming.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "streaming"
RESULTS = ROOT / "results"


def build(arch: str, images: int, source_size: int) -> tuple[Path, Path]:
    from hf_gradprune.demo import save_timm, timm_classifier, write_hub_dataset
    names = [f"class{i}" for i in range(10)]
    model_dir, data_dir = CACHE / f"{arch}" / "model", CACHE / f"data-{images}-{source_size}"
    if not (model_dir / "model.safetensors").is_file():
        save_timm(timm_classifier(arch, names, size=224), model_dir, {}, names)
    if not (data_dir / "README.md").is_file():
        rng = np.random.default_rng(0)
        y = np.arange(images) % 10
        fields = rng.integers(0, 256, (images, source_size // 8, source_size // 8, 3), dtype=np.uint8)
        x = fields.repeat(8, 1).repeat(8, 2)  # smooth colour fields: PNGs of photo-like size, not of noise
        write_hub_dataset(data_dir, {"train": (x[:20], y[:20]), "test": (x, y)}, names)
    return model_dir, data_dir


def mode_row(mode: str, arch: str, images: int, source_size: int) -> dict:
    import torch

    from hf_gradprune.data import decode, load_splits
    from hf_gradprune.hub import load_model
    from hf_gradprune.memory import choose_batch_size
    from hf_gradprune.metrics import attack_metrics
    from hf_gradprune.streaming import stamp_images
    from hf_gradprune.triggers import TriggerSpec, make_trigger
    model_dir, data_dir = build(arch, images, source_size)
    loaded = load_model(str(model_dir))
    test = load_splits(str(data_dir))["test"]
    rows = list(range(len(test)))
    stamp = make_trigger(TriggerSpec("badnet"), loaded.input_size)
    example = torch.zeros(3, *loaded.input_size, dtype=torch.uint8)
    batch = choose_batch_size(loaded.model, example, torch.device("cpu"), None).batch_size
    base_rss = peak_rss_gib()
    t0 = time.perf_counter()
    data = decode(test, rows, "image", "label", loaded.to_pixels, streamed=mode != "held",
                  background=mode == "streamed-bg")
    twin = stamp_images(stamp, data.pixels)
    decode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = attack_metrics(loaded.model, data.pixels, twin, data.labels, 0, batch)
    measure_s = time.perf_counter() - t1
    return {"mode": mode, "model": arch, "images": images, "source_size": source_size, "batch": batch,
            "decode_s": decode_s, "measure_s": measure_s, "total_s": decode_s + measure_s,
            "forwards": metrics.n_clean + metrics.n_triggered, "metrics": metrics.to_dict(),
            "peak_rss_gib": peak_rss_gib(), "rss_before_gib": base_rss,
            "threads": torch.get_num_threads()}


def peak_rss_gib() -> float:
    """This process's own peak resident memory. Not ru_maxrss: Linux carries the parent's peak over into a child
    at exec (the parent here built a dataset of 2000 images and reached 2.2 GiB, which every mode then reported)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table(rows: list[dict]) -> str:
    lines = ["| mode | images | peak memory GiB | decode s (before measuring) | measure s | total s | "
             "ms per image decoded / per forward |", "|---|---|---|---|---|---|---|"]
    held = next((r for r in rows if r["mode"] == "held"), None)
    for r in rows:
        split = (f"{1000 * held['decode_s'] / held['images']:.1f} / {1000 * held['measure_s'] / held['forwards']:.1f}"
                 if r is held else "-")
        lines.append(f"| {r['mode']} | {r['images']} | {r['peak_rss_gib']:.2f} | {r['decode_s']:.1f} | "
                     f"{r['measure_s']:.1f} | {r['total_s']:.1f} | {split} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--source-size", type=int, default=320)
    ap.add_argument("--modes", nargs="*", default=["held", "streamed", "streamed-bg"])
    ap.add_argument("--tag", default=None, help="machine tag in the result folder name")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(mode_row(args.mode, args.model, args.images, args.source_size)))
        return 0
    results = RESULTS / ("streaming" + (f"-{args.tag}" if args.tag else ""))
    (results / "rows").mkdir(parents=True, exist_ok=True)
    build(args.model, args.images, args.source_size)  # once, outside the measured processes
    rows = []
    for mode in args.modes:
        path = results / "rows" / f"{mode}-{args.model}-{args.images}-{args.source_size}.json"
        if not path.is_file():
            print(f"{mode} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", args.model, "--images",
                                  str(args.images), "--source-size", str(args.source_size)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            path.write_text(json.dumps({**json.loads(out.stdout.strip().splitlines()[-1]),
                                        "command": " ".join(["python benchmarks/streaming.py"]
                                                            + (argv or sys.argv[1:]))},
                                       indent=1))
        rows.append(json.loads(path.read_text()))
    if len({json.dumps(r["metrics"], sort_keys=True) for r in rows}) != 1:
        print("the modes measured different numbers", file=sys.stderr)
        return 1
    text = table(rows)
    (results / "streaming.md").write_text(text + "\n")
    (results / "streaming.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    raise SystemExit(main())
