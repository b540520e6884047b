"""ACC, ASR and RA, measured the same way before and after the defence, on the same images.

ACC: accuracy on the clean test set. ASR: share of triggered test images whose true class is not the target
that the model sends to the target. RA: share of those same images classified as their true class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .parallel import SINGLE, Procs


@dataclass
class AttackMetrics:
    acc: float
    asr: float
    ra: float
    n_clean: int
    n_triggered: int  # triggered non-target images behind ASR and RA

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict(model: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(pixels[s:s + batch_size]).argmax(1) for s in range(0, len(pixels), batch_size)]) \
        if len(pixels) else torch.zeros(0, dtype=torch.long, device=pixels.device)


@torch.no_grad()
def attack_metrics(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor,
                   target: int, batch_size: int = 256, procs: Procs = SINGLE) -> AttackMetrics:
    """Each process counts its chunks of the test set; the counts are summed (every image counted exactly once).
    The test set may sit in host memory: only one chunk at a time goes to the model's device."""
    model.eval()
    device = next(model.parameters()).device

    def chunk(start: int, end: int) -> torch.Tensor:
        y = labels[start:end].to(device)
        keep = y != target
        trig_pred = model(triggered[start:end].to(device)[keep]).argmax(1) if keep.any() else y[keep]
        return torch.stack([(model(clean[start:end].to(device)).argmax(1) == y).sum(), (trig_pred == target).sum(),
                            (trig_pred == y[keep]).sum()])
    correct, hits, robust = (int(v) for v in procs.chunk_sums(len(labels), batch_size, 3, chunk))  # one host sync
    n = int((labels != target).sum())
    acc, asr, ra = correct / max(1, len(labels)), hits / max(1, n), robust / max(1, n)
    return AttackMetrics(acc, asr, ra, len(labels), n)


def pick_target(triggered_pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> int:
    """The class that most triggered images of OTHER classes are sent to (ties go to the lower index)."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    for c in range(num_classes):
        counts[c] = ((triggered_pred.cpu() == c) & (labels.cpu() != c)).sum()
    return int(counts.argmax())
