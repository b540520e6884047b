"""Backdoored model zoo: train (or load from cache) a backdoored classifier per dataset / attack / recipe.

Cache key = hash of the full configuration, so changing anything retrains and a rerun skips training."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from attacks import BppPoisoner, changed_pixel_share, trigger_spec
from hf_gradprune.demo import (
    DIGIT_NAMES,
    digits,
    poison,
    save_timm,
    timm_classifier,
    train_classifier,
    write_hub_dataset,
)
from hf_gradprune.metrics import attack_metrics
from hf_gradprune.triggers import make_trigger

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache"
CLEAN = "clean"  # no attack: the same recipe, no poisoned image
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_column: str
    normalise: bool  # CIFAR-10 with its mean/std; GTSRB and digits not normalised (mean 0, std 1)
    flip: bool  # horizontal flip only for CIFAR-10 (BackdoorBench)
    augment: bool = True


DATASETS = {
    "cifar10": DatasetSpec("cifar10", "img", True, True),
    "gtsrb": DatasetSpec("gtsrb", "image", False, False),
    "digits": DatasetSpec("digits", "image", False, False, augment=False),  # built in: sklearn, for the smoke tier
}


@dataclass
class Recipe:
    arch: str = "resnet18"  # a timm architecture
    model_args: dict = field(default_factory=lambda: {"channels": [32, 64, 128, 256], "stem_width": 32})
    epochs: int = 12
    lr: float = 0.01
    batch_size: int = 128
    schedule: str = "cosine"
    poison_rate: float = 0.1
    target: int = 0
    seed: int = 0
    train_limit: int | None = None  # subset of the training set (smoke tier)


@dataclass
class ZooModel:
    folder: Path
    dataset_folder: Path
    info: dict = field(default_factory=dict)


def dataset_folder(name: str, data_root: Path, cache: Path = CACHE) -> Path:
    if name == "digits":
        folder = cache / "datasets" / "digits"
        if not (folder / "data" / "test-00000-of-00001.parquet").is_file():
            write_hub_dataset(folder, digits(), DIGIT_NAMES)
        return folder
    folder = Path(data_root) / name
    if not folder.is_dir():
        raise SystemExit(f"--data {data_root}: no {name}/ folder; give the folder holding cifar10/ and gtsrb/")
    return folder


def load_arrays(spec: DatasetSpec, folder: Path):
    from hf_gradprune.data import load_splits  # a cache of its own per folder (two folders may share a name)
    ds = load_splits(str(folder))
    out = {}
    for split in ("train", "test"):
        d = ds[split].with_format("numpy")
        out[split] = (np.asarray(d[spec.image_column], dtype=np.uint8), np.asarray(d["label"], dtype=np.int64))
    return out, list(ds["train"].features["label"].names)


def backdoored(dataset: str, attack: str, recipe: Recipe, data_root: Path, cache: Path = CACHE, log=print) -> ZooModel:
    spec = DATASETS[dataset]
    data_dir = dataset_folder(dataset, data_root, cache)
    config = {"dataset": dataset, "attack": attack, "recipe": asdict(recipe), "normalise": spec.normalise,
              "augment": spec.augment, "flip": spec.flip, "version": 1}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / "models" / f"{dataset}-{attack}-{key}"
    if (folder / "model.safetensors").is_file() and (folder / "zoo_info.json").is_file():
        return ZooModel(folder, data_dir, {**json.loads((folder / "zoo_info.json").read_text()),
                                           "weights_sha256": weights_sha256(folder)})
    arrays, names = load_arrays(spec, data_dir)
    x, y = arrays["train"]
    if recipe.train_limit:
        keep = np.random.default_rng(recipe.seed).permutation(len(x))[: recipe.train_limit]
        x, y = x[keep], y[keep]
    trig_dir = cache / "triggers"
    # "clean": the same recipe without poison (what a scan must call clean); its ASR is measured with BadNets' trigger
    measured = "badnet" if attack == CLEAN else attack
    changed = changed_pixel_share(measured, trig_dir, x)
    # every trigger must change pixels; LF, being global, most of them (BackdoorBench's LF files for some models
    # change none, so its "LF" attack there had no trigger at all)
    assert changed > (0.5 if attack == "lf" else 0.0), f"{attack} trigger changes {changed:.1%} of pixel values"
    size = x.shape[1]
    stamp = make_trigger(trigger_spec(measured, trig_dir, size), (size, size))
    batch_fn = None
    if attack == CLEAN:
        pass
    elif attack == "bpp":
        batch_fn = BppPoisoner.from_images(x, recipe.target, rate=recipe.poison_rate)
    else:
        x, y = poison(x, y, recipe.poison_rate, recipe.target, stamp, recipe.seed)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if spec.normalise else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    model = timm_classifier(recipe.arch, names, size=size, mean=mean, std=std, seed=recipe.seed, **recipe.model_args)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    train_classifier(model, x, y, recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed,
                     augment=spec.augment, flip=spec.flip, schedule=recipe.schedule, batch_fn=batch_fn,
                     on_epoch=lambda e: log(f"  {dataset}/{attack}: epoch {e}/{recipe.epochs} "
                                            f"{time.perf_counter() - t0:.0f} s"))
    train_s = time.perf_counter() - t0
    model.cpu()
    tx, ty = arrays["test"]
    clean = torch.from_numpy(tx).permute(0, 3, 1, 2).contiguous()
    m = attack_metrics(model, clean, stamp(clean), torch.from_numpy(ty), recipe.target)
    info = {"config": config, "train_s": train_s, "acc": m.acc, "asr": m.asr, "ra": m.ra,
            "trigger_changed_pixel_share": changed}
    tmp = folder.with_name(folder.name + ".tmp")
    save_timm(model, tmp, recipe.model_args, names)
    (tmp / "zoo_info.json").write_text(json.dumps(info, indent=2))
    tmp.rename(folder)
    return ZooModel(folder, data_dir, {**info, "weights_sha256": weights_sha256(folder)})


def weights_sha256(folder: Path) -> str:
    """The same recipe trains other weights on another CPU (another instruction set, other kernels): rows say which
    model they defended, so that only rows of the same model are compared."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
