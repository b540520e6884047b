"""Few-shot data: load a `datasets` dataset, find its columns, draw a seeded class-balanced split.

Following the paper, SPC counts train + val images per class: SPC 2 is 1 train + 1 val image per class.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .streaming import StreamedImages

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features


@dataclass
class PixelSet:
    """Images at the model's input size as uint8 (N, 3, H, W) with their true labels; a test set too large to hold
    is a StreamedImages (decoded a chunk at a time) in place of the tensor."""
    pixels: torch.Tensor | StreamedImages
    labels: torch.Tensor

    @property
    def streamed(self) -> bool:
        return isinstance(self.pixels, StreamedImages)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FewShot:
    train: PixelSet
    val: PixelSet
    test: PixelSet
    train_idx: list[int]  # rows of the pool split
    val_idx: list[int]
    test_idx: list[int]  # rows of the test split (or of the pool when the test set is the rest of it)
    class_names: list[str] | None  # in the model's order (labels are the model's indices)
    test_split: str  # name of the split the test set came from, or "<split> minus the few-shot draw"
    label_map: list[int] | None = None  # dataset label -> model label, when the classes were aligned by name


def local_cache_dir(folder: Path) -> str:
    """Where `datasets` should keep its copy of a local dataset folder: a directory named after the folder's place
    and files. `datasets` 5 names its cache after the folder's name only, so two folders called `data` would share
    one cache and the second would silently load the first's images; the fingerprint keeps them apart and renews
    the copy when a file changes."""
    import datasets.config
    folder = folder.resolve()
    h = hashlib.sha256(str(folder).encode())
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = path.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "hf-gradprune-local" / h.hexdigest()[:20])


def load_splits(data_id: str, revision: str | None = None) -> DatasetDict:
    from datasets import DatasetDict, load_dataset
    try:
        folder = Path(data_id).expanduser()
        ds = load_dataset(str(folder), cache_dir=local_cache_dir(folder)) if folder.is_dir() else \
            load_dataset(data_id, revision=revision)
    except FileNotFoundError:
        raise UserError(f"--data {data_id}: no such dataset folder or Hub dataset; "
                        "give a Hub id or a folder in Hub layout") from None
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError)
        raise UserError(f"--data {data_id}: cannot load it "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ds, DatasetDict):
        raise UserError(f"--data {data_id}: expected a dataset with named splits")
    return ds


def _column(features: Features, wanted: str | None, feature_type: type, kind: str, flag: str, data_id: str) -> str:
    cols = list(features)
    if wanted is None:
        found = next((c for c in cols if isinstance(features[c], feature_type)), None)
        if found is None:
            raise UserError(f"--data {data_id}: no {kind} column among {cols}; name it with {flag}")
        return found
    if wanted not in features:
        raise UserError(f"{flag} {wanted}: not a column of {data_id} (columns: {cols})")
    return wanted


def find_columns(features: Features, data_id: str, image_column: str | None,
                 label_column: str | None) -> tuple[str, str]:
    """The image and label columns: the Image and ClassLabel features unless named."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature
    return (_column(features, image_column, ImageFeature, "Image", "--image-column", data_id),
            _column(features, label_column, ClassLabel, "ClassLabel", "--label-column", data_id))


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", str(name).lower())


def _generic(names: list[str] | None) -> bool:
    return not names or all(re.fullmatch(r"(label_?)?\d+", _norm_name(n)) for n in names)


def align_classes(data_names: list[str] | None, labels: np.ndarray, model_names: list[str] | None, num_classes: int,
                  data_id: str, model_id: str) -> list[int] | None:
    """The dataset's classes must be the model's. Where both sides name them and the names are the same set in
    another order (an image folder's classes come sorted by name), returns where each dataset label goes in the
    model's order; None when they already agree. Different names are an error that lists the first few."""
    if data_names is not None and len(data_names) != num_classes:
        raise UserError(f"--data {data_id}: {len(data_names)} classes, but MODEL {model_id} has {num_classes} outputs; "
                        "use the dataset the model was trained on")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"--data {data_id}: labels span {labels.min()}..{labels.max()}, "
                        f"outside the model's {num_classes} classes")
    if _generic(data_names) or _generic(model_names):
        return None
    data_keys, model_keys = [_norm_name(d) for d in data_names], [_norm_name(m) for m in model_names]
    if data_keys == model_keys:
        return None
    where = {k: i for i, k in enumerate(model_keys)}
    if sorted(data_keys) != sorted(model_keys) or len(where) != len(model_keys):
        only_data = [d for d, k in zip(data_names, data_keys) if k not in where][:3]
        only_model = [m for m, k in zip(model_names, model_keys) if k not in set(data_keys)][:3]
        raise UserError(f"--data {data_id}: its class names are not MODEL {model_id}'s labels (only in the data: "
                        f"{', '.join(map(repr, only_data)) or '-'}; only in the model: "
                        f"{', '.join(map(repr, only_model)) or '-'}); use the dataset the model was trained on")
    return [where[k] for k in data_keys]


def val_per_class(spc: int, val_ratio: float) -> int:
    """Validation images per class: SPC 2 gives 1 + 1, SPC 10 gives 9 + 1 at the default ratio 0.1."""
    return max(1, int(round(spc * val_ratio)))


def train_per_class(spc: int, val_ratio: float) -> int:
    """Few-shot training images per class: what is left of SPC after validation."""
    return spc - val_per_class(spc, val_ratio)


def draw_few_shot(labels: np.ndarray, num_classes: int, spc: int, val_ratio: float, seed: int,
                  class_names: list[str] | None, flag_source: str) -> tuple[list[int], list[int]]:
    """Seeded class-balanced draw; a class with fewer than SPC images is an error, never silently dropped."""
    if spc < 2:
        raise UserError(f"--spc {spc}: need at least 2 images per class (1 train + 1 validation)")
    if not 0 < val_ratio < 1:
        raise UserError(f"--val-ratio {val_ratio}: must be between 0 and 1")
    n_val = val_per_class(spc, val_ratio)
    if n_val >= spc:
        raise UserError(f"--val-ratio {val_ratio}: leaves no training image at --spc {spc}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < spc:
            name = f" ({class_names[c]})" if class_names else ""
            raise UserError(f"--spc {spc}: class {c}{name} has only {len(rows)} images in {flag_source}; "
                            f"lower --spc to at most {len(rows)}")
        pick = rng.permutation(rows)[:spc]
        train += pick[: spc - n_val].tolist()
        val += pick[spc - n_val:].tolist()
    return train, val


def decode(split: Dataset, rows: list[int], image_column: str, label_column: str,
           to_pixels: Callable[[list[Image.Image]], np.ndarray], chunk: int = 512,
           label_map: list[int] | None = None, streamed: bool = False, background: bool = True) -> PixelSet:
    """Decode rows through the model's own preprocessing, once; every later step works on these tensors.
    `label_map`: dataset label -> the model's (align_classes). `streamed`: decode_streamed instead."""
    if streamed:
        return decode_streamed(split, rows, image_column, label_column, to_pixels, label_map, background)
    sub = split.select(rows) if rows is not None else split
    stacked, labels = None, []
    for start in range(0, len(sub), chunk):  # each chunk into its place: the decoded set is held once, not twice
        batch = sub[start:start + chunk]
        pixels = to_pixels(batch[image_column])
        if stacked is None:  # in to_pixels' own memory layout (channels last): the convolutions' kernels, and so
            # the last bits of every output, follow the layout, which must not depend on how the decode is chunked
            stacked = np.empty_like(pixels, shape=(len(sub), *pixels.shape[1:]))
        stacked[start:start + len(pixels)] = pixels
        labels.extend(int(y) if label_map is None else label_map[int(y)] for y in batch[label_column])
    if stacked is None:
        stacked = to_pixels([Image.new("RGB", (8, 8))])[:0]
    return PixelSet(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.long))


def decode_streamed(split: Dataset, rows: list[int], image_column: str, label_column: str,
                    to_pixels: Callable[[list[Image.Image]], np.ndarray], label_map: list[int] | None = None,
                    background: bool = True) -> PixelSet:
    """As `decode`, but the images are decoded a chunk at a time when they are measured (streaming.py); only the
    labels are read now. `background`: decode ahead in threads (when the model is not on the CPU)."""
    labels = np.asarray(split[label_column], dtype=np.int64)[np.asarray(rows, dtype=np.int64)]
    if label_map is not None:
        labels = np.asarray(label_map, dtype=np.int64)[labels]
    return PixelSet(StreamedImages.from_rows(split, rows, image_column, to_pixels, background),
                    torch.from_numpy(labels))


def eval_rows(n: int, exclude: set[int], limit: int | None, seed: int) -> list[int]:
    rows = [i for i in range(n) if i not in exclude]
    if limit is not None and limit < len(rows):
        rng = np.random.default_rng(seed + 1)
        rows = sorted(rng.choice(rows, size=limit, replace=False).tolist())
    return rows
