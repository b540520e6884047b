"""The trigger-unknown defence round by round (--blind): after one scan, each option's synthesise -> unlearn rounds
from the original weights, with test ACC / ASR (the real trigger, first 3000 test images) after every round and the
target's standing before it (synth.standing: the scan's anomaly index of the re-synthesised triggers).

    python benchmarks/blind_rounds.py gtsrb badnet 0 '{"default": {}, "evidence": {"families": "evidence"}}'

Options: "steps" (fine-tuning step budget, default recipes.SYNTHESISED_TUNE_STEPS), "families": "evidence" (stamp only the family that gave the
evidence), "rounds" (default 3). The data root is $GRADPRUNE_DATA (default ../shared/data). The logs behind README's
"what was tried" are in results/blind-rounds-avx512/. A diagnostic: it prints, it writes no rows."""
import json, os, sys
from pathlib import Path
from dataclasses import replace
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from attacks import trigger_spec
from tiers import TIERS
from zoo import CACHE, backdoored
from hf_gradprune.pipeline import JobConfig, prepare, _snapshot
from hf_gradprune.methods import defend
from hf_gradprune.metrics import attack_metrics
from hf_gradprune.recipes import SYNTHESISED_TUNE_STEPS
from hf_gradprune.synth import resynthesise, stamp_twins, standing, usable_triggers

dataset, attack, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = json.loads(sys.argv[4])  # name -> {"steps": int, "families": "both"|"evidence", "rounds": int}
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
pixels, labels = torch.cat([t["train"], t["val"]]), torch.cat([t["train_y"], t["val_y"]])
print("scan", job.scan.family, job.scan.anomaly, flush=True)
for name, o in options.items():
    model.load_state_dict(original)
    cfg.tune = replace(cfg.tune, max_steps=o.get("steps", SYNTHESISED_TUNE_STEPS))
    triggers = usable_triggers(job.scan)
    if o.get("families") == "evidence":
        triggers = triggers[:1]
    out = []
    for r in range(1, o.get("rounds", 3) + 1):
        if r > 1:
            fresh = resynthesise(model, pixels, labels, job.target, sc, r)
            st = standing(job.scan, fresh)
            if o.get("families") == "evidence":
                fresh = [f for f in fresh if f.family == job.scan.family] or fresh
            triggers = triggers + fresh
            model.load_state_dict(original)
        else:
            st = None
        t["trig_train"], t["trig_val"] = stamp_twins(triggers, t["train"]), stamp_twins(triggers, t["val"])
        d = defend(cfg.method, job, cfg, lambda e: None)
        m = attack_metrics(model, t["test"], t["trig_test"], t["test_y"], tgt, job.batch_size)
        out.append(f"r{r}: st {st if st is None else round(st, 2)} acc {100*m.acc:.1f} asr {100*m.asr:.1f} ep {d.tune.epochs}/{d.tune.best_epoch}")
        print(name, out[-1], flush=True)
    print(f"{dataset} {attack} {name}: " + " | ".join(out), flush=True)
