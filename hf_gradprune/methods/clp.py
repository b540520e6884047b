"""CLP (Zheng et al., 2022): data-free. For every conv followed by a batch norm, a channel's upper bound on its
Lipschitz constant is the spectral norm of its filter times |gamma / sigma| of that norm; channels above
mean + u * std of their layer are zeroed. The norm of each conv is the one its output really feeds (traced on a
blank input), not the next one in module order. No image of the dataset is used."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..layers import needs_batch_norms
from ..plot import plot_curve
from ..progress import ProgressEvent
from ..prune import FilterPruner
from ..units import Unit
from . import Defence

if TYPE_CHECKING:
    import torch.nn as nn

    from ..job import JobConfig, Prepared
    from ..progress import ProgressCallback


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).abs()
    w = conv.weight.flatten(1) * scale[:, None]
    rows = conv.weight.shape[1]  # one (in/groups, kh*kw) matrix per output channel
    return torch.linalg.matrix_norm(w.view(len(w), rows, -1).float(), ord=2)


def defend(job: Prepared, cfg: JobConfig, emit: ProgressCallback) -> Defence:
    model = job.loaded.model
    start = time.perf_counter()
    blank = torch.zeros_like(job.tensors.train[:1])  # shapes only: the trace needs an input, not data
    pruner = FilterPruner(model, job.loaded.net, blank)
    u = cfg.baseline.clp_u
    changed, per_layer, candidates = [], [], 0
    emit(ProgressEvent("prune", message=f"scoring channels of {len(pruner.convs)} conv layers (data-free)"))
    for i, (name, conv) in enumerate(pruner.convs):
        norm = next((n for n in pruner.norms.get(name, [])
                     if isinstance(n, torch.nn.modules.batchnorm._BatchNorm)), None)
        if norm is None or norm.running_var is None:
            continue
        lips = channel_lipschitz(conv, norm)
        candidates += len(lips)
        limit = lips.mean() + u * lips.std()
        hits = torch.nonzero(lips > limit).flatten().tolist()
        for f in hits:
            pruner.prune(i, f)
            changed.append(Unit("filter", name, f, float(lips[f])).to_dict())
        per_layer.append((name, len(hits)))
    if not candidates:
        raise needs_batch_norms(job.loaded, "clp", "no conv layer feeds a batch norm")
    timing = {"prune": time.perf_counter() - start}
    summary = (f"{len(changed)} of {candidates} conv channels that feed a batch norm had a channel Lipschitz bound "
               f"above mean + {u:g} x std of their layer and were zeroed (filter and norm), in "
               f"{sum(1 for _, n in per_layer if n)} layers. No data and no fine-tuning were used.")
    details = {"u": u, "per_layer": [{"layer": n, "pruned": k} for n, k in per_layer]}
    return Defence(changed, candidates, summary, details, None, timing,
                   lambda path: plot_curve(path, f"CLP (u={u:g}): channels pruned per conv layer",
                                           "conv layer (forward order)",
                                           list(range(len(per_layer))), {"channels pruned": [k for _, k in per_layer]},
                                           ylabel="channels"))
