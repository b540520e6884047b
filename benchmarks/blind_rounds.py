"""The trigger-unknown defence round by round (--blind): after one scan, each option's synthesise -> unlearn rounds
from the original weights, with test ACC / ASR (the real trigger, first 3000 test images) after every round and the
target's standing before it (synth.standing: the scan's anomaly index of the re-synthesised triggers).

    python benchmarks/blind_rounds.py gtsrb badnet 0 '{"default": {}, "evidence": {"families": "evidence"}}'

The rounds here end with the defended weights (no pull-back); "wise" reports, after each round, the real trigger's
ACC / ASR and every synthesised trigger's flips at each share s of the weight change (original + s x (defended -
original)), which is what synth.pull_back decides on. Options: "steps" (fine-tuning step budget, default
recipes.SYNTHESISED_TUNE_STEPS), "tune" (other TuneConfig fields, e.g. {"lr": 0.0005}), "recal" (re-estimate batch-norm
statistics on the clean few-shot images after each round), "wise" (list of shares), "families": "evidence" (stamp only
the family that gave the evidence), "rounds" (default 3). The data root is $GRADPRUNE_DATA (default ../shared/data).
The logs behind docs/unknown-trigger.md's "what was tried" are in results/experiments/blind-rounds-avx512/. A
diagnostic: it prints, it writes no rows.
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch

from attacks import trigger_spec
from hf_gradprune.methods import defend
from hf_gradprune.metrics import attack_metrics
from hf_gradprune.pipeline import JobConfig, _snapshot, prepare
from hf_gradprune.recipes import SYNTHESISED_TUNE_STEPS
from hf_gradprune.synth import resynthesise, stamp_twins, standing, toward, trigger_flips, usable_triggers
from tiers import TIERS
from zoo import CACHE, backdoored

dataset, attack, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = json.loads(sys.argv[4])  # name -> {"steps": int, "tune": {...}, "families": "both"|"evidence", "rounds": int}
recipe = TIERS["cpu"].recipes[dataset]
zoo = backdoored(dataset, attack, recipe, Path(os.environ.get("GRADPRUNE_DATA", "../shared/data")), CACHE, print)
cfg = JobConfig(model=str(zoo.folder), data=str(zoo.dataset_folder), output="/tmp/diag-out", spc=10, seed=seed,
                trigger=trigger_spec(attack, CACHE / "triggers"), target="auto", blind=True, eval_limit=3000)
torch.manual_seed(seed)
job = prepare(cfg)
t = job.tensors
model = job.loaded.model
original = _snapshot(model)
tgt = job.metrics_target
sc = cfg.scan_config(job.batch_size)
pixels, labels = torch.cat([t.train, t.val]), torch.cat([t.train_y, t.val_y])
print("scan", job.scan.family, job.scan.anomaly, flush=True)
base_tune = cfg.tune

@torch.no_grad()
def recalibrate(model, images, batch=128):
    """Batch-norm running statistics re-estimated on the clean few-shot images alone (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for s in range(0, len(images), batch):
        model(images[s:s + batch])
    for m, mom in zip(bns, moms):
        m.momentum = mom
    model.eval()


def synthesised_flips(model, triggers):
    """Per synthesised trigger: % of the few-shot images of other classes it sends to the target."""
    return [round(100 * f, 1) for f in trigger_flips(model, triggers, pixels, labels)]


for name, o in options.items():
    model.load_state_dict(original)
    cfg.tune = replace(base_tune, max_steps=o.get("steps", SYNTHESISED_TUNE_STEPS), **o.get("tune", {}))
    triggers = usable_triggers(job.scan)
    if o.get("families") == "evidence":
        triggers = triggers[:1]
    out = []
    for r in range(1, o.get("rounds", 3) + 1):
        if r > 1:
            fresh = resynthesise(model, pixels, labels, job.target, sc, r)
            st = standing(job.scan, job.target, fresh)
            if o.get("families") == "evidence":
                fresh = [f for f in fresh if f.family == job.scan.family] or fresh
            triggers = triggers + fresh
            model.load_state_dict(original)
        else:
            st = None
        t = t.restamped(stamp_twins(triggers, t.train), stamp_twins(triggers, t.val))
        job = replace(job, tensors=t)
        d = defend(cfg.method, job, cfg, lambda e: None)
        if o.get("recal"):
            recalibrate(model, pixels)
        m = attack_metrics(model, t.test, t.trig_test, t.test_y, tgt, job.batch_size)
        for beta in o.get("wise", []):  # reported only: the weights part way back to the original
            defended = _snapshot(model)
            model.load_state_dict({k: toward(original[k], v, beta) for k, v in defended.items()})
            w = attack_metrics(model, t.test, t.trig_test, t.test_y, tgt, job.batch_size)
            print(f"{name} r{r} wise {beta}: acc {100*w.acc:.1f} asr {100*w.asr:.1f} synthesised flips "
                  f"{synthesised_flips(model, triggers)}", flush=True)
            model.load_state_dict(defended)
        if o.get("wise"):
            print(f"{name} r{r} wise 1.0: synthesised flips {synthesised_flips(model, triggers)}", flush=True)
        out.append(f"r{r}: st {st if st is None else round(st, 2)} acc {100*m.acc:.1f} asr {100*m.asr:.1f} "
                   f"ep {d.tune.epochs}/{d.tune.best_epoch}")
        print(name, out[-1], flush=True)
    print(f"{dataset} {attack} {name}: " + " | ".join(out), flush=True)
