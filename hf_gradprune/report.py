"""The job's report, built and written in one place: `gradprune_report.json` (or `scan_report.json`), the card
rendered from it, and the output folder they go into.

The report is JSON on disk and a plain dict in memory, so that the card, the CLI's summary, the Space and the
benchmarks read the same thing whether it comes from a run or from a file. The TypedDicts below name the keys those
readers rely on; a key a reader needs is added here first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from . import __version__
from .card import render_card
from .errors import UserError
from .hub import LOCAL_FILE, LoadedModel, save_model, source_card_license
from .methods import METHODS
from .names import hub_id_of, local_name, public_name
from .recipes import describe as describe_recipe
from .saved_scan import SCAN_FILE, TRIGGERS_FILE, save_triggers, weights_sha256
from .synth import ScanResult, verdict

if TYPE_CHECKING:
    from PIL import Image

    from .job import JobConfig, Prepared
    from .methods import Defence
    from .metrics import AttackMetrics

REPORT_FILE = "gradprune_report.json"
PLOT_FILE = "gradprune_rounds.png"
TRIGGER_FILE = "synthesised_trigger.png"  # the job's: the trigger the defence stamped, with an example


class Metrics(TypedDict):
    """ACC / ASR / RA on the test set (metrics.AttackMetrics as JSON)."""
    acc: float
    asr: float
    ra: float
    n_clean: int
    n_triggered: int


class Source(TypedDict):
    model: str  # its public name: a Hub id, or a local folder's name
    hub_id: str | None
    revision: str | None
    library: str  # "timm" or "transformers"
    preprocessing: dict


class _DataAlways(TypedDict):
    dataset: str
    hub_id: str | None
    revision: str | None
    split: str
    test_split: str
    image_column: str
    label_column: str
    class_names: list[str] | None
    test_streamed: bool
    train_rows: list[int]
    val_rows: list[int]


class DataInfo(_DataAlways, total=False):
    """The data the job read: which dataset, split and columns, and the few-shot rows it drew."""
    class_alignment: dict  # the dataset lists the model's classes in another order
    n_train: int
    n_val: int
    n_test: int
    input_size: list[int]
    n_images: int  # scan reports: the few-shot images scanned
    spc: int


class Target(TypedDict):
    index: int
    name: str | None
    auto: bool  # found from the triggered images (no --target)


class ScanSummary(TypedDict, total=False):
    """The scan's account (synth.ScanResult.to_dict plus how the job used it); read by the card and the CLI."""
    backdoored: bool
    target: int | None
    target_name: str | None
    best_class: int  # the most suspicious class, backdoored or not
    best_class_name: str | None
    family: str  # the trigger family that gave the evidence: "patch" or "blend"
    anomaly_index: float
    threshold: float
    suspects: list[dict]
    runner_up: dict | None
    evidence: dict
    per_class: dict
    scanned_classes: list[int]
    probe: dict
    triggers: dict
    config: dict  # the scan's settings
    timing_s: dict[str, float]
    verdict: str
    blind: bool
    defence_target: int
    defence_targets: list[int]
    asr_measured_with: str
    trigger_file: str  # the synthesised trigger's picture in the output folder
    from_scan: str  # --from-scan: the earlier scan's folder (by its name), whose triggers the defence used
    target_matches_measured: bool
    unlearning: dict | None  # the re-synthesis rounds (pipeline's), when the job defended


class Report(TypedDict, total=False):
    """gradprune_report.json. A model the scan found clean gets only scan / written / timing_s."""
    tool: dict
    method: dict  # name, title, description, reference, summary (+ recipe for gradprune)
    source: Source
    data: DataInfo
    trigger: str  # what was stamped, in words
    target: Target
    scan: ScanSummary
    before: Metrics
    after: Metrics
    pruned: dict[str, list[int]]  # layer -> the units zeroed
    preview: list[dict]  # a few test images' predictions before / after (Space gallery, card)
    rounds: int
    finetune_epochs: int
    total_filters: int
    prune: dict
    finetune: dict | None
    config: dict  # JobConfig with every path by its public name
    command: str  # the command a reader can rerun
    timing_s: dict[str, float]
    batch: dict
    processes: dict
    push: dict
    files: list[str]
    written: bool


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--output {out}: already exists and is not empty; pass --overwrite or choose another folder")


def scan_summary(found: ScanResult, names: list[str] | None, cfg: JobConfig,
                 measured_target: int | None = None) -> ScanSummary:
    """The report's and card's account of the scan: what it found, what was synthesised, how ASR was measured."""
    d: ScanSummary = {**found.to_dict(names), "verdict": verdict(found, names), "blind": cfg.blind,
                      "defence_target": found.defence_target, "defence_targets": found.defence_targets,
                      "trigger_file": TRIGGER_FILE,
                      **({"from_scan": local_name(cfg.from_scan)} if cfg.from_scan else {}),
                      "asr_measured_with": "the real trigger, which the defence never saw (--blind)" if cfg.blind
                      else "the synthesised trigger (the real one is unknown)"}
    if measured_target is not None:
        d["target_matches_measured"] = d["defence_target"] == measured_target
    return d


def untouched_report(found: ScanResult, names: list[str] | None, cfg: JobConfig, timing: dict[str, float]) -> Report:
    """--trigger unknown and the scan found nothing: the model is left as it is and only the scan is reported."""
    return {"scan": scan_summary(found, names, cfg), "written": False, "timing_s": timing}


def defence_report(cfg: JobConfig, job: Prepared, defence: Defence, before: AttackMetrics, after: AttackMetrics,
                   preview: list[dict], unlearning: dict | None, out: Path, timing: dict[str, float]) -> Report:
    """Everything a defended model's card and its readers need, with every path by its public name."""
    loaded, data, target = job.loaded, job.data, job.metrics_target
    names = data.class_names or loaded.label_names
    title, description, reference = METHODS[cfg.method][:3]
    report: Report = {
        "tool": {"name": "hf-gradprune", "version": __version__, "method": cfg.method},
        "method": {"name": cfg.method, "title": title, "description": description, "reference": reference,
                   "summary": defence.summary,
                   **({"recipe": cfg.recipe, "recipe_description": describe_recipe(cfg.recipe)}
                      if cfg.method == "gradprune" else {})},
        "source": {"model": cfg.model_shown, "hub_id": hub_id_of(cfg.model, cfg.source_id), "revision": loaded.revision,
                   "library": loaded.library, "preprocessing": loaded.preprocessing},
        "data": {**job.meta, "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
                 "input_size": list(loaded.input_size), "train_rows": data.train_idx, "val_rows": data.val_idx},
        "trigger": job.trigger,
        "target": {"index": target, "name": names[target] if names else None, "auto": job.target_auto},
        **({"scan": {**scan_summary(job.scan, names, cfg, target), "unlearning": unlearning}}
           if job.scan is not None else {}),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "pruned": defence.changed,
        "preview": preview,
        "rounds": len(defence.changed),
        "finetune_epochs": defence.tune.epochs if defence.tune else 0,
        "total_filters": defence.candidates,
        "prune": defence.details,
        "finetune": asdict(defence.tune) if defence.tune else None,
        "config": config_dict(cfg, out),
        "command": cfg.command or f"hf-gradprune {cfg.model_shown} --data {cfg.data_shown}"
                                  + ("" if cfg.method == "gradprune" else f" --method {cfg.method}"),
        "timing_s": timing,
        "batch": job.batch.to_dict(),
        "processes": {"count": job.procs.world, "device": job.procs.device.type,
                      "mixed_precision": job.procs.mixed_precision},
    }
    if cfg.repo_id:
        report["push"] = {"repo_id": cfg.repo_id}
    return report


def scan_report(cfg: JobConfig, loaded: LoadedModel, found: ScanResult, meta: dict, n_images: int,
                rows: tuple[list[int], list[int]], images: list[str], out: Path,
                timing: dict[str, float]) -> dict[str, Any]:
    """scan_report.json: the scan's account at the top level, with the model, the data and the command."""
    names = meta.get("class_names") or loaded.label_names
    summary = dict(scan_summary(found, names, cfg))
    for key in ("blind", "asr_measured_with", "trigger_file"):  # they describe a defence, which a scan does not run
        summary.pop(key)
    return {"tool": {"name": "hf-gradprune", "version": __version__, "command": "scan"},
            "model": cfg.model_shown, "source": {"hub_id": hub_id_of(cfg.model, cfg.source_id),
                                                 "revision": loaded.revision, "library": loaded.library,
                                                 "weights_sha256": weights_sha256(loaded.model)},
            "data": {**meta, "n_images": n_images, "spc": cfg.spc, "train_rows": rows[0], "val_rows": rows[1]},
            **summary, "files": sorted([SCAN_FILE, TRIGGERS_FILE, *images]), "config": config_dict(cfg, out),
            "command": cfg.command, "timing_s": timing}


def config_dict(cfg: JobConfig, out: Path) -> dict:
    """The configuration as the report publishes it: every path by its public name (names.py), none of this
    machine's file system; the paths as given are in LOCAL_FILE."""
    d = asdict(cfg)
    d.pop("command", None)
    d.update(model=cfg.model_shown, data=cfg.data_shown, output=local_name(out), trigger=cfg.trigger.published(),
             backdoor_data=cfg.backdoor_data and public_name(cfg.backdoor_data),
             from_scan=cfg.from_scan and local_name(cfg.from_scan))
    return d


def local_config(cfg: JobConfig) -> dict:
    """The configuration with this machine's paths, for a rerun here; LOCAL_FILE, which no push uploads."""
    return {"note": f"local only: hf-gradprune push never uploads {LOCAL_FILE}; it holds paths of this machine",
            "working_directory": os.getcwd(), "config": asdict(cfg)}


def write_output(out: Path, cfg: JobConfig, loaded: LoadedModel, defence: Defence, report: Report,
                 images: dict[str, Image.Image] | None = None) -> None:
    """The defended model, its plot, report, card and local config. Everything goes to a temporary sibling first
    and is renamed into place at the end: nothing half written."""
    with fresh_dir(out, cfg.overwrite) as tmp:
        files = save_model(loaded, tmp)
        defence.plot(tmp / PLOT_FILE)
        for name, image in (images or {}).items():
            image.save(tmp / name)
        report["files"] = sorted(files + [PLOT_FILE, REPORT_FILE, "README.md", *(images or {})])
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        (tmp / LOCAL_FILE).write_text(json.dumps(local_config(cfg), indent=2, default=str))
        render_card(report, PLOT_FILE, source_card_license(loaded)).save(tmp / "README.md")


def write_scan(out: Path, overwrite: bool, found: ScanResult, report: dict[str, Any],
               images: dict[str, Image.Image]) -> None:
    """scan_report.json, the trigger pictures, and the triggers themselves (what `--from-scan` defends against)."""
    with fresh_dir(out, overwrite) as tmp:
        for name, image in images.items():
            image.save(tmp / name)
        save_triggers(found, tmp)
        (tmp / SCAN_FILE).write_text(json.dumps(report, indent=2, default=str))


@contextlib.contextmanager
def fresh_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed into place when the block ends without error and
    removed when it does not: nothing half written ever sits at `out`."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            check_output(out, overwrite)
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
