"""Where the scan's screen ranks the real target, per screen setting, on the detection benchmark's models with more
classes than the scan takes in full (GTSRB): the screen only (no full scan), through `pipeline.run_scan` with a
progress callback that collects each class's promise and stops the scan when the screen is done.

    python benchmarks/screen_ranks.py --data ../shared/data --settings 15x64 15x16 8x32 5x64 [--split dev]

A setting is STEPSxBATCH (`ScanConfig.screen_steps` x `screen_batch`). The candidates are the screen's
`candidates` (3) most promising classes, so a setting holds on a model when the target ranks in the top 3;
`margin` is the 4th class's promise over the target's (above 1: the target is in the top 3 with room).
Rows: `benchmarks/results/detection/screen-ranks/<setting>/<model>.json` (resumable); prints a table per setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from hf_gradprune.pipeline import run_scan  # noqa: E402
from hf_gradprune.progress import ProgressEvent  # noqa: E402
from hf_gradprune.synth import ScanConfig  # noqa: E402

RESULTS = detection.RESULTS / "screen-ranks"


class _Screened(Exception):
    """Raised from the progress callback once every class is screened: the full scan is not needed here."""


def screen_promise(spec: detection.Spec, steps: int, batch: int, data_root: Path) -> tuple[dict[int, float], float]:
    """Each class's promise after the screen (lower: more promising) and the screen's seconds."""
    promise: dict[int, float] = {}
    num_classes = detection.DATASETS[spec.dataset][1]
    t0 = time.perf_counter()

    def collect(event: ProgressEvent) -> None:
        if "screened" in event.values:
            promise[event.values["screened"]] = event.values["promise"]
            if len(promise) == num_classes:
                raise _Screened

    with tempfile.TemporaryDirectory() as tmp:
        cfg = detection.scan_job(spec, data_root, Path(tmp), replace(ScanConfig(), screen_steps=steps,
                                                                     screen_batch=batch))
        try:
            run_scan(cfg, collect)
        except _Screened:
            pass
    if len(promise) != num_classes:
        raise RuntimeError(f"{spec.name}: the scan did not screen (it scans all {num_classes} classes)")
    return promise, time.perf_counter() - t0


def row(spec: detection.Spec, setting: str, data_root: Path) -> dict:
    path = RESULTS / setting / f"{spec.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    steps, batch = (int(v) for v in setting.split("x"))
    promise, seconds = screen_promise(spec, steps, batch, data_root)
    ranked = sorted(promise, key=lambda c: (promise[c], c))
    t = spec.target
    out = {"model": spec.name, "key": spec.key(), "split": spec.split, "family": spec.family, "setting": setting,
           "screen_steps": steps, "screen_batch": batch, "target": t,
           "rank": ranked.index(t) + 1 if t is not None else None,
           "margin": promise[ranked[3]] / promise[t] if t is not None else None,
           "top3": ranked[:3], "promise": promise, "screen_s": seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=detection.ROOT.parent.parent / "shared" / "data")
    p.add_argument("--settings", nargs="+", default=["15x64", "15x16"], help="STEPSxBATCH screen settings")
    p.add_argument("--split", choices=["dev", "test"], default="dev")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    specs = [s for s in detection.ordered(detection.population(), args.split)
             if s.backdoored and detection.DATASETS[s.dataset][1] > ScanConfig.max_classes
             and (detection.model_dir(s) / "info.json").is_file()
             and json.loads((detection.model_dir(s) / "info.json").read_text())["planted"]]
    print("| setting | models | target rank 1 | target in top 3 | smallest margin | median screen s |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        rows = [row(s, setting, args.data) for s in specs]
        print(f"| {setting} | {len(rows)} | {sum(r['rank'] == 1 for r in rows)} | {sum(r['rank'] <= 3 for r in rows)} "
              f"| {min(r['margin'] for r in rows):.2f} | {statistics.median(r['screen_s'] for r in rows):.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
