"""Evaluation images decoded a chunk at a time from the dataset's rows, for test sets too large to hold.

A 50,000-image ImageNet validation split at 224 px is 7.5 GB of uint8, and its triggered twin as much again. Held
whole, the test set, not the batch, would set the job's memory. Streamed, only the chunk being measured and the
next one (decoded by background threads while the model works on this one) exist at a time, and the clean chunk is
decoded once for both the clean and the triggered measurement. The pixels are the ones `data.decode` gives for the
same rows, so the numbers do not depend on whether the set was streamed.

Decoding runs ahead in background threads only where the model does not run on the CPU: measured on a 2-core CPU
(benchmarks/streaming.py, resnet50 at 224 px), decoding takes 1.9 ms per image against 33 ms per forward, and
decode threads beside the model's own made the measurement 20 % slower; on a GPU the forward is the fast part and
decoding is what the next chunk waits for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL import Image

Stamp = Callable[[torch.Tensor], torch.Tensor]


class _Decoder:
    """The rows of one split, decoded on demand through the model's preprocessing; one chunk kept, one prefetched."""

    def __init__(self, split: Dataset, rows: list[int], image_column: str,
                 to_pixels: Callable[[list[Image.Image]], np.ndarray], background: bool = True,
                 workers: int | None = None) -> None:
        self.split, self.rows, self.image_column, self.to_pixels = (split, np.asarray(rows, dtype=np.int64),
                                                                    image_column, to_pixels)
        self.background = background  # decode the next chunk ahead, the parts of a chunk in parallel threads
        self.workers = max(1, workers or min(4, os.cpu_count() or 1)) if background else 1
        # threads start only when first used: one decodes the next chunk while this one is measured, the pool
        # decodes the parts of a chunk in parallel (PIL frees the GIL while it decodes and resizes)
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="hf-gradprune-prefetch") if background else None
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hf-gradprune-decode") \
            if self.workers > 1 else None
        self._lock = threading.Lock()
        self._last: tuple[tuple[int, int], torch.Tensor] | None = None
        self._next: tuple[tuple[int, int], Future[torch.Tensor]] | None = None
        self._prev_start: int | None = None
        self.decoded_images = 0  # how many images were decoded (a streamed set decodes each once per pass)

    def __len__(self) -> int:
        return len(self.rows)

    def _decode_rows(self, rows: np.ndarray) -> torch.Tensor:
        images = self.split[rows.tolist()][self.image_column] if len(rows) else []
        return torch.from_numpy(self.to_pixels(images)) if images else torch.zeros(0, dtype=torch.uint8)

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        if self._pool is None or len(rows) < 2 * self.workers:
            out = self._decode_rows(rows)
        else:
            out = torch.cat(list(self._pool.map(self._decode_rows, np.array_split(rows, self.workers))))
        with self._lock:
            self.decoded_images += len(rows)
        return out

    def chunk(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end; the same chunk asked for twice in a row (clean, then triggered) is decoded once."""
        key = (start, end)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if self._next is not None and self._next[0] == key:
            pixels = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].cancel()
            pixels = self.decode(self.rows[start:end])
        self._next = None
        # the next chunk this process will ask for: the same stride as from the last one (N processes take every
        # N-th chunk), or the chunk after this one
        stride = start - self._prev_start if self._prev_start is not None and start > self._prev_start else end - start
        self._prev_start = start
        nxt = (start + stride, min(end + stride, len(self.rows)))
        if self._ahead is not None and nxt[0] < len(self.rows):
            self._next = (nxt, self._ahead.submit(self.decode, self.rows[nxt[0]:nxt[1]]))
        self._last = (key, pixels)
        return pixels


class StreamedImages:
    """Looks like a uint8 (N, 3, H, W) tensor to the evaluation code: `len`, slices, an index or a list of indices.
    `stamped(trigger)` is the triggered twin over the same decoded chunks."""

    def __init__(self, decoder: _Decoder, stamp: Stamp | None = None) -> None:
        self.decoder, self.stamp = decoder, stamp

    @classmethod
    def from_rows(cls, split: Dataset, rows: list[int], image_column: str,
                  to_pixels: Callable[[list[Image.Image]], np.ndarray], background: bool = True,
                  workers: int | None = None) -> StreamedImages:
        return cls(_Decoder(split, rows, image_column, to_pixels, background, workers))

    def stamped(self, stamp: Stamp) -> StreamedImages:
        inner = self.stamp
        return StreamedImages(self.decoder, stamp if inner is None else (lambda x: stamp(inner(x))))

    def __len__(self) -> int:
        return len(self.decoder)

    def _out(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stamp(pixels) if self.stamp is not None and len(pixels) else pixels

    def __getitem__(self, index: int | np.integer | slice | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        n = len(self)
        if isinstance(index, slice):
            start, end, step = index.indices(n)
            if step != 1:
                raise IndexError("a streamed image set takes contiguous slices only")
            return self._out(self.decoder.chunk(start, max(start, end)))
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            i = int(index) + (n if int(index) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"image {int(index)} of {n}")
            return self._out(self.decoder.decode(self.decoder.rows[i:i + 1]))[0]
        idx = torch.as_tensor(index).long().tolist() if torch.is_tensor(index) else [int(i) for i in index]
        return self._out(self.decoder.decode(self.decoder.rows[idx]) if idx else torch.zeros(0, dtype=torch.uint8))


def stamp_images(stamp: Stamp, pixels: torch.Tensor | StreamedImages) -> torch.Tensor | StreamedImages:
    """The triggered twin of a held tensor (stamped now) or of a streamed set (stamped chunk by chunk)."""
    return pixels.stamped(stamp) if isinstance(pixels, StreamedImages) else stamp(pixels)
