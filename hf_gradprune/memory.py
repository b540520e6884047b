"""How many images one forward + backward takes at once, so that a job's memory is set by that batch and a
budget, never by how many images the job holds.

Every loop over images (gradients, checks, evaluation, fine-tuning steps) walks its rows in chunks of this size and
adds up what it needs (gradients are summed over chunks), so the pruning decisions do not depend on it.

The choice is measured, not guessed: autograd's saved-tensor hooks count the bytes a forward pass keeps for the
backward pass at one and at two images; the difference is one image's share. The batch is the largest that fits the
budget with room for the backward pass's transient buffers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from .errors import UserError

Auto = Literal["auto"]
AUTO: Auto = "auto"
CPU_BUDGET = 2 * 2**30  # bytes of activations on the CPU: a laptop's share; past ~16 images a CPU gains no speed
GPU_SHARE = 0.6  # of the device's free memory (the optimiser, gradients and fragmentation take the rest)
MAX_BATCH = 256  # the old fixed default; larger batches only cost memory
HELD_TEST_BYTES = 2**30  # a test set (clean + triggered twin, uint8) larger than this is streamed, not held
BACKWARD_FACTOR = 2.0  # peak / saved bytes of one fwd + bwd (the gradients of the saved activations in flight)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


@dataclass(frozen=True)
class BatchChoice:
    """What `--batch-size auto` chose and from what, for the report."""
    batch_size: int
    budget_bytes: int
    per_image_bytes: int  # saved for the backward pass, per image
    fixed_bytes: int  # saved whatever the batch (weights cast for mixed precision, buffers)
    source: str  # "given" | "auto (cpu: ...)" | "auto (cuda: ...)"

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "budget_gib": round(self.budget_bytes / 2**30, 3),
                "per_image_mib": round(self.per_image_bytes / 2**20, 2), "source": self.source}


def parse_memory(text: str | int | None, flag: str = "--max-memory") -> int | None:
    """'4GB', '3.5GiB', '512M', '2g' or bytes -> bytes (G and GiB are 2**30, GB is 10**9)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{flag} {text}: give an amount such as 4GiB, 3.5GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_batch_size(text: str | int) -> int | Auto:
    """`--batch-size`: 'auto' or a positive whole number."""
    if isinstance(text, int) or str(text).isdigit():
        value = int(text)
        if value < 1:
            raise UserError(f"--batch-size {text}: must be at least 1, or auto")
        return value
    if str(text).lower() == AUTO:
        return AUTO
    raise UserError(f"--batch-size {text}: give a whole number of images or auto")


def available_ram() -> int:
    """Bytes the OS can give this process now (MemAvailable; cgroup limits where they are lower)."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            avail = min(avail, int(text))
    return avail


def memory_budget(device: torch.device, max_memory: int | None) -> tuple[int, str]:
    """The bytes one batch's activations may take, and where that figure came from."""
    if max_memory:
        return max_memory, "--max-memory"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_SHARE * free), f"{GPU_SHARE:.0%} of the GPU's free memory"
    avail = available_ram()
    if avail // 4 < CPU_BUDGET:
        return avail // 4, "a quarter of the available RAM"
    return CPU_BUDGET, f"the CPU default ({CPU_BUDGET / 2**30:g} GiB; --max-memory for more)"


def saved_bytes(model: nn.Module, pixels: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward pass of `pixels` for the backward pass (each storage counted once,
    parameters not counted: they are there whatever the batch)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, wrapper subclasses)
            pass
        return t

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)  # the bytes of a training step, also where a method has frozen part of the model
    was_training = model.training
    model.eval()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(pixels)
        del out
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    return sum(seen.values())


def choose_batch_size(model: nn.Module, example: torch.Tensor, device: torch.device, max_memory: int | None,
                      limit: int = MAX_BATCH) -> BatchChoice:
    """The largest batch (1..limit) whose forward + backward fits the budget; `example`: one uint8 (3, H, W) image
    at the model's input size, on `device`."""
    budget, why = memory_budget(device, max_memory)
    x = example.unsqueeze(0)
    one, two = saved_bytes(model, x), saved_bytes(model, torch.cat([x, x]))
    per_image = max(1, two - one)
    fixed = max(0, one - per_image)
    fits = int((budget - BACKWARD_FACTOR * fixed) // (BACKWARD_FACTOR * per_image))
    return BatchChoice(max(1, min(limit, fits)), budget, per_image, fixed, f"auto ({device.type}: {why})")


def stream_test(n_images: int, input_size: tuple[int, int]) -> bool:
    """Whether the test set is decoded a chunk at a time: when holding it and its triggered twin as uint8 would take
    more than HELD_TEST_BYTES (at 224 px, about 3,500 images). Decoding each image again per measurement costs
    less than gigabytes that would otherwise set the job's memory."""
    return 2 * n_images * 3 * input_size[0] * input_size[1] > HELD_TEST_BYTES
