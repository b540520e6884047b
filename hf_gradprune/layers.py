"""Find the layers a defence works on, for any timm or transformers CNN, from the libraries' own metadata and
from the forward pass, never from a hand-copied architecture."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .errors import UserError
from .hub import LoadedModel

if TYPE_CHECKING:
    from .methods import Method


def classifier_layer(loaded: LoadedModel) -> tuple[str, nn.Module]:
    """The layer that maps features to logits: timm's `get_classifier()`, else the last Linear (or 1x1 conv) with
    one output per class. Its weight's dim 1 indexes the feature channels that feed it."""
    net = loaded.net
    names = {id(m): n for n, m in net.named_modules()}
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not _is_head(head, loaded.num_classes):
        head = next((m for m in reversed(list(net.modules())) if _is_head(m, loaded.num_classes)), None)
    if head is None:
        raise UserError(f"MODEL {loaded.source}: no Linear or 1x1 conv classifier with {loaded.num_classes} outputs, "
                        "so there are no feature channels feeding the classifier to prune (--method fp)")
    return names[id(head)], head


def _is_head(m: nn.Module | None, num_classes: int) -> bool:
    if isinstance(m, nn.Linear):
        return m.out_features == num_classes
    return isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1) and m.groups == 1


@torch.no_grad()
def classifier_input_means(model: nn.Module, head: nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean activation of each feature channel entering the classifier, over the given (clean) images."""
    total = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0]
        total.append((x.flatten(2).mean(2) if x.dim() == 4 else x).sum(0))
    h = head.register_forward_pre_hook(hook)
    model.eval()
    try:
        for s in range(0, len(pixels), batch_size):
            model(pixels[s:s + batch_size])
    finally:
        h.remove()
    return torch.stack(total).sum(0) / len(pixels)


def stage_outputs(loaded: LoadedModel, count: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """A forward that also returns the outputs of the last `count` stages (NAD's attention points): timm's
    `feature_info` modules, transformers' `output_hidden_states`."""
    model, net = loaded.model, loaded.net
    if loaded.library == "transformers":
        def forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            out = net(pixel_values=model.normalise(x), output_hidden_states=True)
            stages = [h for h in (out.hidden_states or ()) if h.dim() in (3, 4)]
            if len(stages) < count:
                raise UserError(f"MODEL {loaded.source}: gives {len(stages)} stage outputs, NAD needs {count}")
            return out.logits, stages[-count:]
        return forward
    info = getattr(net, "feature_info", None)
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else info
    modules = dict(net.named_modules())
    names = [d["module"] for d in dicts or [] if d.get("module") in modules]
    if len(names) < count:
        raise UserError(f"MODEL {loaded.source}: timm lists {len(names)} stage outputs (feature_info), "
                        f"NAD needs {count}")
    names = names[-count:]

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats: list[torch.Tensor] = []
        channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"  # timm Swin's stages are (N, H, W, C)
        def keep(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            feats.append(out.permute(0, 3, 1, 2) if channels_last and out.dim() == 4 else out)
        handles = [modules[n].register_forward_hook(keep) for n in names]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        return logits, feats
    return forward


def needs_batch_norms(loaded: LoadedModel, method: Method, what: str) -> UserError:
    """The one-line refusal of a method that works on batch-norm channels, naming the methods that do not need them."""
    return UserError(f"MODEL {loaded.source}: {what}, which --method {method} works on; "
                     "methods for this model: gradprune, ft, fp, nad, ftsam")


def batch_norms(loaded: LoadedModel, method: Method) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    norms = [(n, m) for n, m in loaded.net.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if not norms:
        raise needs_batch_norms(loaded, method, "has no affine BatchNorm layers")
    return norms
