"""Parameter slices a defence has zeroed, kept at zero through fine-tuning and undone exactly when a step is rolled
back."""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelMask:
    """Zeroes `param[..., index, ...]` along `dim` (e.g. dim 1 of a classifier weight = one input channel) and keeps
    the original values, so a threshold sweep can undo its last steps without copying the model."""

    def __init__(self) -> None:
        self.slices: list[tuple[nn.Parameter, int, int, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.slices)

    @torch.no_grad()
    def zero(self, param: nn.Parameter, dim: int, index: int) -> None:
        view = param.data.select(dim, index)
        self.slices.append((param, dim, index, view.clone()))
        view.zero_()

    @torch.no_grad()
    def undo_to(self, count: int) -> None:
        while len(self.slices) > count:
            param, dim, index, original = self.slices.pop()
            param.data.select(dim, index).copy_(original)

    @torch.no_grad()
    def reapply(self) -> None:
        for param, dim, index, _ in self.slices:
            param.data.select(dim, index).zero_()
