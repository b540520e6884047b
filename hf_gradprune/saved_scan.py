"""A scan kept for later: `hf-gradprune scan` writes the synthesised triggers beside its report, and a defence given
`--from-scan DIR` unlearns exactly those triggers instead of scanning again.

Why: a release process reviews a scan (its verdict, its evidence, the trigger pictures) before anything is changed;
the defence should then act on the scan that was reviewed, not on a new one. It also saves the scan's time, which is
most of a `--trigger unknown` job. The scan is tied to the weights it was made on (a SHA-256 of every tensor):
another model's scan, or the same model after any change, is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .synth import FAMILIES, ScanResult, Synthesised

SCAN_FILE = "scan_report.json"
TRIGGERS_FILE = "scan_triggers.safetensors"


def weights_sha256(model: nn.Module) -> str:
    """One digest of every weight and buffer, by name and bytes: the same for the same weights in any format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def save_triggers(found: ScanResult, folder: Path) -> None:
    """Every defence target's synthesised triggers (mask and pattern), with their sizes and flips."""
    tensors, meta = {}, {}
    for c, by_family in found.suspect_triggers.items():
        for family, t in by_family.items():
            key = f"{c}.{family}"
            tensors[f"{key}.mask"], tensors[f"{key}.pattern"] = t.mask.cpu().contiguous(), t.pattern.cpu().contiguous()
            meta[key] = json.dumps({"size": t.size, "flip": t.flip})
    save_file(tensors, folder / TRIGGERS_FILE, metadata=meta)


def check_folder(folder: str | Path) -> None:
    """Before the job loads anything: is `folder` a scan's output at all?"""
    for name in (SCAN_FILE, TRIGGERS_FILE):
        if not (Path(folder) / name).is_file():
            raise UserError(f"--from-scan {folder}: no {name} there; give the output folder of `hf-gradprune scan`")


def load_scan(folder: str | Path, weights: str, num_classes: int) -> ScanResult:
    """The scan an earlier `hf-gradprune scan` wrote to `folder`, checked to be of these weights."""
    check_folder(folder)
    folder = Path(folder)
    flag = f"--from-scan {folder}"
    report = json.loads((folder / SCAN_FILE).read_text())
    scanned = report.get("source", {}).get("weights_sha256")
    if scanned != weights:
        raise UserError(f"{flag}: that scan was made on other weights (SHA-256 {str(scanned)[:12]}..., this model's "
                        f"{weights[:12]}...); scan this model, or drop --from-scan")
    per_class = [{**r, "class": int(r["class"])} for r in report["per_class"]]
    if max(r["class"] for r in per_class) >= num_classes:
        raise UserError(f"{flag}: the scan names classes this model does not have; scan this model")
    tensors = load_file(folder / TRIGGERS_FILE)
    with safe_open(folder / TRIGGERS_FILE, "pt") as f:
        meta = f.metadata() or {}
    saved: dict[int, dict] = {}
    for key, values in meta.items():
        c, family = key.split(".")
        record = json.loads(values)
        saved.setdefault(int(c), {})[family] = Synthesised(family, int(c), tensors[f"{key}.mask"],
                                                           tensors[f"{key}.pattern"], record["size"], record["flip"])
    chosen = report["target"] if report["target"] is not None else report["best_class"]
    if chosen not in saved or set(saved[chosen]) != set(FAMILIES):
        raise UserError(f"{flag}: {TRIGGERS_FILE} lacks the triggers of class {chosen}; rerun the scan")
    config = {**report["config"]["scan"], "threshold": report["threshold"]}  # the job's config holds the scan's
    timing = {"scan": 0.0, "scan_as_read": report["timing_s"].get("scan", 0.0)}  # no time spent scanning here
    result = ScanResult(report["backdoored"], report["target"], report["best_class"], report["anomaly_index"],
                        report["family"], report["scanned_classes"], per_class, saved[chosen],
                        _class_keys(report["probe"]),
                        config, timing, [s["class"] for s in report["suspects"]])
    missing = [c for c in result.defence_targets if c not in saved]
    if missing:
        raise UserError(f"{flag}: {TRIGGERS_FILE} lacks the triggers of class {missing[0]}; rerun the scan")
    result.suspect_triggers = {c: saved[c] for c in result.defence_targets}
    return result


def _class_keys(value: object) -> object:
    """JSON turned the per-class dicts' class keys (the screen's promise, the probe's hits) into strings: back to
    the ints the scan wrote."""
    if isinstance(value, dict):
        numeric = bool(value) and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in value)
        return {(int(k) if numeric else k): _class_keys(v) for k, v in value.items()}
    return value
