"""Speed of a pruning round against its floor, and what the engine's choices buy.

    python benchmarks/speed.py [--data ../shared/data] [--spc 10 100] [--rounds 8]

On the cpu tier's CIFAR-10 BadNets model (trained and cached by `tiers.py cpu`, or trained here), for each SPC it
times, in one process on the same model and few-shot draw:
- floor: one forward+backward over the training split (conv weight gradients) + one forward over the validation
  split, written plainly (hf_gradprune.prune.round_floor);
- engine: hf_gradprune's gradient_prune, per round (fp32);
- naive: the same rounds written the straightforward way the engine avoids: triggered tensors rebuilt from the
  uint8 images every round, gradients for every parameter, a host sync per batch, a deep copy of the model per
  round to keep the best, and a test-set evaluation per round;
- bf16: the engine under CPU bfloat16 autocast, and whether it picks the same filters as fp32.
The naive loop must pick the same filters as the engine (checked), so the comparison is like for like.
Writes benchmarks/results/speed/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import trigger_spec  # noqa: E402
from hf_gradprune.metrics import attack_metrics  # noqa: E402
from hf_gradprune.pipeline import JobConfig, prepare  # noqa: E402
from hf_gradprune.prune import FilterPruner, PruneConfig, gradient_prune, round_floor  # noqa: E402
from hf_gradprune.triggers import make_trigger  # noqa: E402
from tiers import TIERS  # noqa: E402
from zoo import CACHE, backdoored  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "speed"


def engine_rounds(job, pruner, rounds: int, batch_size: int, autocast: bool = False) -> tuple[list[float], list]:
    t = job.tensors
    stamps = [time.perf_counter()]
    cfg = PruneConfig(alpha=1.0, patience=rounds + 1, max_rounds=rounds)  # exactly `rounds` rounds, no early stop
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        res = gradient_prune(job.loaded.model, pruner, t.trig_train, t.train_y, t.val, t.trig_val,
                             t.val_y, cfg, job.target, batch_size, lambda r: stamps.append(time.perf_counter()))
    while pruner.pruned:
        pruner.undo_last()
    return [b - a for a, b in zip(stamps, stamps[1:])], [(r.layer, r.index) for r in res.rounds]


def naive_rounds(job, pruner, rounds: int, batch_size: int, stamp) -> tuple[list[float], list]:
    model, t = job.loaded.model, job.tensors
    times, picked = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        train_trig = stamp(job.data.train.pixels).to(t.train.device)  # rebuilt every round
        val_trig = stamp(job.data.val.pixels).to(t.val.device)
        best_state = copy.deepcopy(model.state_dict())  # keep-best by copying
        model.eval()
        model.zero_grad(set_to_none=True)
        for s in range(0, len(t.train_y), batch_size):  # all parameters get gradients, one sync per batch
            loss = F.cross_entropy(model(train_trig[s:s + batch_size]), t.train_y[s:s + batch_size], reduction="sum")
            loss.backward()
            loss.item()
        scores = torch.cat([c.weight.grad.abs().flatten(1).mean(1) for _, c in pruner.convs])
        scores = scores.masked_fill(pruner.pruned_mask(scores.device), float("-inf"))
        conv_idx, f = pruner.locate(int(scores.argmax()))
        pruner.prune(conv_idx, f)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for s in range(0, len(t.val_y), batch_size):  # one sync per batch
                y = t.val_y[s:s + batch_size]
                (model(t.val[s:s + batch_size]).argmax(1) == y).sum().item()
                F.cross_entropy(model(val_trig[s:s + batch_size]), y, reduction="sum").item()
        attack_metrics(model, t.test, t.trig_test, t.test_y, job.target, batch_size)  # test set every round
        del best_state
        picked.append((pruner.convs[conv_idx][0], f))
        times.append(time.perf_counter() - start)
    while pruner.pruned:
        pruner.undo_last()
    return times, picked


def measure(zoo, spc: int, rounds: int, seed: int, eval_limit: int, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = JobConfig(model=str(zoo.folder), data=str(zoo.dataset_folder), output=f"{tmp}/out", spc=spc, seed=seed,
                        trigger=trigger_spec("badnet", CACHE / "triggers"), target="0", eval_limit=eval_limit)
        job = prepare(cfg)
    model = job.loaded.model
    t = job.tensors
    pruner = FilterPruner(model, job.loaded.net, t.train[:1])
    stamp = make_trigger(cfg.trigger, job.loaded.input_size)
    floor = round_floor(model, pruner, t.trig_train, t.train_y, t.val, t.trig_val, cfg.batch_size,
                        repeats=5)
    engine_t, engine_p = engine_rounds(job, pruner, rounds, cfg.batch_size)
    log(f"SPC {spc}: floor {floor:.3f} s, engine {statistics.median(engine_t):.3f} s/round")
    naive_t, naive_p = naive_rounds(job, pruner, rounds, cfg.batch_size, stamp)
    log(f"SPC {spc}: naive {statistics.median(naive_t):.3f} s/round")
    bf16_t, bf16_p = engine_rounds(job, pruner, rounds, cfg.batch_size, autocast=True)
    log(f"SPC {spc}: bf16 {statistics.median(bf16_t):.3f} s/round")
    assert naive_p == engine_p, "the naive loop must prune the same filters as the engine"
    return {"spc": spc, "n_train": len(t.train_y), "n_val": len(t.val_y), "n_test": len(t.test_y),
            "rounds": rounds, "floor_s": floor,
            "engine_round_s": engine_t, "naive_round_s": naive_t, "bf16_round_s": bf16_t,
            "engine_over_floor": statistics.median(engine_t) / floor,
            "naive_over_engine": statistics.median(naive_t) / statistics.median(engine_t),
            "bf16_over_engine": statistics.median(bf16_t) / statistics.median(engine_t),
            "bf16_same_filters": bf16_p == engine_p, "picked": engine_p}


def table(rows: list[dict]) -> str:
    lines = ["| SPC | train / val / test images | floor s | engine s/round | engine / floor | naive s/round | "
             "naive / engine | bf16 s/round | bf16 same filters |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = {k: statistics.median(r[f"{k}_round_s"]) for k in ("engine", "naive", "bf16")}
        lines.append(f"| {r['spc']} | {r['n_train']} / {r['n_val']} / {r['n_test']} | {r['floor_s']:.3f} | "
                     f"{med['engine']:.3f} | {r['engine_over_floor']:.2f} | {med['naive']:.3f} | "
                     f"{r['naive_over_engine']:.2f} | {med['bf16']:.3f} | "
                     f"{'yes' if r['bf16_same_filters'] else 'no'} |")
    lines.append(f"\nMedians over {rows[0]['rounds']} rounds, all variants measured in one process on the same model "
                 f"and few-shot draw (CPU, {torch.get_num_threads()} torch threads).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding cifar10/")
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb", "digits"])
    ap.add_argument("--spc", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=2000, help="test images evaluated per round by the naive loop")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    recipe = TIERS["smoke" if args.dataset == "digits" else "cpu"].recipes[args.dataset]
    zoo = backdoored(args.dataset, "badnet", recipe, args.data, CACHE, log)
    rows = [measure(zoo, spc, args.rounds, args.seed, args.eval_limit, log) for spc in args.spc]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps({"dataset": args.dataset, "device": "cpu",
                                                     "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    text = f"# Pruning round speed ({args.dataset} BadNets, {zoo.folder.name})\n\n" + table(rows) + "\n"
    (args.out / "speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
