"""One job on 1 or N processes (`accelerate launch`), with the same decisions and numbers whatever N.

Work over a set of images is cut into chunks of `batch_size` rows whatever the number of processes, and process k
takes chunks k, k+N, k+2N, ... A chunk's forward pass is then the same computation on 1 or N processes. Per-chunk
counts and losses travel in a zero-filled table that every process sums in chunk order, so they equal a single
process's bit for bit; conv gradients are all-reduced (equal up to fp32 summation order), and every pruning decision
is compared across processes before it is taken.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn as nn

from .errors import UserError

MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISIONS: tuple[MixedPrecision, ...] = get_args(MixedPrecision)  # --mixed-precision's choices


@dataclass
class Procs:
    """This process's place in the job, and the collectives the pipeline needs (no-ops on one process)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    accelerator: Any = None  # accelerate.Accelerator; None for plain single-process library use

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mixed_precision(self) -> str:
        return getattr(self.accelerator, "mixed_precision", "no") if self.accelerator is not None else "no"

    @property
    def wraps(self) -> bool:
        """Whether training goes through accelerate (DDP and / or mixed precision); one plain process trains as is."""
        return self.accelerator is not None and (self.world > 1 or self.mixed_precision != "no")

    def chunks(self, n: int, size: int) -> list[tuple[int, int, int]]:
        """This process's (chunk index, start, end) over rows 0..n in chunks of `size`."""
        return [(i, s, min(n, s + size)) for i, s in enumerate(range(0, n, size)) if i % self.world == self.rank]

    def chunk_sums(self, n: int, size: int, width: int, fn: Callable[[int, int], torch.Tensor]) -> list[float]:
        """Sum fn(start, end) (a vector of `width` numbers) over all chunks of rows 0..n, summed in chunk order on
        every process: each table entry is non-zero on one process only, so the all-reduce adds exact zeros."""
        table = torch.zeros(max(1, -(-n // size)), width, dtype=torch.float64, device=self.device)
        for i, s, e in self.chunks(n, size):
            table[i] = fn(s, e).to(torch.float64)
        table = self.all_sum(table)
        total = torch.zeros(width, dtype=torch.float64, device=table.device)
        for row in table:  # chunk order, never a tree reduction: the same additions as one process makes
            total += row
        return total.tolist()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce
        return reduce(tensor, reduction="sum")

    def shard(self, n: int) -> slice:
        """This process's contiguous part of a global batch of n rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def agree(self, value: Any, what: str) -> None:
        """Check, not assume, that every process took the same decision; a mismatch ends the job on every process."""
        if self.world == 1:
            return
        from accelerate.utils import gather_object
        values = gather_object([value])
        if any(v != values[0] for v in values):
            raise UserError(f"processes disagree on {what}: {values}; the processes do not see the same model or "
                               "data (a different checkpoint revision, dataset cache or library version per node?)")

    def least(self, value: int) -> int:
        """The smallest of every process's value (a choice measured per process, such as the batch size)."""
        if self.world == 1:
            return value
        from accelerate.utils import gather_object
        return min(gather_object([value]))

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def main_first(self) -> contextlib.AbstractContextManager[None]:
        """Downloads happen once: the main process fills the cache, the others then read it."""
        return self.accelerator.main_process_first() if self.world > 1 else contextlib.nullcontext()


SINGLE = Procs()


def asked_processes() -> int:
    """How many processes the launcher was asked for: WORLD_SIZE when torchrun set it, else the --num_processes of an
    `accelerate launch` parent (which `--cpu --num_processes N` ignores, starting one process)."""
    asked = int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return asked
    if any(a.endswith("accelerate") or a == "accelerate.commands.launch" for a in parent[:3]):
        for i, arg in enumerate(parent):
            flag, eq, value = arg.partition("=")
            if flag in ("--num_processes", "--num-processes"):
                value = value if eq else (parent[i + 1] if i + 1 < len(parent) else "")
                if value.isdigit():
                    asked = max(asked, int(value))
    return asked


def start(device: str | None = None, mixed_precision: MixedPrecision | None = None) -> Procs:
    """This process's share of the job, from accelerate: the launcher's processes, or one process without it.

    Without a GPU the processes form a real CPU (gloo) group: a plain `Accelerator()` would give each of them world
    size 1 and N unsynchronised runs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
        # one process can run several jobs (tests, the Space) with different precisions; accelerate keeps the first
        # job's settings in a process-wide state and refuses a change, so each single-process job starts afresh
        AcceleratorState._reset_state()
    try:
        acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, device_placement=False)
    except ValueError as e:
        raise UserError(f"--mixed-precision {mixed_precision}: {e}") from None
    asked = asked_processes()
    if acc.num_processes < asked:
        raise UserError(f"accelerate started {acc.num_processes} process(es) where {asked} were asked for, so they "
                        "would run unsynchronised; on CPU launch with ACCELERATE_USE_CPU=true accelerate launch "
                        f"--multi_gpu --num_processes {asked} ... (see docs/usage.md, 'Multi-GPU')")
    if device and acc.num_processes > 1 and not device.startswith("cpu"):
        raise UserError(f"--device {device}: not with {acc.num_processes} processes; "
                        "accelerate gives each its own device")
    dev = torch.device(device) if device and acc.num_processes == 1 else acc.device
    return Procs(acc.process_index, acc.num_processes, dev, acc)


@contextlib.contextmanager
def synced_batch_norm(model: nn.Module, procs: Procs) -> Iterator[None]:
    """While training, batch-norm layers normalise with the statistics of the whole global batch, computed the same
    way on 1 and N processes (two passes: sum and count, then the squared deviations; one differentiable all-reduce
    each on N). torch's SyncBatchNorm refuses CPU tensors (no gloo), so this small version runs on any backend; and
    one process uses it too, because torch's own batch norm is another computation, whose difference fine-tuning
    amplifies (the same seed must give the same weights on 1 and N processes; figures in docs/decisions.md)."""
    patched = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            after = _after_norm(m, name, required=procs.world > 1)
            if after is not None:
                m.forward = _synced_forward(m, after, procs.world > 1)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _after_norm(m: nn.Module, name: str, required: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a norm layer does after normalising: nothing for torch's own, drop + act for timm's BatchNormAct2d
    (None for another kind on one process: its own forward runs)."""
    forward = type(m).forward
    if forward is nn.modules.batchnorm._BatchNorm.forward:
        return lambda x: x
    try:
        from timm.layers import BatchNormAct2d
        if forward is BatchNormAct2d.forward:
            return lambda x: m.act(m.drop(x))
    except ImportError:
        pass
    if not required:
        return None
    raise UserError(f"layer {name} ({type(m).__name__}) cannot share batch statistics across processes; "
                    "fine-tune this model on one process")


def _synced_forward(m: nn.modules.batchnorm._BatchNorm, after: Callable, shared: bool) -> Callable:
    from torch.distributed.nn.functional import all_reduce as reduce_all
    original = type(m).forward.__get__(m)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return reduce_all(t) if shared else t

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not m.training:
            return original(x)
        c, dims = x.shape[1], [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        # two passes, as torch's own batch norm: E[x^2] - E[x]^2 in fp32 cancels where the mean is large against
        # the spread, and that error, unlike a summation order, grows with every fine-tuning step
        total = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]))
        n = total[-1]
        mean = total[:c] / n
        var = all_reduce((x - mean.view(shape)).square().sum(dims)) / n
        if m.track_running_stats and m.running_mean is not None:
            with torch.no_grad():
                m.num_batches_tracked += 1
                factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
                m.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                m.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
        if m.affine:
            y = y * m.weight.view(shape) + m.bias.view(shape)
        return after(y)
    return forward
