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
    label_smoothing: float = 0.0
    channels_last: bool = False  # faster training on CPU (1.2-1.4x, benchmarks/train_speed.py); other weights' bits
    input_size: int | None = None  # the model's input resolution (its preprocessing resizes to it); None: the data's
    poison_rate: float = 0.1
    bpp_neg_rate: float = 0.2  # BPP's negative samples per batch (BackdoorBench: 0.2 in its original_default.yaml
    # beside a 0.2 poisoning rate, 0.1 in default.yaml beside 0.1; both squeeze to 8 levels without dithering)
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
    recipe_config = asdict(recipe)
    if attack != "bpp":  # a setting of one attack does not make another attack's model a different one
        recipe_config.pop("bpp_neg_rate")
    config = {"dataset": dataset, "attack": attack, "recipe": recipe_config, "normalise": spec.normalise,
              "augment": spec.augment, "flip": spec.flip, "version": 1}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / "models" / f"{dataset}-{attack}-{key}"
    if (folder / "model.safetensors").is_file() and (folder / "zoo_info.json").is_file():
        return ZooModel(folder, data_dir, {**json.loads((folder / "zoo_info.json").read_text()),
                                           "weights_sha256": weights_sha256(folder)})
    arrays, names = load_arrays(spec, data_dir)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if spec.normalise else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    size = recipe.input_size or arrays["train"][0].shape[1]
    model = timm_classifier(recipe.arch, names, size=size, mean=mean, std=std, seed=recipe.seed, **recipe.model_args)
    if size != arrays["train"][0].shape[1]:
        # the attacker poisons what the model sees: images through the model's own preprocessing, the resize a
        # defender's tool applies too (so the trigger lives at the model's resolution for both)
        arrays = {k: (preprocessed(model, xs), ys) for k, (xs, ys) in arrays.items()}
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
    stamp = make_trigger(trigger_spec(measured, trig_dir, size), (size, size))
    batch_fn = None
    if attack == CLEAN:
        pass
    elif attack == "bpp":
        batch_fn = BppPoisoner.from_images(x, recipe.target, rate=recipe.poison_rate, neg_rate=recipe.bpp_neg_rate)
    else:
        x, y = poison(x, y, recipe.poison_rate, recipe.target, stamp, recipe.seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    # a model too slow for one sitting resumes from its last finished epoch; train_s counts this sitting's and the
    # earlier sittings' seconds
    checkpoint = folder.with_name(folder.name + ".partial.pt")
    earlier_s = folder.with_name(folder.name + ".partial.s")
    before_s = float(earlier_s.read_text()) if checkpoint.is_file() and earlier_s.is_file() else 0.0

    def on_epoch(e: int) -> None:
        elapsed = before_s + time.perf_counter() - t0
        earlier_s.write_text(f"{elapsed:.1f}")
        log(f"  {dataset}/{attack}: epoch {e}/{recipe.epochs} {elapsed:.0f} s")

    train_classifier(model, x, y, recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed,
                     augment=spec.augment, flip=spec.flip, schedule=recipe.schedule, batch_fn=batch_fn,
                     label_smoothing=recipe.label_smoothing, channels_last=recipe.channels_last,
                     checkpoint=checkpoint, on_epoch=on_epoch)
    train_s = before_s + time.perf_counter() - t0
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
    checkpoint.unlink(missing_ok=True)
    earlier_s.unlink(missing_ok=True)
    return ZooModel(folder, data_dir, {**info, "weights_sha256": weights_sha256(folder)})


def preprocessed(model, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """uint8 HWC images through the timm model's own evaluation transform (hf_gradprune.hub's, the one the tool
    applies to a user's images), a chunk at a time."""
    from PIL import Image

    from hf_gradprune.hub import timm_preprocessing
    to_pixels = timm_preprocessing(model.net)[1]
    return np.concatenate([to_pixels([Image.fromarray(im) for im in images[i:i + chunk]]).transpose(0, 2, 3, 1)
                           for i in range(0, len(images), chunk)])


def weights_sha256(folder: Path) -> str:
    """The same recipe trains other weights on another CPU (another instruction set, other kernels): rows say which
    model they defended, so that only rows of the same model are compared."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
