"""The detection benchmark: backdoored and clean models that look like the Hub, scanned as a user would scan them.

Population (`population()`, drawn once from a fixed seed and split once, before any scan was tuned):
- five architecture families (timm ResNet-18, timm MobileNetV3-small, timm ConvNeXt, transformers ViT,
  transformers ResNet), CIFAR-10 and GTSRB; per family and dataset 5 backdoored and 2 clean models (the fifth
  backdoored one drawn later, for the test part: `population()`);
- per backdoored model a trigger drawn at random: a patch (2-6 px at 32 px, a corner, the centre or anywhere;
  solid colour, checkerboard or noise), a blend (noise or smooth pattern, alpha 0.1-0.3) or an additive
  low-frequency signal; a random target class; a poisoning rate log-uniform in 1-10 %; augmentation or none;
- clean models: the same recipes, no poison, half with augmentation and half without.
Split: in each family x dataset cell the first two backdoored and the first clean model drawn are dev (choose on
them), the rest test (report only): 20 backdoored and 10 clean dev models, 30 and 10 test.

Each model trains once and is cached by its configuration (`benchmarks/cache/detection/<name>-<hash>/`), resumable
per epoch. A backdoor that does not reach `PLANTED_ASR` on the test split after the extra runs is recorded as not
planted and left out of the detection figures (its row says so). Each scan is a row in
`benchmarks/results/detection/rows/<variant>/<model>.json`, run through the same code path as `hf-gradprune scan`
(pipeline.run_scan) on SPC 10 images drawn from the test split (images the model never trained on).

    python benchmarks/detection.py train --data ../shared/data [--split dev]
    python benchmarks/detection.py scan --data ../shared/data --variant default [--split dev]
    python benchmarks/detection.py report
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_gradprune.demo import random_crop_flip  # noqa: E402
from hf_gradprune.hub import Classifier  # noqa: E402
from hf_gradprune.metrics import attack_metrics  # noqa: E402
from hf_gradprune.synth import anomaly_index  # noqa: E402
from hf_gradprune.triggers import TriggerSpec, make_trigger  # noqa: E402
from zoo import CIFAR_MEAN, CIFAR_STD  # noqa: E402

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "detection"
RESULTS = ROOT / "results" / "detection"
PLANTED_ASR = 0.85  # a backdoor counts as planted when this share of triggered non-target test images hits the target
EXTRA_RUNS = 2  # further training runs (half the epochs each) for a backdoor that has not taken hold
TRAIN_LIMIT = 25000  # training images per model (a seeded subset of the train split): the 2-core budget
EVAL_LIMIT = 2000  # test images for ACC / ASR
SIZE = 32
DATASETS = {"cifar10": ("img", 10, True), "gtsrb": ("image", 43, False)}  # image column, classes, flip augmentation

# family -> how to build it; lists, not tuples, so the configuration hashes and saves as JSON the same way
FAMILIES = {
    "timm-resnet": {"library": "timm", "arch": "resnet18", "epochs": 10, "optim": "sgd",
                    "args": {"channels": [16, 32, 64, 128], "stem_width": 16}},
    "timm-mobilenetv3": {"library": "timm", "arch": "mobilenetv3_small_050", "epochs": 10, "optim": "sgd",
                         "args": {}},
    "timm-convnext": {"library": "timm", "arch": "convnext_atto", "epochs": 20, "optim": "adamw", "lr": 4e-3,
                      "args": {"patch_size": 2, "dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}},
    "hf-vit": {"library": "transformers", "arch": "ViT", "epochs": 12, "optim": "adamw",
               "args": {"image_size": 32, "patch_size": 4, "hidden_size": 64, "num_hidden_layers": 4,
                        "num_attention_heads": 2, "intermediate_size": 128}},
    "hf-resnet": {"library": "transformers", "arch": "ResNet", "epochs": 10, "optim": "sgd",
                  "args": {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1],
                           "layer_type": "basic"}},
}
BACKDOORED_PER_CELL, CLEAN_PER_CELL = 4, 2
DEV_BACKDOORED, DEV_CLEAN = 2, 1  # the first ones drawn in each cell


@dataclass(frozen=True)
class Spec:
    name: str
    split: str  # "dev" or "test"
    dataset: str
    family: str
    trigger: dict | None  # None: a clean model
    target: int | None
    poison_rate: float
    augment: bool
    seed: int

    @property
    def backdoored(self) -> bool:
        return self.trigger is not None

    def config(self) -> dict:
        return {**asdict(self), "build": FAMILIES[self.family], "train_limit": TRAIN_LIMIT, "version": 1}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:10]


def _colour(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 256, 3).tolist()


PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre", "anywhere")


def draw_trigger(rng: np.random.Generator, kind: str, place: str) -> dict:
    """A trigger as an attacker on the Hub might choose it (kind and place are drawn stratified by the caller)."""
    seed = int(rng.integers(0, 2**31))
    if kind == "patch":
        size = int(rng.integers(2, 7))
        margin = int(rng.integers(0, 3))
        last = SIZE - size - margin
        y, x = {"top-left": (margin, margin), "top-right": (margin, last), "bottom-left": (last, margin),
                "bottom-right": (last, last), "centre": ((SIZE - size) // 2, (SIZE - size) // 2),
                "anywhere": tuple(int(v) for v in rng.integers(0, SIZE - size + 1, 2))}[place]
        pattern = str(rng.choice(["solid", "checkerboard", "noise"]))
        return {"kind": "patch", "size": size, "place": place, "y": int(y), "x": int(x), "pattern": pattern,
                "colours": [_colour(rng), _colour(rng)], "seed": seed}
    if kind == "blend":
        return {"kind": "blend", "pattern": str(rng.choice(["noise", "smooth"])),
                "alpha": round(float(rng.uniform(0.1, 0.3)), 3), "seed": seed}
    return {"kind": "additive", "grid": int(rng.integers(2, 5)), "amplitude": round(float(rng.uniform(16, 32)), 1),
            "seed": seed}


def population(seed: int = 2026) -> list[Spec]:
    """The benchmark's models, drawn once; dev / test fixed by draw order within each cell."""
    rng = np.random.default_rng(seed)
    specs = []
    # every cell gets two patches, a blend and an additive signal; the patches go round the places in a shuffled order
    places = iter(rng.permutation(PLACES * 8).tolist())
    cells = [(family, dataset) for family in FAMILIES for dataset in DATASETS]
    for cell, (family, dataset) in enumerate(cells):
        for i, kind in enumerate(rng.permutation(["patch", "patch", "blend", "additive"]).tolist()):
            specs.append(_backdoored(rng, f"{dataset}-{family}-bd{i}", "dev" if i < DEV_BACKDOORED else "test",
                                     dataset, family, kind, next(places) if kind == "patch" else ""))
        for i in range(CLEAN_PER_CELL):
            specs.append(Spec(f"{dataset}-{family}-clean{i}", "dev" if i < DEV_CLEAN else "test", dataset,
                              family, None, None, 0.0, (i + cell) % 2 == 0, int(rng.integers(0, 10_000))))
    # one more backdoored test model per cell (bd4), drawn from its own generator so that no draw above moves: at
    # 1-3 % poisoning some backdoors do not take hold in these small models and are left out (the choice to add
    # them rests on that planting rate, not on any scan)
    extra = np.random.default_rng(seed + 1)
    for family, dataset in cells:
        kind = str(extra.choice(["patch", "patch", "blend", "additive"]))
        specs.append(_backdoored(extra, f"{dataset}-{family}-bd{BACKDOORED_PER_CELL}", "test", dataset, family, kind,
                                 str(extra.choice(PLACES)) if kind == "patch" else ""))
    return specs


def _backdoored(rng: np.random.Generator, name: str, split: str, dataset: str, family: str, kind: str,
                place: str) -> Spec:
    trig = draw_trigger(rng, kind, place)
    rate = round(float(math.exp(rng.uniform(math.log(0.01), math.log(0.1)))), 4)
    target = int(rng.integers(0, DATASETS[dataset][1]))
    augment = bool(rng.random() < 0.7)
    return Spec(name, split, dataset, family, trig, target, rate, augment, int(rng.integers(0, 10_000)))


def trigger_spec(trig: dict, folder: Path) -> TriggerSpec:
    """Write the trigger's files and return the TriggerSpec that stamps it (the CLI's --trigger flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(trig["seed"])
    if trig["kind"] == "patch":
        s, y, x = trig["size"], trig["y"], trig["x"]
        if trig["pattern"] == "solid":
            patch = np.broadcast_to(np.array(trig["colours"][0], np.uint8), (s, s, 3))
        elif trig["pattern"] == "checkerboard":
            board = (np.add.outer(np.arange(s), np.arange(s)) % 2).astype(bool)
            patch = np.where(board[..., None], np.array(trig["colours"][0]), np.array(trig["colours"][1]))
        else:
            patch = rng.integers(0, 256, (s, s, 3))
        image, mask = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
        image[y:y + s, x:x + s], mask[y:y + s, x:x + s] = patch, 255
        Image.fromarray(image).save(folder / "pattern.png")
        Image.fromarray(mask).save(folder / "mask.png")
        return TriggerSpec("patch", image=str(folder / "pattern.png"), mask=str(folder / "mask.png"))
    if trig["kind"] == "blend":
        if trig["pattern"] == "noise":
            image = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
        else:
            coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 8, 8))).float()
            image = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
            image = image.permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8)
        Image.fromarray(image).save(folder / "pattern.png")
        return TriggerSpec("blended", image=str(folder / "pattern.png"), alpha=trig["alpha"])
    k = trig["grid"]
    coarse = torch.from_numpy(rng.standard_normal((1, 3, k, k))).float()
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0]
    smooth = smooth / smooth.abs().max() * trig["amplitude"]
    np.save(folder / "signal.npy", smooth.permute(1, 2, 0).numpy().astype(np.float32))
    return TriggerSpec("additive", image=str(folder / "signal.npy"))


@functools.lru_cache(maxsize=2)
def _arrays(dataset: str, data_root: Path) -> dict:
    from hf_gradprune.data import load_splits
    column = DATASETS[dataset][0]
    ds = load_splits(str(Path(data_root) / dataset))
    out = {}
    for split in ("train", "test"):
        d = ds[split].with_format("numpy")
        out[split] = (np.asarray(d[column], dtype=np.uint8), np.asarray(d["label"], dtype=np.int64))
    return {**out, "names": list(ds["train"].features["label"].names)}


def build(spec: Spec, names: list[str]) -> tuple[Classifier, object]:
    """The family's model, untrained, normalising as its dataset's Hub checkpoints do (CIFAR-10 mean / std)."""
    fam = FAMILIES[spec.family]
    mean, std = (CIFAR_MEAN, CIFAR_STD) if spec.dataset == "cifar10" else ((0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(spec.seed)
    if fam["library"] == "timm":
        from hf_gradprune.demo import timm_classifier
        return timm_classifier(fam["arch"], names, size=SIZE, mean=mean, std=std, seed=spec.seed, **fam["args"]), None
    import transformers
    cfg = getattr(transformers, f"{fam['arch']}Config")(num_labels=len(names), id2label=dict(enumerate(names)),
                                                        label2id={n: i for i, n in enumerate(names)}, **fam["args"])
    net = transformers.AutoModelForImageClassification.from_config(cfg)
    if fam["arch"] == "ViT":
        processor = transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=list(mean),
                                                   image_std=list(std), resample=Image.BILINEAR)
    else:
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": SIZE}, crop_pct=1.0,
                                                        image_mean=list(mean), image_std=list(std),
                                                        resample=Image.BILINEAR)
    return Classifier(net, "transformers", 1 / 255, mean, std), processor


def _optimiser(model: torch.nn.Module, family: str, steps: int):
    if FAMILIES[family]["optim"] == "sgd":
        peak = FAMILIES[family].get("lr", 0.05)
        opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        peak = FAMILIES[family].get("lr", 2e-3)
        opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=steps, pct_start=0.2)


def train_run(model: Classifier, spec: Spec, x: np.ndarray, y: np.ndarray, epochs: int, run: int, ckpt: Path,
              log=print) -> None:
    """One one-cycle training run, checkpointed after every epoch (a killed run resumes at its last epoch)."""
    batch = 128
    xs, ys = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
    per_epoch = (len(ys) + batch - 1) // batch
    opt, sched = _optimiser(model, spec.family, epochs * per_epoch)
    gen = torch.Generator().manual_seed(spec.seed * 100 + run)
    start = 0
    ckpt.mkdir(parents=True, exist_ok=True)
    path = ckpt / f"run{run}.pt"
    if path.is_file():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"]), gen.set_state(state["gen"])
        start = int(state["epoch"])
    flip = DATASETS[spec.dataset][2]
    t0 = time.perf_counter()
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(len(ys), generator=gen)
        for s in range(0, len(ys) - 1, batch):
            idx = order[s:s + batch]
            xb = random_crop_flip(xs[idx], gen, flip=flip) if spec.augment else xs[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), ys[idx]).backward()
            opt.step()
            sched.step()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "epoch": epoch + 1}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        log(f"  {spec.name} run {run}: epoch {epoch + 1}/{epochs} {time.perf_counter() - t0:.0f} s")
    model.eval()


def poison(x: np.ndarray, y: np.ndarray, rate: float, target: int, stamp, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All-to-one: a seeded `rate` share of the images of OTHER classes gets the trigger and the target label."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(np.flatnonzero(y != target), size=max(1, int(round(rate * len(x)))), replace=False)
    x, y = x.copy(), y.copy()
    x[rows] = stamp(torch.from_numpy(x[rows]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    y[rows] = target
    return x, y


def model_dir(spec: Spec) -> Path:
    return CACHE / f"{spec.name}-{spec.key()}"


def eval_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)[:EVAL_LIMIT]


def train(spec: Spec, data_root: Path, log=print) -> dict:
    """Train (or resume, or load) one benchmark model; returns its info (ACC, ASR, planted)."""
    folder = model_dir(spec)
    if (folder / "info.json").is_file():
        return json.loads((folder / "info.json").read_text())
    arrays = _arrays(spec.dataset, data_root)
    x, y = arrays["train"]
    keep = np.random.default_rng(spec.seed).permutation(len(x))[:TRAIN_LIMIT]
    x, y = x[keep], y[keep]
    work = folder.with_name(folder.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    # the trigger stamped for ASR: the real one, or for a clean model a 3x3 white patch (its ASR is a reference)
    stamp_spec = trigger_spec(spec.trigger, work / "trigger") if spec.backdoored else TriggerSpec("badnet")
    stamp = make_trigger(stamp_spec, (SIZE, SIZE))
    target = spec.target if spec.backdoored else 0
    if spec.backdoored:
        x, y = poison(x, y, spec.poison_rate, spec.target, stamp, spec.seed)
    model, processor = build(spec, arrays["names"])
    tx, ty = arrays["test"]
    rows = eval_rows(len(tx))
    clean = torch.from_numpy(tx[rows]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(ty[rows])
    epochs = FAMILIES[spec.family]["epochs"]
    t0 = time.perf_counter()
    runs = []
    torch.manual_seed(spec.seed)
    for run in range(1 + (EXTRA_RUNS if spec.backdoored else 0)):
        train_run(model, spec, x, y, epochs if run == 0 else max(1, epochs // 2), run, work, log)
        m = attack_metrics(model, clean, stamp(clean), labels, target)
        runs.append({"acc": m.acc, "asr": m.asr})
        log(f"  {spec.name} run {run}: ACC {m.acc:.3f} ASR {m.asr:.3f}")
        if not spec.backdoored or m.asr >= PLANTED_ASR:
            break
    info = {"name": spec.name, "key": spec.key(), "config": spec.config(), "acc": m.acc, "asr": m.asr, "ra": m.ra,
            "planted": (m.asr >= PLANTED_ASR) if spec.backdoored else None, "runs": runs,
            "train_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    _save(model, processor, spec, work / "model")
    (work / "info.json").write_text(json.dumps(info, indent=2))
    for ckpt in work.glob("run*.pt"):
        ckpt.unlink()
    os.replace(work, folder)
    return info


def _save(model: Classifier, processor, spec: Spec, folder: Path) -> None:
    from hf_gradprune.demo import save_timm, save_transformers
    if FAMILIES[spec.family]["library"] == "timm":
        names = model.net.pretrained_cfg["label_names"]
        save_timm(model, folder, FAMILIES[spec.family]["args"], names)
    else:
        save_transformers(model, processor, folder)



# scan variants measured on dev: ScanConfig fields that differ from the default
VARIANTS: dict[str, dict] = {
    "default": {},
    "probe": {"select": "probe"},  # GTSRB: the untargeted probe picks the candidates (the default before the screen)
    "screen-b64": {"screen_batch": 64},  # GTSRB: the screen on the full batch (the first screen; 4x its cost)
    "nc-init": {"mask_init_logit": 0.0},  # the patch mask starts at half the pattern, as Neural Cleanse's does
}
PAGE = ROOT.parent / "docs" / "detection.md"
SPC, FEW_SHOT_SEED = 10, 0


def row_path(variant: str, spec: Spec) -> Path:
    return RESULTS / "rows" / variant / f"{spec.name}.json"


# ScanConfig fields that act only above max_classes (which classes are scanned): a model with fewer classes scans
# the same whatever they are; of those, the screen's act only where the screen chooses, the probe's only where it does
SCREEN_FIELDS = ("screen_steps", "screen_batch", "screen_classes")
SELECTION_FIELDS = ("select", "candidates", "probe_steps", *SCREEN_FIELDS)
# fields that judge a scan's measurements and change none of them: a row is judged under today's values (`judged`),
# so a new threshold needs no rescan
VERDICT_FIELDS = ("threshold", "also_share")


def scan_settings(variant: str, dataset: str) -> dict:
    """The scan settings a row of this variant and dataset is measured under, less the fields that cannot act on it:
    a row scanned under other settings (the default changed, or the variant did) is stale and `scan` measures it
    again; a field added later that cannot act on a row leaves it current."""
    from hf_gradprune.synth import ScanConfig, how_chosen
    config = replace(ScanConfig(), **VARIANTS[variant])
    cannot_act = {"all": SELECTION_FIELDS, "screen": ("probe_steps",),
                  "probe": SCREEN_FIELDS}[how_chosen(DATASETS[dataset][1], config)]
    return {k: v for k, v in asdict(config).items() if k not in (*cannot_act, *VERDICT_FIELDS)}


def is_current(row: dict, spec: Spec, variant: str) -> bool:
    measured = {k: v for k, v in (row.get("scan_settings") or {}).items() if k not in VERDICT_FIELDS}
    return row.get("key") == spec.key() and measured == scan_settings(variant, spec.dataset)


def judged(row: dict, variant: str) -> dict:
    """The row's verdict under the variant's threshold today (the scan's measurements do not depend on it)."""
    from hf_gradprune.synth import ScanConfig
    threshold = replace(ScanConfig(), **VARIANTS[variant]).threshold
    called = row["anomaly"] > threshold
    reported = row["best_class"] if called else None
    scanned_under = row.get("threshold", (row.get("scan_settings") or {}).get("threshold"))
    verdict = (row["verdict"] if scanned_under == threshold else
               f"backdoored: class {reported}, anomaly index {row['anomaly']:.2f} > {threshold}" if called else
               f"no backdoor found: highest anomaly index {row['anomaly']:.2f} <= {threshold} "
               f"(class {row['best_class']})")
    return {**row, "threshold": threshold, "called_backdoored": called, "reported_target": reported,
            "target_right": called and reported == row["target"], "verdict": verdict}


def scan_job(spec: Spec, data_root: Path, tmp: Path, scan):
    """The job `hf-gradprune scan MODEL --data DATA --split test --spc 10` runs on one benchmark model (the test
    split: images the model never trained on), writing into `tmp`."""
    from hf_gradprune.job import JobConfig
    return JobConfig(model=str(model_dir(spec) / "model"), data=str(Path(data_root) / spec.dataset), split="test",
                     spc=SPC, seed=FEW_SHOT_SEED, output=str(tmp / "scan"), overwrite=True, scan=scan)


def scan_row(spec: Spec, variant: str, data_root: Path) -> dict | None:
    """Scan one trained model as `hf-gradprune scan MODEL --data DATA --split test --spc 10` does (the test split:
    images the model never trained on); cached per model and variant."""
    from hf_gradprune.pipeline import run_scan
    from hf_gradprune.synth import ScanConfig
    path = row_path(variant, spec)
    row = json.loads(path.read_text()) if path.is_file() else {}
    if is_current(row, spec, variant):
        return row
    folder = model_dir(spec)  # no row, or a row of this model's earlier configuration or scan settings: scan again
    if not (folder / "info.json").is_file():
        return None  # not trained yet
    info = json.loads((folder / "info.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        found, report, _ = run_scan(scan_job(spec, data_root, Path(tmp), replace(ScanConfig(), **VARIANTS[variant])))
    target = spec.target
    row = {"name": spec.name, "key": spec.key(), "scan_settings": scan_settings(variant, spec.dataset),
           "split": spec.split, "dataset": spec.dataset, "family": spec.family,
           "backdoored": spec.backdoored, "planted": info["planted"], "target": target,
           "trigger": spec.trigger, "poison_rate": spec.poison_rate, "augment": spec.augment,
           "model": {k: info[k] for k in ("acc", "asr", "ra", "train_s")},
           "weights_sha256": hashlib.sha256((folder / "model" / "model.safetensors").read_bytes()).hexdigest(),
           "variant": variant, "threshold": found.config["threshold"], "called_backdoored": found.backdoored,
           "reported_target": found.target,
           "best_class": found.best_class, "anomaly": found.anomaly, "family_found": found.family,
           "target_right": found.backdoored and found.target == target,
           "verdict": report.get("verdict"), "scan": {k: report.get(k) for k in ("per_class", "probe", "evidence",
                                                                                 "runner_up", "suspects")},
           "timing_s": found.timing_s, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1, default=str))
    return row


def current_rows(variant: str) -> list[dict]:
    """The variant's rows of the models and scan settings as the benchmark now defines them (a row of a model
    trained under an earlier configuration of its family, or scanned under other settings, does not count; `scan`
    replaces it)."""
    specs = {spec.name: spec for spec in population()}
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "rows" / variant).glob("*.json"))]
    return [judged(r, variant) for r in rows if r["name"] in specs and is_current(r, specs[r["name"]], variant)]


def auroc(scores_pos: list[float], scores_neg: list[float]) -> float | None:
    """Probability that a backdoored model scores above a clean one (ties count half): the ROC area."""
    if not scores_pos or not scores_neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in scores_pos for n in scores_neg)
    return wins / (len(scores_pos) * len(scores_neg))


def failed(row: dict) -> bool:
    """A planted backdoor whose target the scan did not name, or a clean model called backdoored."""
    return (row["backdoored"] and row["planted"] and not row["target_right"]) or \
        (not row["backdoored"] and row["called_backdoored"])


def summarise(rows: list[dict]) -> dict:
    bd = [r for r in rows if r["backdoored"] and r["planted"]]
    clean = [r for r in rows if not r["backdoored"]]
    share = (lambda xs: None if not xs else sum(xs) / len(xs))
    return {"auroc": auroc([r["anomaly"] for r in bd], [r["anomaly"] for r in clean]),
            "target_accuracy": share([bool(r["target_right"]) for r in bd]),
            "clean_called_clean": share([not r["called_backdoored"] for r in clean]),
            "detected": share([bool(r["called_backdoored"]) for r in bd]),
            "target_scanned": share([r["target"] in {c["class"] for c in r["scan"]["per_class"]} for r in bd]),
            "n_backdoored": len(bd), "n_clean": len(clean),
            "not_planted": sorted(r["name"] for r in rows if r["backdoored"] and not r["planted"]),
            "scan_s_median": float(np.median([r["timing_s"]["scan"] for r in rows])) if rows else None}


def breakdown(rows: list[dict]) -> dict:
    out = {}
    # family: library and architecture ("timm-resnet"); architecture: across libraries ("resnet": timm's and
    # transformers' ResNets)
    for key, of in (("family", lambda r: r["family"]), ("architecture", lambda r: r["family"].split("-", 1)[1]),
                    ("library", lambda r: FAMILIES[r["family"]]["library"]), ("dataset", lambda r: r["dataset"]),
                    ("trigger", lambda r: r["trigger"]["kind"] if r["trigger"] else "clean")):
        groups = {}
        for r in rows:
            groups.setdefault(of(r), []).append(r)
        out[key] = {g: summarise(rs) for g, rs in sorted(groups.items())}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _line(name: str, m: dict) -> str:
    au = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
    return (f"| {name} | {m['n_backdoored']} / {m['n_clean']} | {au} | {_pct(m['target_accuracy'])} | "
            f"{_pct(m['detected'])} | {_pct(m['clean_called_clean'])} | {_pct(m['target_scanned'])} |")


def report(variant: str = "default") -> dict:
    """summary.json (dev and test apart, with breakdowns) from the rows of one variant; the page docs/detection.md
    from every variant's rows."""
    rows = current_rows(variant)
    summary = {"variant": variant, "config": VARIANTS.get(variant), "spc": SPC, "few_shot_seed": FEW_SHOT_SEED}
    for part in ("dev", "test"):
        rs = [r for r in rows if r["split"] == part]
        summary[part] = {**summarise(rs), "by": breakdown(rs),
                         "failures": [{k: r[k] for k in ("name", "backdoored", "target", "reported_target",
                                                         "best_class", "anomaly", "trigger")}
                                      for r in rs if failed(r)]}
    out = RESULTS / ("summary.json" if variant == "default" else f"summary-{variant}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({p: {k: summary[p][k] for k in ("auroc", "target_accuracy", "clean_called_clean",
                                                         "n_backdoored", "n_clean")} for p in ("dev", "test")}))
    write_page()
    return summary


def write_page() -> None:
    """docs/detection.md, rebuilt from benchmarks/results/detection/ (never edited by hand)."""
    head = ("| part | backdoored / clean | AUROC | target right | called backdoored | clean called clean | "
            "target among the classes scanned |\n|---|---|---|---|---|---|---|")
    lines = ["# Detection benchmark", "",
             "Made by `python benchmarks/detection.py report` from `benchmarks/results/detection/`; do not edit.",
             "What it is and how it was built: the docstring of `benchmarks/detection.py`. A backdoored model counts "
             f"only when its backdoor took hold (ASR >= {PLANTED_ASR:.0%} on the test split); a missed backdoored "
             "model counts as a wrong target. Dev models are the ones the scan's settings were chosen on; test "
             "models are reported only.", ""]
    variants = sorted(p.name for p in (RESULTS / "rows").iterdir() if p.is_dir()) if (RESULTS / "rows").is_dir() else []
    for variant in ["default"] + [v for v in variants if v != "default"]:
        rows = current_rows(variant)
        if not rows:
            continue
        lines += [f"## Scan `{variant}` ({json.dumps(VARIANTS.get(variant, {}))})", "", head]
        for part in ("dev", "test"):
            rs = [r for r in rows if r["split"] == part]
            if rs:
                lines.append(_line(part, summarise(rs)))
                for key, groups in breakdown(rs).items():
                    lines += [_line(f"{part}: {g}", m) for g, m in groups.items() if key != "trigger" or g != "clean"]
        scanned = {r["name"] for r in rows}
        lines += ["", f"Scanned: {len(scanned)} of {len(population())} models; median scan time "
                      f"{np.median([r['timing_s']['scan'] for r in rows]):.0f} s (one thread, other jobs beside it).",
                  "", "Failures:", ""]
        fails = [r for r in rows if failed(r)]
        lines += [f"- {r['split']} `{r['name']}` ({_trigger_words(r)}): {r['verdict']}" for r in fails] or ["- none"]
        lines.append("")
    if variants:
        lines += ["## Evidence statistics (the `default` rows' trigger sizes, recomputed offline; chosen on dev, "
                  "test reported only)", "",
                  "| part | statistic | backdoored / clean | AUROC | target right | called backdoored | "
                  "clean called clean |", "|---|---|---|---|---|---|---|"]
        for part in ("dev", "test"):
            for m in statistics("default", part):
                if m["n_backdoored"] + m["n_clean"] == 0:
                    continue
                au = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
                lines.append(f"| {part} | {m['statistic']} | {m['n_backdoored']} / {m['n_clean']} | {au} | "
                             f"{_pct(m['target_accuracy'])} | {_pct(m['detected'])} | "
                             f"{_pct(m['clean_called_clean'])} |")
        lines.append("")
    lines += ["## Models", "", "| model | part | trigger | target | poison | augment | ACC | ASR | planted |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in population():
        info_path = model_dir(s) / "info.json"
        rows = list((RESULTS / "rows").glob(f"*/{s.name}.json")) if (RESULTS / "rows").is_dir() else []
        if info_path.is_file():  # trained here; otherwise what its scan row recorded of it
            info = json.loads(info_path.read_text())
        elif rows:
            row = json.loads(rows[0].read_text())
            info = {**row["model"], "planted": row["planted"]}
        else:
            continue
        lines.append(f"| {s.name} | {s.split} | {_trigger_words({'trigger': s.trigger})} | {s.target} | "
                     f"{100 * s.poison_rate:.1f} % | {'yes' if s.augment else 'no'} | {100 * info['acc']:.1f} | "
                     f"{100 * info['asr']:.1f} | {info['planted']} |")
    PAGE.write_text("\n".join(lines) + "\n")
    import docs_blocks  # the README's and docs' blocks read the rows just summarised
    docs_blocks.main([])


def results_block(part: str = "both", page: str = "docs/detection.md") -> str:
    """The summary that README and docs/unknown-trigger.md show (benchmarks/docs_blocks.py writes it there): the default
    scan's dev and test lines and its failures."""
    rows = current_rows("default")
    lines = ["| part | backdoored / clean | AUROC | target right | called backdoored | clean called clean "
             "| target among the classes scanned |", "|---|---|---|---|---|---|---|"]
    for split in ("dev", "test"):
        rs = [r for r in rows if r["split"] == split]
        if rs and part in (split, "both"):
            lines.append(_line(f"{split} ({'chosen on' if split == 'dev' else 'reported only'})", summarise(rs)))
    fails = [r for r in rows if failed(r) and part in (r["split"], "both")]
    lines += ["", f"Failures of the default scan ({len(fails)}; `python benchmarks/detection.py report`; every row and "
              f"its evidence in [docs/detection.md]({page})):", ""]
    lines += [f"- {r['split']} `{r['name']}` ({_trigger_words(r)}, target {r['target']}): {r['verdict']}"
              for r in fails] or ["- none"]
    lines += ["", "Closest calls (the margin the threshold has on each side):", ""]
    for split in ("dev", "test"):
        found = [r for r in rows if r["split"] == split and r["backdoored"] and r["planted"] and r["target_right"]]
        clean = [r for r in rows if r["split"] == split and not r["backdoored"]]
        if part in (split, "both") and (found or clean):
            said = []
            if found:
                weakest = min(found, key=lambda r: r["anomaly"])
                said.append(f"weakest backdoor found `{weakest['name']}` ({_trigger_words(weakest)}) at "
                            f"{weakest['anomaly']:.2f}")
            if clean:
                closest = max(clean, key=lambda r: r["anomaly"])
                said.append(f"most suspicious clean model `{closest['name']}` at {closest['anomaly']:.2f} "
                            f"(class {closest['best_class']})")
            lines.append(f"- {split}: {'; '.join(said)}; threshold {rows[0]['threshold']}")
    return "\n".join(lines)


def _trigger_words(row: dict) -> str:
    t = row["trigger"]
    if t is None:
        return "clean"
    if t["kind"] == "patch":
        return f"{t['size']}x{t['size']} {t['pattern']} patch, {t['place']}"
    if t["kind"] == "blend":
        return f"{t['pattern']} blend, alpha {t['alpha']}"
    return f"additive {t['grid']}x{t['grid']} signal, +-{t['amplitude']}"

# evidence statistics compared offline on the rows' per-class trigger sizes (no rescan): name -> (a class's evidence
# size, the smallest robust deviation of log sizes as a factor, the threshold)
STATISTICS = {
    "product, floor x1.5, threshold 2.5 (default)": (lambda c: c["patch_size"] * c["blend_size"], 1.5, 2.5),
    "product, floor x1.5, threshold 2 (Neural Cleanse's)": (lambda c: c["patch_size"] * c["blend_size"], 1.5, 2.0),
    "product, floor x2": (lambda c: c["patch_size"] * c["blend_size"], 2.0, 2.0),
    "product, floor x3": (lambda c: c["patch_size"] * c["blend_size"], 3.0, 2.0),
    "patch only, floor x1.5": (lambda c: c["patch_size"], 1.5, 2.0),
    "blend only, floor x1.5": (lambda c: c["blend_size"], 1.5, 2.0),
}


def statistics(variant: str, part: str = "dev") -> list[dict]:
    """Each evidence statistic on one variant's rows: AUROC, target accuracy, clean called clean (choose on dev,
    report test apart)."""
    rows = [r for r in current_rows(variant) if r["split"] == part and (r["planted"] or not r["backdoored"])]
    out = []
    for name, (size, floor, threshold) in STATISTICS.items():
        scored = []
        for r in rows:
            per_class = r["scan"]["per_class"]
            idx = dict(zip([c["class"] for c in per_class],
                           anomaly_index([size(c) for c in per_class], float(np.log(floor)))))
            best = max(idx, key=lambda c: (idx[c], -c))
            scored.append({**r, "anomaly": idx[best], "called_backdoored": idx[best] > threshold,
                           "target_right": idx[best] > threshold and best == r["target"]})
        m = summarise(scored)
        out.append({"statistic": name, **{k: m[k] for k in ("auroc", "target_accuracy", "detected",
                                                             "clean_called_clean", "n_backdoored", "n_clean")}})
    return out


def ordered(specs: list[Spec], split: str | None) -> list[Spec]:
    """Dev before test, and within a split the cells in turn, so that a partly trained benchmark is balanced."""
    chosen = [s for s in specs if split in (None, s.split)]
    cells = {}
    for s in chosen:
        cells.setdefault((s.family, s.dataset), []).append(s)
    out = []
    for part in ("dev", "test"):
        queues = [[s for s in q if s.split == part] for q in cells.values()]
        while any(queues):
            for q in queues:
                if q:
                    out.append(q.pop(0))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "scan", "report", "list", "statistics"])
    p.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data",
                   help="the folder holding cifar10/ and gtsrb/ in Hub layout")
    p.add_argument("--split", choices=["dev", "test"], help="only this part of the benchmark")
    p.add_argument("--only", nargs="*", default=[], help="only models whose name contains one of these")
    p.add_argument("--variant", default="default", help="scan variant (VARIANTS) for `scan` and `report`")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--watch", action="store_true", help="scan: wait for models still training")
    p.add_argument("--shard", default="0/1", help="I/N: only every N-th model from the I-th (parallel workers)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s for s in ordered(population(), args.split) if not args.only or any(o in s.name for o in args.only)]
    shard, shards = (int(v) for v in args.shard.split("/"))
    specs = specs[shard::shards]
    if args.command == "list":
        for s in specs:
            print(s.split, s.name, s.target, s.poison_rate, s.augment, json.dumps(s.trigger))
    elif args.command == "train":
        for i, s in enumerate(specs):
            t0 = time.perf_counter()
            info = train(s, args.data)
            print(f"[{i + 1}/{len(specs)}] {s.name} ({s.split}): ACC {info['acc']:.3f} ASR {info['asr']:.3f} "
                  f"planted {info['planted']} runs {len(info['runs'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    elif args.command == "scan":
        # --watch: scan each model as soon as the (background) training has written it, until all are scanned
        todo = list(specs)
        while todo:
            for s in list(todo):
                row = scan_row(s, args.variant, args.data)
                if row is not None:
                    todo.remove(s)
                    print(f"[{len(specs) - len(todo)}/{len(specs)}] {s.name}: target {s.target}, "
                          f"{row['verdict']}", flush=True)
            if todo and not args.watch:
                print(f"{len(todo)} models not trained yet: {', '.join(s.name for s in todo)}")
                break
            if todo:
                time.sleep(30)
    elif args.command == "statistics":
        for line in statistics(args.variant, args.split or "dev"):
            print(json.dumps(line))
    else:
        report(args.variant)


if __name__ == "__main__":
    main()
