"""Prunable units, found from the model itself: conv filters, MLP hidden neurons and attention heads.

A unit is a set of parameter slices that only it writes and only it reads. Zeroing all of them (the producer rows
and the consumer columns, or a conv filter and the batch-norm affine it feeds) keeps every shape and state-dict key,
and leaves every slice of the unit with exactly zero gradient, so fine-tuning cannot revive it.

Where the units are is not read from per-architecture tables: one traced forward gives the order in which the
Linear / conv layers run, a hypothesis pairs each producer with the next layer that reads its width (an attention
module's `num_heads` gives the head layout), and three backward passes check the hypothesis exactly (`_holds`): with
the consumer side of every other unit at zero their producer slices get exactly zero gradient, with their producer
side at zero their consumer slices do, and with nothing zeroed both sides get some. A hypothesis that fails (a
residual write, a norm over the hidden channels, a 0.5 gate, a GLU in another layout) is not a unit.
Torch-Pruning's DependencyGraph was evaluated as the oracle and not kept: it maps a GluMlp's 2H fc1 rows onto H fc2
columns as if they were 2H, and a fused qkv's query / key rows onto no projection column.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .prune import Score  # prune.py imports this module: a run-time import would be a cycle

UnitKind = Literal["filter", "neuron", "head", "feature", "channel"]  # keep equal to KINDS' keys
KINDS: dict[UnitKind, str] = {
    "filter": "conv filters (output channels, with the batch-norm channel they feed)",
    "neuron": "MLP hidden neurons (producer row + consumer column)",
    "head": "attention heads (query / key / value rows + output-projection columns)",
    "feature": "input channels of the classifier",
    "channel": "batch-norm channels"}


@dataclass(frozen=True)
class Unit:
    """What a defence changed: one unit of one layer, and why (its score under the method's criterion)."""
    kind: UnitKind
    layer: str  # the module that names it: the conv, the MLP's producer, the attention module, the norm
    index: int
    score: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "index": self.index, "score": self.score}


def count_kinds(units: Iterable[dict]) -> dict[str, int]:
    """How many units of each kind, in the order the kinds first appear ({"neuron": 3, "head": 1})."""
    return dict(Counter(u["kind"] for u in units))


@contextlib.contextmanager
def grads_only_for(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Inside, only `params` take gradients, starting from none; afterwards every parameter's requires_grad is as
    it was and `params` hold no gradient."""
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in wanted)
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None


@dataclass
class Part:
    """Slices of one parameter along `dim`: row u of `index` holds unit u's positions."""
    param: torch.Tensor
    dim: int
    index: torch.Tensor  # (units, positions) long
    producer: bool  # written before the cut (randomising it must not change the output once the unit is zeroed)
    scored: bool = False  # a producer weight the unit's gradient score averages over


@dataclass
class Family:
    """All units of one kind in one layer."""
    kind: UnitKind
    layer: str
    count: int
    parts: list[Part] = field(default_factory=list)

    def scores(self, grads: dict[int, torch.Tensor], score: Score) -> torch.Tensor:
        """Mean |dL/dW| (or |dL/dW * W|) over each unit's scored producer weights: paper Eq. 3 for a conv filter."""
        picked = []
        for p in (p for p in self.parts if p.scored):
            g = grads[id(p.param)]
            g = g * p.param.detach() if score == "grad_x_weight" else g
            picked.append(g.abs().movedim(p.dim, 0)[p.index.flatten().to(g.device)].reshape(self.count, -1))
        return (picked[0] if len(picked) == 1 else torch.cat(picked, 1)).mean(1)


def unit_rows(count: int, width: int = 1, blocks: int = 1, block: int = 0) -> torch.Tensor:
    """Unit u owns positions [u*width, (u+1)*width) of each of `blocks` consecutive blocks of count*width."""
    base = torch.arange(count)[:, None] * width + torch.arange(width)[None, :]
    return torch.cat([base + b * count * width for b in range(blocks)], 1) + block


def _dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)


def _width(m: nn.Module, out: bool) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    return m.out_channels if out else m.in_channels


def _consumer_parts(m: nn.Module, index: torch.Tensor) -> list[Part]:
    return [Part(m.weight, 1, index, producer=False)]


def _producer_parts(m: nn.Module, index: torch.Tensor) -> list[Part]:
    parts = [Part(m.weight, 0, index, producer=True, scored=True)]
    if m.bias is not None:
        parts.append(Part(m.bias, 0, index, producer=True))
    return parts


def _trace(model: nn.Module, net: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, list[nn.Module]]]:
    """Names of the Linear / conv layers in the order they run, and the batch norms each conv's output enters."""
    order: list[str] = []
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []
    norms: dict[str, list[nn.Module]] = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
                if name not in order:
                    order.append(name)
                if isinstance(mod, nn.Conv2d):
                    produced[id(out)] = name
                    alive.append(out)
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            def norm_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
                src = produced.get(id(inp[0])) if inp else None
                if src is not None and mod not in norms.setdefault(src, []):
                    norms[src].append(mod)
            handles.append(m.register_forward_pre_hook(norm_hook))
    try:
        with torch.no_grad():
            model.eval()
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order, norms


def _heads(net: nn.Module, modules: dict[str, nn.Module], order: list[str]) -> list[Family]:
    """Hypotheses for every module that says how many heads it has: a fused qkv laid out [Q | K | V] with the heads
    inside each block, or separate q / k / v layers; the output projection is the next layer to run that reads
    the attention width."""
    found = []
    for name, m in net.named_modules():
        heads = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None)
        if not isinstance(heads, int) or heads < 1:
            continue
        children = {n: c for n, c in m.named_modules() if n and isinstance(c, nn.Linear)}
        by_suffix = {n.rsplit(".", 1)[-1]: n for n in children}
        fused = by_suffix.get("qkv")
        split = [by_suffix.get(k) for k in ("q", "k", "v")]
        if not all(split):
            split = [by_suffix.get(k) for k in ("q_proj", "k_proj", "v_proj")]
        if not all(split):
            split = [by_suffix.get(k) for k in ("query", "key", "value")]
        producers = [f"{name}.{fused}"] if fused else ([f"{name}.{s}" for s in split] if all(split) else [])
        if not producers or any(p not in order for p in producers):
            continue
        width = children[fused].out_features // 3 if fused else children[split[0]].out_features
        if width % heads:
            continue
        d = width // heads
        last = max(order.index(p) for p in producers)
        proj = next((n for n in order[last + 1:] if _dense(modules[n]) and _width(modules[n], False) == width
                     and n not in producers), None)
        if proj is None:
            continue
        fam = Family("head", name, heads)
        if fused:
            qkv = modules[producers[0]]
            fam.parts += _producer_parts(qkv, unit_rows(heads, d, blocks=3))
            for bias in ("q_bias", "v_bias"):  # BEiT / EVA keep these apart (k_bias is a zero buffer)
                b = getattr(m, bias, None)
                if isinstance(b, nn.Parameter):
                    fam.parts.append(Part(b, 0, unit_rows(heads, d), producer=True))
        else:
            for p in producers:
                fam.parts += _producer_parts(modules[p], unit_rows(heads, d))
        fam.parts += _consumer_parts(modules[proj], unit_rows(heads, d))
        found.append(fam)
    return found


def _neurons(modules: dict[str, nn.Module], order: list[str], taken: set[str], head_name: str) -> list[Family]:
    """Hypotheses for MLPs: a producer, the next layer to run reads its width (or half of it: a GLU, contiguous
    halves first, then interleaved) -> its hidden neurons."""
    found = []
    for i, name in enumerate(order[:-1]):
        a, nxt = modules[name], order[i + 1]
        b = modules[nxt]
        if name in taken or nxt == name or not (_dense(a) and _dense(b)) or name == head_name:
            continue
        hidden, reads = _width(a, True), _width(b, False)
        layouts = []
        if reads == hidden:
            layouts.append(unit_rows(hidden))
        elif 2 * reads == hidden:
            layouts += [unit_rows(reads, blocks=2), unit_rows(reads, width=2)]
        for rows in layouts:
            fam = Family("neuron", name, reads, _producer_parts(a, rows) + _consumer_parts(b, unit_rows(reads)))
            found.append(fam)
    return found


def _holds(model: nn.Module, fam: Family, example: torch.Tensor) -> bool:
    """The exact check, both ways, on every other unit: with their consumer side at zero their producer slices get
    exactly zero gradient (nothing else reads them), and with their producer side at zero their consumer slices
    do (nothing else writes what those read: no residual stream, no gate of 0.5). With nothing zeroed both sides
    get some gradient (the pairing reaches the output). The check is about which layer reads what, not about the
    values: units pruned before (every slice exactly zero) are given random values while it runs, so that a layer
    whose units were all pruned by an earlier defence is still recognised; a ReLU that never fires passes the first
    two for free and does not spoil the third."""
    chosen = torch.arange(fam.count) % 2 == 0 if fam.count > 1 else torch.ones(1, dtype=torch.bool)
    producers = [p for p in fam.parts if p.producer]
    consumers = [p for p in fam.parts if not p.producer]
    everyone = torch.ones(fam.count, dtype=torch.bool)
    with _pruned_units_revived(fam):
        return (_grads_zero(model, fam.count, [], producers + consumers, everyone, example) is False
                and _grads_zero(model, fam.count, consumers, producers, chosen, example) is True
                and _grads_zero(model, fam.count, producers, consumers, chosen, example) is True)


@contextlib.contextmanager
def _pruned_units_revived(*families: Family) -> Iterator[None]:
    """Fill the units whose every slice is exactly zero with small seeded random values, and restore them after."""
    saved: list[tuple[Part, torch.Tensor]] = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for fam in families:
            pruned = torch.ones(fam.count, dtype=torch.bool)
            for p in fam.parts:
                slices = p.param.detach().movedim(p.dim, 0)[p.index.flatten().to(p.param.device)]
                pruned &= (slices.reshape(fam.count, -1) == 0).all(1).cpu()
            if not pruned.any():
                continue
            for p in fam.parts:
                saved.append((p, p.param.detach().clone()))
                idx = p.index[pruned].flatten().to(p.param.device)
                shape = p.param.index_select(p.dim, idx).shape
                p.param.index_copy_(p.dim, idx, (0.02 * torch.randn(shape, generator=gen)).to(p.param))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in reversed(saved):
                p.param.copy_(original)


def _grads_zero(model: nn.Module, count: int, zeroed: list[Part], watched: list[Part], chosen: torch.Tensor,
                example: torch.Tensor) -> bool | None:
    """Zero the `zeroed` slices of the chosen units, back-propagate a random projection of the output, and say
    whether the `watched` slices of the chosen units got exactly zero gradient, part by part (None: some watched
    part got no gradient at all, or, with nothing zeroed, some part got none while another did)."""
    saved = [(p, p.param.detach().clone()) for p in zeroed]
    try:
        with torch.no_grad():
            for p in zeroed:
                p.param.index_fill_(p.dim, p.index[chosen].flatten().to(p.param.device), 0)
        with grads_only_for(model, [p.param for p in watched]):
            model.eval()
            out = model(example)
            gen = torch.Generator().manual_seed(0)
            (out * torch.randn(out.shape, generator=gen).to(out)).sum().backward()
            zero = []
            for p in watched:
                if p.param.grad is None:
                    return None
                g = p.param.grad.movedim(p.dim, 0)[p.index.flatten().to(p.param.device)].reshape(count, -1)
                zero.append(bool((g[chosen] == 0).all()))
        if not zeroed:  # the reach check: every watched part must get some gradient
            return False if not any(zero) else (True if all(zero) else None)
        return all(zero)
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.param.copy_(original)


def find_units(model: nn.Module, net: nn.Module, example: torch.Tensor, head: nn.Module | None = None) -> list[Family]:
    """Every prunable unit family of `net` (run through `model` on `example`, 2 images or more):
    conv filters that enter a batch norm (a per-channel norm: zeroing filter + affine silences exactly that channel),
    then attention heads and MLP neurons that pass the exact gradient check, in the order the layers run.
    Residual-stream channels (patch embedding, stem, a conv into a LayerNorm, every write into the stream) have
    other writers or a norm over all channels, so they are never units. `head`: the classifier, never a producer."""
    modules = dict(net.named_modules())
    order, norms = _trace(model, net, example)
    head_name = next((n for n, m in modules.items() if m is head), "") if head is not None else ""
    families: list[Family] = []
    for name in (n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)):
        if name in norms and name in order:
            conv = modules[name]
            rows = unit_rows(conv.out_channels)
            fam = Family("filter", name, conv.out_channels, _producer_parts(conv, rows))
            for norm in norms[name]:
                if norm.weight.numel() == conv.out_channels:
                    fam.parts += [Part(norm.weight, 0, rows, producer=False), Part(norm.bias, 0, rows, producer=False)]
            families.append(fam)
    others: list[Family] = []
    taken: set[str] = {f.layer for f in families}  # a conv into a batch norm is a filter, never also a neuron
    owned: set[int] = set()  # producer weights of the heads found (a module above an attention may say num_heads too)
    with _pruned_units_revived(*families):  # a filter layer pruned to nothing still feeds what reads it (an SE block)
        for fam in _heads(net, modules, order):
            weights = {id(p.param) for p in fam.parts if p.scored}
            if not weights & owned and _holds(model, fam, example):
                others.append(fam)
                owned |= weights
                taken |= {n for n, m in modules.items() if id(getattr(m, "weight", None)) in weights}
        neuron_layers: set[str] = set()
        for fam in _neurons(modules, order, taken, head_name):
            if fam.layer not in neuron_layers and _holds(model, fam, example):
                others.append(fam)
                neuron_layers.add(fam.layer)
    position = {n: i for i, n in enumerate(order)}
    others.sort(key=lambda f: position.get(f.layer, position.get(_first_producer(f, modules), 0)))
    return families + others


def _first_producer(fam: Family, modules: dict[str, nn.Module]) -> str:
    ids = {id(p.param) for p in fam.parts if p.producer}
    return next((n for n, m in modules.items() if id(getattr(m, "weight", None)) in ids), "")


class UnitPruner:
    """Zeroes whole units (both sides), restores them exactly when a round is undone, and keeps them at zero after
    every optimiser step. Units are numbered flat across families, in family order."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families
        self.offsets = [0]
        for fam in families:
            self.offsets.append(self.offsets[-1] + fam.count)
        self.pruned: list[tuple[int, int]] = []
        self._saved: list[list[tuple[Part, torch.Tensor]]] = []

    @property
    def num_units(self) -> int:
        return self.offsets[-1]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fam in self.families:
            out[fam.kind] = out.get(fam.kind, 0) + fam.count
        return out

    def locate(self, flat: int) -> tuple[int, int]:
        for i in range(len(self.families)):
            if flat < self.offsets[i + 1]:
                return i, flat - self.offsets[i]
        raise IndexError(flat)

    def unit(self, fam_idx: int, k: int, score: float) -> Unit:
        fam = self.families[fam_idx]
        return Unit(fam.kind, fam.layer, k, score)

    @torch.no_grad()
    def prune(self, fam_idx: int, k: int) -> None:
        saved = []
        for p in self.families[fam_idx].parts:
            idx = p.index[k].to(p.param.device)
            saved.append((p, p.param.index_select(p.dim, idx).clone()))
            p.param.index_fill_(p.dim, idx, 0)
        self._saved.append(saved)
        self.pruned.append((fam_idx, k))

    @torch.no_grad()
    def undo_last(self) -> None:
        fam_idx, k = self.pruned.pop()
        for p, original in self._saved.pop():
            p.param.index_copy_(p.dim, p.index[k].to(p.param.device), original)

    @torch.no_grad()
    def reapply(self) -> None:
        for fam_idx, k in self.pruned:
            for p in self.families[fam_idx].parts:
                p.param.index_fill_(p.dim, p.index[k].to(p.param.device), 0)

    def pruned_mask(self, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(self.num_units, dtype=torch.bool, device=device)
        for fam_idx, k in self.pruned:
            mask[self.offsets[fam_idx] + k] = True
        return mask

    def scored_params(self) -> list[torch.Tensor]:
        seen, out = set(), []
        for fam in self.families:
            for p in fam.parts:
                if p.scored and id(p.param) not in seen:
                    seen.add(id(p.param))
                    out.append(p.param)
        return out
