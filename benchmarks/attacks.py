"""The paper's four attacks, all-to-one, built on hf_gradprune.triggers (one implementation of each trigger).

Each attack gives (a) the TriggerSpec the defender stamps, which is exactly the attacker's trigger, and (b) how
the attacker poisons training data: statically before augmentation (BadNets, Blended, LF) or per batch with
BPP's negative samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_gradprune.triggers import TriggerSpec, make_trigger

ATTACKS = ("badnet", "blended", "lf", "bpp")
LF_AMPLITUDE = 24.0  # pixel units: large enough to change most uint8 pixels (checked below)


def blended_image(folder: Path, size: int = 32) -> Path:
    """A fixed natural image shipped inside scikit-learn (flower.jpg), resized to the input size."""
    from sklearn.datasets import load_sample_image
    path = folder / f"blended_flower_{size}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_sample_image("flower.jpg")).resize((size, size), Image.BILINEAR).save(path)
    return path


def lf_pattern(folder: Path, size: int = 32, seed: int = 0) -> Path:
    """A seeded smooth low-frequency additive pattern: 4x4 Gaussian noise upsampled bicubically, scaled to
    +-LF_AMPLITUDE pixel levels."""
    path = folder / f"lf_{size}_seed{seed}.npy"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.randn(1, 3, 4, 4, generator=gen)
        smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
        smooth = smooth / smooth.abs().max() * LF_AMPLITUDE
        np.save(path, smooth.permute(1, 2, 0).numpy().astype(np.float32))
    return path


def trigger_spec(attack: str, folder: Path, size: int = 32) -> TriggerSpec:
    if attack == "badnet":
        return TriggerSpec("badnet")
    if attack == "blended":
        return TriggerSpec("blended", image=str(blended_image(folder, size)), alpha=0.2)
    if attack == "lf":
        return TriggerSpec("additive", image=str(lf_pattern(folder, size)))
    if attack == "bpp":
        return TriggerSpec("bpp", bpp_levels=8)
    raise ValueError(attack)


def changed_pixel_share(attack: str, folder: Path, images: np.ndarray) -> float:
    """Share of uint8 pixel values the trigger changes (BackdoorBench's LF for some models changes none)."""
    x = torch.from_numpy(images[:256]).permute(0, 3, 1, 2)
    y = make_trigger(trigger_spec(attack, folder, x.shape[-1]), tuple(x.shape[-2:]))(x)
    return float((y != x).float().mean())


@dataclass
class BppPoisoner:
    """BPP, poisoned on the fly per batch as in BackdoorBench: a `rate` share of each batch is squeezed and sent
    to the target; a `neg_rate` share gets the quantisation residual of another training image added (negative
    samples, true labels), so the model learns the squeeze itself, not any small perturbation."""
    residuals: torch.Tensor  # (N, 3, H, W) float: squeeze(x) - x over the training set
    squeeze: Callable[[torch.Tensor], torch.Tensor]  # the BPP trigger at the images' size, built once
    target: int
    rate: float = 0.1
    neg_rate: float = 0.2

    @classmethod
    def from_images(cls, images: np.ndarray, target: int, levels: int = 8, **kw) -> BppPoisoner:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        squeeze = make_trigger(TriggerSpec("bpp", bpp_levels=levels), tuple(x.shape[-2:]))
        res = torch.cat([squeeze(x[i:i + 4096]).float() - x[i:i + 4096].float() for i in range(0, len(x), 4096)])
        return cls(res.to(torch.float16), squeeze, target, **kw)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(y)
        n_bd, n_neg = int(n * self.rate), int(n * self.neg_rate)
        x, y = x.clone(), y.clone()
        x[:n_bd] = self.squeeze(x[:n_bd])
        y[:n_bd] = self.target
        pick = torch.randint(0, len(self.residuals), (n_neg,), generator=gen)
        neg = x[n_bd:n_bd + n_neg].float() + self.residuals[pick].float()
        x[n_bd:n_bd + n_neg] = neg.clamp(0, 255).to(torch.uint8)
        return x, y
