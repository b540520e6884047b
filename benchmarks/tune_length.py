"""How long Grad-Prune's fine-tuning should run: test ACC / ASR along the robust recipe's fine-tuning with the KNOWN
trigger, for one zoo model and few-shot draw, with TuneConfig overrides (max_epochs, max_steps, ...).

    python benchmarks/tune_length.py gtsrb lf 0 known '{"max_steps": 80}' 1000
    # arguments: DATASET ATTACK SEED known|blind OVERRIDES EVERY

Prints ACC / ASR before, every EVERY epochs and at the kept epoch, on the first 3000 test images; the data root is
$GRADPRUNE_DATA (default ../shared/data). The logs behind docs/unknown-trigger.md's choice of SYNTHESISED_TUNE_STEPS
are in results/experiments/tune-length-avx512/. A diagnostic: it prints, it writes no rows."""
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
from hf_gradprune.pipeline import JobConfig, prepare
from hf_gradprune.progress import ProgressEvent
from tiers import TIERS
from zoo import CACHE, backdoored

dataset, attack, seed, blind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "blind"
over = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
every = int(sys.argv[6]) if len(sys.argv) > 6 else 5
t = TIERS["cpu"]
recipe = t.recipes[dataset]
zoo = backdoored(dataset, attack, recipe, Path(os.environ.get("GRADPRUNE_DATA", "../shared/data")), CACHE, print)
cfg = JobConfig(model=str(zoo.folder), data=str(zoo.dataset_folder), output="/tmp/diag-out", spc=10, seed=seed,
                trigger=trigger_spec(attack, CACHE / "triggers"), target="auto" if blind else "0", blind=blind,
                eval_limit=3000)
cfg.tune = replace(cfg.tune, **over)
torch.manual_seed(seed)
job = prepare(cfg)
tt = job.tensors
tgt = job.metrics_target
model = job.loaded.model
b = attack_metrics(model, tt.test, tt.trig_test, tt.test_y, tgt, job.batch_size)
print(f"before acc {b.acc:.3f} asr {b.asr:.3f}", flush=True)
def emit(ev: ProgressEvent):
    if ev.stage == "finetune" and ev.step and ev.step % every == 0:
        m = attack_metrics(model, tt.test, tt.trig_test, tt.test_y, tgt, job.batch_size)
        print(f"epoch {ev.step} acc {m.acc:.3f} asr {m.asr:.3f} val_loss {ev.values.get('val_loss'):.3f}", flush=True)
d = defend(cfg.method, job, cfg, emit)
a = attack_metrics(model, tt.test, tt.trig_test, tt.test_y, tgt, job.batch_size)
print(f"kept epoch {d.tune.best_epoch} of {d.tune.epochs}: acc {a.acc:.3f} asr {a.asr:.3f}")
print("val_accs", [round(x, 3) for x in d.tune.val_accs])
print("val_unl", [round(x, 3) for x in d.tune.val_unlearning_losses])
print("val_loss", [round(x, 3) for x in d.tune.val_losses])
