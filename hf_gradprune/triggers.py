"""Triggers the defender can stamp on clean images.

All triggers work in pixel space: uint8 tensors of shape (N, 3, H, W) at the model's input size, before
normalisation, so a trigger means the same thing whatever the model's mean/std are. Casts back to uint8
truncate, as BackdoorBench's ``astype(np.uint8)`` does, so our triggered pixels match the attacks it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError
from .names import file_label, file_ref

Trigger = Callable[[torch.Tensor], torch.Tensor]
TriggerKind = Literal["badnet", "patch", "blended", "bpp", "additive"]
TRIGGER_KINDS: tuple[TriggerKind, ...] = get_args(TriggerKind)
Unknown = Literal["unknown"]
UNKNOWN: Unknown = "unknown"  # --trigger unknown: synthesised from the few-shot images (synth.py)


@dataclass
class TriggerSpec:
    kind: TriggerKind | Unknown = "badnet"
    image: str | None = None  # patch / blended: an image file; additive: a .npy perturbation in pixel units
    mask: str | None = None  # patch: mask image, 255 = trigger pixel
    alpha: float = 0.2  # blended: x' = (1 - alpha) x + alpha t
    bpp_levels: int = 8  # bpp: colour levels per channel

    def describe(self) -> str:
        """For the card and report: trigger files by name and sha256, never by where they are on this machine."""
        if self.kind == UNKNOWN:
            return "unknown: synthesised from the few-shot images"
        if self.kind == "badnet":
            return "BadNets: white square patch at the bottom-right corner (3x3 at 32x32, scaled)"
        if self.kind == "patch":
            return f"patch: {file_label(self.image)} through mask {file_label(self.mask)}"
        if self.kind == "blended":
            return f"blended: {file_label(self.image)} at alpha {self.alpha}"
        if self.kind == "bpp":
            return f"BPP: colour depth squeezed to {self.bpp_levels} levels per channel"
        return f"additive perturbation {file_label(self.image)}"

    def published(self) -> dict:
        """The spec as the report publishes it: each file by name and sha256 (see names.py)."""
        return {**asdict(self), **{key: file_ref(path) for key, path in (("image", self.image), ("mask", self.mask))
                                   if path}}


def _truncate(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 255).to(torch.uint8)


def badnet_patch_size(size: tuple[int, int]) -> int:
    """BackdoorBench's 3x3 patch at 32x32, scaled with the input (7x7 at 224)."""
    return max(1, round(3 * min(size) / 32))


def _read_image(path: str, size: tuple[int, int], flag: str, mode: str, resample: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(mode).resize((size[1], size[0]), resample)
            return np.asarray(img)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot read it as an image ({e.__class__.__name__}); "
                        "give a PNG or JPEG file") from None


def _read_perturbation(path: str, size: tuple[int, int]) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--trigger-image {path}: cannot read it as a .npy array ({e.__class__.__name__}); "
                        "save it with numpy.save") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise UserError(f"--trigger-image {path}: shape {tuple(np.load(path, allow_pickle=False).shape)} is not an "
                        "image perturbation; give (H, W), (H, W, 3) or (3, H, W) in pixel units")
    if not np.isfinite(arr).all():
        raise UserError(f"--trigger-image {path}: the perturbation has NaN or infinite values")
    pert = torch.from_numpy(arr).expand(3, -1, -1)
    if tuple(pert.shape[1:]) != tuple(size):
        pert = F.interpolate(pert[None], size=size, mode="bilinear", align_corners=False)[0]
    return pert.contiguous()


def make_trigger(spec: TriggerSpec, size: tuple[int, int]) -> Trigger:
    """Build the stamping function for images of ``size`` (H, W); trigger files are resized to it."""
    kind = spec.kind
    if kind == UNKNOWN:
        raise UserError("--trigger unknown has no stamp to make; the scan synthesises one (use --blind with a real "
                        "trigger to measure against it)")
    if kind not in TRIGGER_KINDS:
        raise UserError(f"--trigger {kind}: unknown trigger; use one of {', '.join(TRIGGER_KINDS)}")
    needs_image = kind in ("patch", "blended", "additive")
    if needs_image and not spec.image:
        raise UserError(f"--trigger {kind} needs --trigger-image FILE")
    if needs_image and not Path(spec.image).is_file():
        raise UserError(f"--trigger-image {spec.image}: no such file")

    if kind == "badnet":
        s = badnet_patch_size(size)

        def stamp(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[..., -s:, -s:] = 255
            return x
        return stamp

    if kind == "patch":
        if not spec.mask or not Path(spec.mask).is_file():
            raise UserError(f"--trigger patch needs --trigger-mask FILE (255 = trigger pixel); got {spec.mask!r}")
        pattern = torch.from_numpy(
            _read_image(spec.image, size, "--trigger-image", "RGB", Image.BILINEAR).copy()).permute(2, 0, 1).float()
        mask = torch.from_numpy(
            _read_image(spec.mask, size, "--trigger-mask", "L", Image.NEAREST).copy()).float()[None] / 255.0
        if mask.max() == 0:
            raise UserError(f"--trigger-mask {spec.mask}: the mask is all zero, so the patch changes nothing; "
                            "mark trigger pixels with 255")
        return lambda x: _truncate(mask * pattern + (1 - mask) * x.float())

    if kind == "blended":
        if not 0 < spec.alpha <= 1:
            raise UserError(f"--alpha {spec.alpha}: the blend ratio must be in (0, 1]")
        pattern = torch.from_numpy(
            _read_image(spec.image, size, "--trigger-image", "RGB", Image.BILINEAR).copy()).permute(2, 0, 1).float()
        a = spec.alpha
        return lambda x: _truncate((1 - a) * x.float() + a * pattern)

    if kind == "bpp":
        levels = spec.bpp_levels
        if not 2 <= levels <= 255:
            raise UserError(f"--bpp-levels {levels}: must be between 2 and 255")
        return lambda x: _truncate(torch.round(torch.round(x.float() / 255 * (levels - 1)) / (levels - 1) * 255))

    pert = _read_perturbation(spec.image, size)
    return lambda x: _truncate(x.float() + pert)
