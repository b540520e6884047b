"""The offline demo, and the builders the tests reuse: a real BadNets backdoor planted in small CNNs trained
on real images that ship inside scikit-learn (the 8x8 digits, upscaled to 32x32), saved in Hub layouts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .hub import Classifier
from .triggers import TriggerSpec, make_trigger

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, ConvNextImageProcessor, PretrainedConfig

    from .hub import Library
    from .pipeline import JobResult
    from .progress import ProgressCallback
    from .triggers import Trigger

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# digits in colour: class 10 k + d is digit d in TINTS[k] (a dataset with more classes than the scan scans)
TINTS = {"white": (1.0, 1.0, 1.0), "orange": (1.0, 0.6, 0.15), "blue": (0.3, 0.65, 1.0)}


def digit_names(tints: int = 1) -> list[str]:
    return [n if k == 0 else f"{n}-{tint}" for k, tint in enumerate(list(TINTS)[:tints]) for n in DIGIT_NAMES]


def digits(size: int = 32, seed: int = 0, test_fraction: float = 0.2,
           tints: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 RGB (N, size, size, 3), split per class into train / test. tints > 1: every
    digit also in the next colours of TINTS, one class per digit and colour (`digit_names(tints)`)."""
    from sklearn.datasets import load_digits
    raw = load_digits()
    imgs = (raw.images / 16.0 * 255).clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(rgb), bool)
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(raw.target == c))
        test[rows[: int(round(len(rows) * test_fraction))]] = True
    y = raw.target.astype(np.int64)
    colours = [np.asarray(c, np.float32) for c in list(TINTS.values())[:tints]]
    rgb = np.concatenate([(rgb * c).round().astype(np.uint8) for c in colours])
    y, test = np.concatenate([y + 10 * k for k in range(len(colours))]), np.tile(test, len(colours))
    return {"train": (rgb[~test], y[~test]), "test": (rgb[test], y[test])}


def write_hub_dataset(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                      image_column: str = "image", label_column: str = "label") -> Path:
    """A dataset folder in Hub layout (data/<split>-00000-of-00001.parquet + README configs), as the Hub stores it."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    quiet_before = are_progress_bars_disabled()
    disable_progress_bars()  # writing a few small parquet files needs no bars
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    features = Features({image_column: ImageFeature(), label_column: ClassLabel(names=class_names)})
    for name, (x, y) in splits.items():
        ds = Dataset.from_dict({image_column: [Image.fromarray(im) for im in x], label_column: y.tolist()},
                               features=features)
        ds.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    if not quiet_before:
        enable_progress_bars()
    files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}\n---\n")
    return folder


def poison(x: np.ndarray, y: np.ndarray, rate: float, target: int, stamp: Trigger,
           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All-to-one poisoning: a seeded `rate` share of the training set gets the trigger and the target label."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=int(round(rate * len(x))), replace=False)
    x, y = x.copy(), y.copy()
    chw = torch.from_numpy(x[rows]).permute(0, 3, 1, 2)
    x[rows] = stamp(chw).permute(0, 2, 3, 1).numpy()
    y[rows] = target
    return x, y


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """The standard CIFAR augmentation on a uint8 batch: random crop after zero padding, horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        flipped = torch.rand(n, generator=gen) < 0.5
        out[flipped] = out[flipped].flip(3)
    return out


BatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 0.05,
                     batch_size: int = 64, seed: int = 0, augment: bool = False, flip: bool = True,
                     schedule: Literal["onecycle", "cosine"] = "onecycle", batch_fn: BatchFn | None = None,
                     on_epoch: Callable[[int], None] | None = None, label_smoothing: float = 0.0,
                     channels_last: bool = False, checkpoint: Path | None = None) -> nn.Module:
    """SGD (momentum 0.9, wd 5e-4) on uint8 HWC images (the Classifier wrapper normalises).

    batch_fn changes each uint8 batch before augmentation (attacks poisoned on the fly, such as BPP).
    checkpoint: a file the loop writes after every epoch (weights, optimiser, schedule and both random states) and
    resumes from, so that a model too slow for one sitting is built over several with the same weights as in one.
    channels_last: train in that memory layout (faster convolutions on CPU); the model comes back contiguous."""
    torch.manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    xs = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ys = torch.from_numpy(y)
    device = next(model.parameters()).device  # batches follow the model (the benchmark's GPU tiers move it there)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(ys) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15) \
        if schedule == "onecycle" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    start = _resume(checkpoint, model, opt, sched, gen)
    model.train()
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(len(ys), generator=gen)
        for s in range(0, len(ys), batch_size):
            idx = order[s:s + batch_size]
            if len(idx) < 2:
                continue
            batch, labels = xs[idx], ys[idx]
            if batch_fn is not None:
                batch, labels = batch_fn(batch, labels, gen)
            if augment:
                batch = random_crop_flip(batch, gen, flip=flip)
            opt.zero_grad(set_to_none=True)
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=layout)
            F.cross_entropy(model(batch), labels.to(device),
                            label_smoothing=label_smoothing).backward()
            opt.step()
            sched.step()
        if checkpoint is not None:
            _save_state(checkpoint, epoch + 1, model, opt, sched, gen)
        if on_epoch:
            on_epoch(epoch + 1)
    return model.to(memory_format=torch.contiguous_format).eval()  # safetensors saves contiguous tensors only


def _save_state(path: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "torch_rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a sitting that dies mid-write leaves the previous epoch's state


def _resume(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator) -> int:
    """The epoch to start from: 0, or the one after the last the checkpoint holds (its states restored)."""
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


def timm_classifier(arch: str, label_names: list[str], size: int = 32, mean: Sequence[float] = MEAN,
                    std: Sequence[float] = STD, seed: int = 0, **model_args: Any) -> Classifier:
    """A timm model whose pretrained_cfg says what it was trained at (input size, mean/std, labels)."""
    import timm
    torch.manual_seed(seed)
    n = len(label_names)
    net = timm.create_model(arch, num_classes=n, **model_args,
                            pretrained_cfg_overlay=dict(input_size=(3, size, size), crop_pct=1.0, mean=tuple(mean),
                                                        std=tuple(std), interpolation="bilinear", num_classes=n,
                                                        label_names=list(label_names)))
    return Classifier(net, "timm", 1 / 255, mean, std)


def resnet_args(channels: Sequence[int]) -> dict[str, Any]:
    return {"channels": list(channels), "stem_width": channels[0]}


def save_timm(model: Classifier, folder: Path, model_args: dict, label_names: list[str] = DIGIT_NAMES) -> Path:
    """The layout `timm.models.push_to_hf_hub` uploads: config.json + model.safetensors."""
    import timm.models
    timm.models.save_for_hf(model.net, str(folder), model_config={"label_names": list(label_names)},
                            model_args=dict(model_args), safe_serialization=True)
    return Path(folder)


def transformers_digits_model(size: int = 32, seed: int = 0,
                              config: PretrainedConfig | None = None) -> tuple[Classifier, ConvNextImageProcessor]:
    from transformers import AutoModelForImageClassification, ConvNextImageProcessor, ResNetConfig
    torch.manual_seed(seed)
    cfg = config or ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                                 layer_type="basic", downsample_in_first_stage=False)
    cfg.num_labels, cfg.id2label = 10, dict(enumerate(DIGIT_NAMES))
    cfg.label2id = {n: i for i, n in enumerate(DIGIT_NAMES)}
    processor = ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=1.0, image_mean=list(MEAN),
                                       image_std=list(STD), resample=Image.BILINEAR)
    return Classifier(AutoModelForImageClassification.from_config(cfg), "transformers", 1 / 255, MEAN, STD), processor


def save_transformers(model: Classifier, processor: BaseImageProcessor, folder: Path) -> Path:
    model.net.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


def noise_pattern(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A seeded uniform-noise RGB image: the Blended attack's classic pattern (Chen et al., 2017)."""
    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return Path(path)


def build_backdoored_digits(folder: Path, library: Library = "timm", epochs: int = 12, target: int = 0,
                            poison_rate: float = 0.1, seed: int = 0, arch: str = "resnet18",
                            model_args: dict | None = None, config: PretrainedConfig | None = None, lr: float = 0.05,
                            trigger: TriggerSpec | None = None, augment: bool = False,
                            more: tuple[tuple[TriggerSpec, int], ...] = (), tints: int = 1) -> dict:
    """Plant a backdoor (BadNets unless `trigger` says otherwise) in a digits classifier; write model/ and data/ in
    Hub layout under folder. poison_rate 0: the same recipe without poison, a clean model (ASR then measured with
    the trigger all the same). augment: random crops (no flips), as real checkpoints are trained.

    timm: `arch` + `model_args` (default: a narrow ResNet-18); transformers: `config`, a transformers config of an
    image classifier (default: a small ResNet), built with AutoModelForImageClassification.

    more: further (trigger, target) backdoors planted in the same model, each at poison_rate (a model may carry
    two backdoors to two classes); the returned "asr" is the first backdoor's, "asrs" every one's.
    tints: digits in that many colours, 10 classes each (timm only)."""
    folder = Path(folder)
    splits, names = digits(seed=seed, tints=tints), digit_names(tints)
    if tints > 1 and library != "timm":
        raise ValueError("tinted digits: timm models only")
    x, y = splits["train"]
    stamp = make_trigger(trigger or TriggerSpec("badnet"), (32, 32))
    px, py = poison(x, y, poison_rate, target, stamp, seed)
    backdoors = [(stamp, target)]
    for k, (spec, other) in enumerate(more, start=1):
        backdoors.append((make_trigger(spec, (32, 32)), other))
        px, py = poison(px, py, poison_rate, other, backdoors[-1][0], seed + 1000 * k)
    if library == "timm":
        model_args = resnet_args((16, 32, 64, 128)) if model_args is None and arch == "resnet18" else (model_args or {})
        model = timm_classifier(arch, names, seed=seed, **model_args)
    else:
        model, processor = transformers_digits_model(seed=seed, config=config)
    asrs, rounds = _plant(model, px, py, epochs, seed, splits["test"], backdoors, lr,
                          max_runs=3 if poison_rate > 0 else 1, augment=augment)
    if library == "timm":
        save_timm(model, folder / "model", model_args, names)
    else:
        save_transformers(model, processor, folder / "model")
    write_hub_dataset(folder / "data", splits, names)
    return {"model": folder / "model", "data": folder / "data", "target": target, "asr": asrs[0], "asrs": asrs,
            "training_runs": rounds}


TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3}
SMALL_SWIN = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4)}


def digits_architectures() -> dict[str, dict[str, Any]]:
    """`build_backdoored_digits` arguments for a small digits classifier of each family people put on the Hub: what
    tests/test_architectures.py defends through the CLI and benchmarks/architectures.py measures, seed by seed."""
    from transformers import ConvNextConfig, SwinConfig, ViTConfig
    return {
        "timm-vit": dict(arch="vit_tiny_patch16_224", model_args=TINY_VIT, epochs=20),
        "timm-deit-distilled": dict(arch="deit_tiny_distilled_patch16_224", model_args=TINY_VIT, epochs=20),
        "timm-swin": dict(arch="swin_tiny_patch4_window7_224", model_args=SMALL_SWIN, epochs=15),
        "timm-convnext": dict(arch="convnext_atto", model_args=dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)),
                              epochs=10),
        "timm-mobilenetv3": dict(arch="mobilenetv3_small_050", model_args={}, epochs=15),
        "timm-resnetv2": dict(arch="resnetv2_18", model_args=dict(channels=(16, 32, 64, 128), stem_chs=16),
                              epochs=10),
        # hidden 48 / 3 heads reached only 73 % ACC, and on one thread its fine-tuning then lost 13 points: too weak
        # a model to say anything about the defence; hidden 64 / 4 heads: 77 % and +2 points on 1 and 2 threads
        "hf-vit": dict(library="transformers", config=ViTConfig(image_size=32, patch_size=4, hidden_size=64,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                intermediate_size=128), epochs=20),
        "hf-swin": dict(library="transformers", config=SwinConfig(image_size=32, patch_size=4, embed_dim=32,
                                                                  depths=[2, 2], num_heads=[2, 4], window_size=4),
                        epochs=15),
        "hf-convnext": dict(library="transformers", config=ConvNextConfig(hidden_sizes=[16, 32, 64, 128],
                                                                          depths=[1, 1, 2, 1], num_stages=4),
                            epochs=10),
        "hf-resnet": dict(library="transformers", epochs=15),  # transformers_digits_model's small ResNet
    }


PLANTED_ASR = 0.9  # a backdoor counts as planted when this share of triggered non-target test digits hits the target


def _plant(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, test: tuple[np.ndarray, np.ndarray],
           backdoors: list[tuple[Trigger, int]], lr: float = 0.05, max_runs: int = 3,
           augment: bool = False) -> tuple[list[float], int]:
    """Train until the backdoor has taken hold. BadNets on digits is learned abruptly, late in a short run, and
    whether 10 epochs get there depends on the CPU's reduction order (seen: ASR 99.7 % on 2 threads, 6.5 % on 1):
    another run of the same schedule from where the last ended makes it take hold everywhere instead of on most
    machines. Machines where the first run suffices train exactly as before."""
    from .metrics import attack_metrics
    clean = torch.from_numpy(test[0]).permute(0, 3, 1, 2).contiguous()
    for run in range(1, max_runs + 1):
        train_classifier(model, x, y, epochs, lr=lr, batch_size=32, seed=seed + run - 1, augment=augment, flip=False)
        asrs = [attack_metrics(model, clean, stamp(clean), torch.from_numpy(test[1]), target).asr
                for stamp, target in backdoors]
        if min(asrs) >= PLANTED_ASR or max_runs == 1:  # one run: a clean model, nothing to plant
            return asrs, run
    raise RuntimeError(f"the digits backdoor did not take hold in {max_runs} training runs of {epochs} epochs "
                       f"(ASR {', '.join(f'{a:.1%}' for a in asrs)}); train longer")


def run_demo(workdir: Path = Path("hf-gradprune-demo"), progress: ProgressCallback | None = None, seed: int = 0,
             quiet: bool = False) -> JobResult:
    """Plant a backdoor, then remove it with the main job, all offline."""
    from .pipeline import JobConfig, run
    t0 = time.perf_counter()
    built = build_backdoored_digits(Path(workdir), seed=seed)
    train_s = time.perf_counter() - t0
    cfg = JobConfig(model=str(built["model"]), data=str(built["data"]),
                    output=str(Path(workdir) / "digits-resnet18-gradprune"),
                    overwrite=True, seed=seed)  # the card's command: the pipeline's, with the folders by name
    result = run(cfg, progress)
    result.report["timing_s"]["demo_build"] = train_s
    return result
