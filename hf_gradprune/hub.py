"""Adapters for timm and transformers checkpoints: resolve, load, save in the same layout, push.

A Hub id and a local folder take the same path: a Hub id is first downloaded with ``snapshot_download``
(only safe files unless pickle is allowed), then loaded from that folder exactly like a local one.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .errors import UserError
from .names import HUB_ID

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model.pth", "model.pth")
LOCAL_FILE = "gradprune_local.json"  # this machine's paths, for reruns here: never uploaded (push_folder skips it)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack")
Library = Literal["timm", "transformers"]  # the checkpoint layouts this module loads and saves


class Classifier(nn.Module):
    """uint8 pixels (N, 3, H, W) in, logits out: normalisation runs on the device, inside the model."""

    def __init__(self, net: nn.Module, library: Library, scale: float, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.library = library
        self.register_buffer("scale_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / scale,
                             persistent=False)
        self.register_buffer("scale_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) / scale,
                             persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.scale_mean) / self.scale_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalise(x)
        if self.library == "transformers":
            return self.net(pixel_values=x).logits
        return self.net(x)


@dataclass
class LoadedModel:
    model: Classifier
    library: Library
    source: str  # what the user gave: Hub id or folder
    revision: str | None  # resolved commit for Hub ids
    local_dir: Path
    input_size: tuple[int, int]
    num_classes: int
    label_names: list[str] | None
    to_pixels: Callable[[list[Image.Image]], np.ndarray]  # PIL images -> uint8 (N, 3, H, W), the model's resize/crop
    preprocessing: dict  # what the model's own config says, for the report

    @property
    def net(self) -> nn.Module:
        return self.model.net


def resolve_source(source: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    """A local folder as is, or a Hub snapshot (safe files only unless pickle is allowed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise UserError(f"--revision {revision}: only applies to Hub ids, but MODEL {source} is a local folder")
        return path, None
    if path.exists() or not HUB_ID.match(source):
        raise UserError(f"MODEL {source}: not a folder and not a Hub id; give org/name or a folder with config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    patterns = ["*.json", "*.safetensors", "*.txt", "*.md"] + (["*.bin", "*.pth"] if allow_pickle else [])
    try:
        local = Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(f"MODEL {source}: the repo is gated; "
                        "accept its terms on the Hub and log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise UserError(f"--revision {revision}: not found in {source}; "
                        "give a branch, tag or commit of that repo") from None
    except RepositoryNotFoundError:
        raise UserError(f"MODEL {source}: no such model on the Hub (or it is private); "
                        "check the id or log in") from None
    except LocalEntryNotFoundError:
        raise UserError(f"MODEL {source}: not in the local cache and the Hub cannot be reached; "
                        "check the id and your network (or unset HF_HUB_OFFLINE)") from None
    return local, local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else revision


def _read_config(local: Path, source: str) -> dict:
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"MODEL {source}: no config.json, so it is not a timm or transformers checkpoint")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"MODEL {source}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None


def detect_library(cfg: dict, source: str) -> Library:
    if "architecture" in cfg:
        return "timm"
    if "model_type" in cfg:
        return "transformers"
    raise UserError(f"MODEL {source}: config.json has neither 'architecture' (timm) nor 'model_type' (transformers)")


def _check_weights(local: Path, source: str, allow_pickle: bool) -> None:
    if any((local / f).is_file() for f in SAFE_WEIGHTS):
        return
    pickles = [f for f in PICKLE_WEIGHTS if (local / f).is_file()]
    if pickles and not allow_pickle:
        raise UserError(f"MODEL {source}: only pickle weights ({pickles[0]}), which can run code when loaded; "
                        "convert them to model.safetensors or pass --allow-pickle if you trust the source")
    if not pickles:
        raise UserError(f"MODEL {source}: no model.safetensors (or pytorch_model.bin) next to config.json")


def load_model(source: str, revision: str | None = None, allow_pickle: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    local, resolved = resolve_source(source, revision, allow_pickle)
    cfg = _read_config(local, source)
    library = detect_library(cfg, source)
    _check_weights(local, source, allow_pickle)
    loader = _load_timm if library == "timm" else _load_transformers
    return loader(local, cfg, source, resolved, allow_pickle, trust_remote_code)


def timm_preprocessing(net: nn.Module) -> tuple[dict, Callable[[list[Image.Image]], np.ndarray]]:
    """A timm model's data config and its evaluation transform as PIL images -> uint8 (N, 3, H, W): the resize and
    crop its pretrained_cfg asks for, no normalisation (the Classifier wrapper normalises)."""
    from timm.data import create_transform, resolve_data_config
    data_cfg = resolve_data_config({}, model=net)
    transform = create_transform(**data_cfg, is_training=False, use_prefetcher=True)  # uint8 CHW

    def to_pixels(images: list[Image.Image]) -> np.ndarray:
        return np.stack([np.asarray(transform(img.convert("RGB")), dtype=np.uint8) for img in images])
    return data_cfg, to_pixels


def _load_timm(local: Path, cfg: dict, source: str, revision: str | None, allow_pickle: bool,
               trust_remote_code: bool) -> LoadedModel:
    import timm
    try:
        net = timm.create_model(f"local-dir:{local}", pretrained=False)
    except RuntimeError as e:
        raise UserError(f"MODEL {source}: timm cannot build architecture {cfg.get('architecture')!r} ({e}); "
                        "upgrade timm or check config.json") from None
    state = _read_state_dict(local, source, allow_pickle)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"MODEL {source}: weights do not match architecture {cfg['architecture']!r} "
                        f"({str(e).splitlines()[0]})") from None
    data_cfg, to_pixels = timm_preprocessing(net)
    model = Classifier(net.eval(), "timm", 1 / 255, data_cfg["mean"], data_cfg["std"])
    names = cfg.get("label_names") or (cfg.get("pretrained_cfg") or {}).get("label_names")
    preprocessing = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                     if k in data_cfg}
    return LoadedModel(model, "timm", source, revision, local, tuple(data_cfg["input_size"][1:]), net.num_classes,
                       list(names) if names else None, to_pixels, preprocessing)


def _read_state_dict(local: Path, source: str, allow_pickle: bool) -> dict:
    from safetensors.torch import load_file
    if (local / "model.safetensors").is_file():
        return load_file(local / "model.safetensors")
    for name in PICKLE_WEIGHTS:
        if (local / name).is_file() and allow_pickle:
            state = torch.load(local / name, map_location="cpu", weights_only=True)
            return state.get("state_dict", state) if isinstance(state, dict) else state
    raise UserError(f"MODEL {source}: no loadable weights file")


def _load_transformers(local: Path, cfg: dict, source: str, revision: str | None, allow_pickle: bool,
                       trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if cfg.get("auto_map") and not trust_remote_code:
        raise UserError(f"MODEL {source}: needs its own Python code from the repo (auto_map in config.json); "
                        "pass --trust-remote-code only if you trust it")
    kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    try:
        net = AutoModelForImageClassification.from_pretrained(local, **kwargs)
    except ValueError as e:
        raise UserError(f"MODEL {source}: transformers cannot load it as an image classifier "
                        f"({str(e).splitlines()[0][:200]})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(local, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"MODEL {source}: no usable preprocessor_config.json ({str(e).splitlines()[0][:160]}); "
                        "save the image processor with the model") from None

    def to_pixels(images: list[Image.Image]) -> np.ndarray:
        out = processor([img.convert("RGB") for img in images], do_rescale=False, do_normalize=False,
                        return_tensors="np")
        if "pixel_values" not in out:
            raise UserError(f"MODEL {source}: its image processor gives {list(out)}, not pixel_values; "
                            "only pixel-input image classifiers are supported")
        return np.clip(np.round(np.asarray(out["pixel_values"], dtype=np.float32)), 0, 255).astype(np.uint8)

    scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
    normalize = getattr(processor, "do_normalize", True)
    mean = processor.image_mean if normalize else [0.0, 0.0, 0.0]
    std = processor.image_std if normalize else [1.0, 1.0, 1.0]
    size = tuple(to_pixels([Image.new("RGB", (64, 64))]).shape[-2:])
    model = Classifier(net.eval(), "transformers", scale, mean, std)
    id2label = net.config.id2label or {}
    names = [id2label[i] for i in range(net.config.num_labels)] if len(id2label) == net.config.num_labels else None
    preprocessing = {"processor": type(processor).__name__, "input_size": [3, *size], "mean": list(mean),
                     "std": list(std), "rescale_factor": scale}
    return LoadedModel(model, "transformers", source, revision, local, size, net.config.num_labels, names, to_pixels,
                       preprocessing)


def save_model(loaded: LoadedModel, out_dir: Path) -> list[str]:
    """Write the sanitised weights in the input's layout; every other file of the source is copied verbatim.

    config.json is the source's own bytes, so the output reloads with the same one line and the same config.
    Weights are always written as safetensors (also when the source was pickle)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(loaded.local_dir.iterdir()):
        if f.is_file() and f.name != "README.md" and not f.name.startswith(".") \
                and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, out_dir / f.name)
    if loaded.library == "transformers":
        loaded.net.save_pretrained(out_dir, safe_serialization=True)
        shutil.copy2(loaded.local_dir / "config.json", out_dir / "config.json")
    else:
        from safetensors.torch import save_file
        state = {k: v.detach().cpu().contiguous() for k, v in loaded.net.state_dict().items()}
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    return sorted(p.name for p in out_dir.iterdir())


def source_card_license(loaded: LoadedModel) -> str | None:
    readme = loaded.local_dir / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed source card must not stop the defence
        return None


def default_repo_id(name: str, token: str | None) -> str:
    """<user>/<name>, where name is '<model-name>-<method>' (e.g. resnet18-gradprune)."""
    from huggingface_hub import HfApi
    user = HfApi(token=token).whoami()["name"]
    return f"{user}/{name}"


class PushFailed(Exception):
    """An upload that did not complete; `revision` is the PR ref already opened, to retry into."""

    def __init__(self, cause: BaseException, revision: str | None) -> None:
        super().__init__(str(cause))
        self.cause, self.revision = cause, revision


def failure_reason(e: BaseException, token: str | None) -> str:
    """'ErrorType: first line' of a failed upload, for one-line messages; the token never appears in it."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {(reason.replace(token, '***') if token else reason)[:300]}"


def push_folder(folder: Path, repo_id: str, token: str | None = None, private: bool = False,
                create_pr: bool = False, revision: str | None = None,
                commit_message: str = "Upload model sanitised by hf-gradprune") -> str:
    """Create the repo if needed and upload the folder, less the local-only LOCAL_FILE, as one commit; returns the
    commit or PR URL.

    With create_pr the PR is opened first, so a failed upload can be retried into the same PR (its ref is in
    PushFailed.revision) instead of leaving an empty draft behind."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    pr_url = None
    try:
        # private=None keeps an organisation's default visibility for new repos
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if create_pr and revision is None:
            pr = api.create_pull_request(repo_id, title=commit_message, repo_type="model",
                                         description="Backdoor removed with hf-gradprune; metrics in the model card.")
            revision, pr_url = pr.git_reference, pr.url
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message, ignore_patterns=[LOCAL_FILE])
    except Exception as e:
        raise PushFailed(e, revision) from e
    if revision and revision.startswith("refs/pr/") and pr_url is None:
        pr_url = f"https://huggingface.co/{repo_id}/discussions/{revision.rsplit('/', 1)[-1]}"
    return str(pr_url or getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
