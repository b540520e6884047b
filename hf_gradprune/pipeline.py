"""The one flow behind the CLI, the Space and the benchmarks:
load -> sample few-shot -> stamp trigger -> measure -> prune -> fine-tune -> measure -> save.

Progress reaches the caller through a callback; nothing here prints.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .config import check_job
from .data import FewShot, PixelSet, align_classes, decode, draw_few_shot, eval_rows, find_columns, load_splits
from .errors import UserError
from .hub import LoadedModel, load_model
from .job import FewShotTensors, JobConfig, JobResult, Prepared
from .memory import AUTO, BatchChoice, choose_batch_size, stream_test
from .methods import Defence, defend
from .metrics import attack_metrics, pick_target, predict
from .names import hub_id_of, local_name, model_name, public_name
from .parallel import Procs, start
from .progress import ProgressCallback, ProgressEvent
from .report import (
    PLOT_FILE,
    REPORT_FILE,
    SCAN_FILE,
    TRIGGER_FILE,
    check_output,
    defence_report,
    scan_report,
    untouched_report,
    write_output,
    write_scan,
)
from .saved_scan import check_folder, load_scan, weights_sha256
from .streaming import stamp_images
from .synth import (
    ScanResult,
    pull_back,
    resynthesise,
    scan,
    stamp_twins,
    standing,
    trigger_flips,
    usable_triggers,
    verdict,
)
from .triggers import make_trigger

__all__ = ["PLOT_FILE", "REPORT_FILE", "SCAN_FILE", "TRIGGER_FILE", "JobConfig", "JobResult", "prepare", "run",
           "run_scan"]

PREVIEW_SAMPLES = 4


def _preview_rows(labels: torch.Tensor, target: int, k: int = PREVIEW_SAMPLES) -> list[int]:
    """The first k test images that are not of the target class: where a backdoor shows (and then does not)."""
    return torch.nonzero(labels != target).flatten()[:k].tolist()


def output_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output) if cfg.output else Path(f"./{model_name(cfg.model_shown)}-{cfg.method}")


def _resolve_target(spec: str, loaded: LoadedModel, class_names: list[str] | None) -> int | None:
    if spec == "auto":
        return None
    if spec.lstrip("-").isdigit():
        idx = int(spec)
    else:
        names = class_names or loaded.label_names or []
        matches = [i for i, n in enumerate(names) if str(n).lower() == spec.lower()]
        if not matches:
            raise UserError(f"--target {spec}: no class of that name; give an index 0..{loaded.num_classes - 1} "
                            f"or one of {names[:10]}{'...' if len(names) > 10 else ''}")
        idx = matches[0]
    if not 0 <= idx < loaded.num_classes:
        raise UserError(f"--target {spec}: out of range; the model has classes 0..{loaded.num_classes - 1}")
    return idx


def _load_data(cfg: JobConfig, loaded: LoadedModel, with_test: bool = True,
               device: torch.device | None = None) -> tuple[FewShot, dict]:
    splits = load_splits(cfg.data, cfg.data_revision)
    if cfg.split not in splits:
        raise UserError(f"--split {cfg.split}: not in {cfg.data} (splits: {list(splits)})")
    pool = splits[cfg.split]
    image_col, label_col = find_columns(pool.features, cfg.data, cfg.image_column, cfg.label_column)
    feature = pool.features[label_col]
    class_names = list(feature.names) if hasattr(feature, "names") else None
    labels = np.asarray(pool[label_col], dtype=np.int64)
    label_map = align_classes(class_names, labels, loaded.label_names, loaded.num_classes, cfg.data, cfg.model)
    data_order = class_names
    if label_map is not None:  # from here on every label is the model's index
        labels = np.asarray(label_map, dtype=np.int64)[labels]
        class_names = list(loaded.label_names)
    train_idx, val_idx = draw_few_shot(labels, loaded.num_classes, cfg.spc, cfg.val_ratio, cfg.seed, class_names,
                                       f"split '{cfg.split}'")
    if cfg.eval_split is not None and cfg.eval_split not in splits:
        raise UserError(f"--eval-split {cfg.eval_split}: not in {cfg.data} (splits: {list(splits)})")
    eval_name = cfg.eval_split or ("test" if "test" in splits and cfg.split != "test" else None)
    if eval_name is None or eval_name == cfg.split:
        test_split, exclude, eval_name = pool, set(train_idx) | set(val_idx), f"{cfg.split} minus the few-shot draw"
    else:
        test_split, exclude = splits[eval_name], set()
        find_columns(test_split.features, cfg.data, image_col, label_col)
    test_idx = eval_rows(len(test_split), exclude, cfg.eval_limit, cfg.seed) if with_test else []
    streamed = stream_test(len(test_idx), loaded.input_size)  # too large to hold: decoded a chunk at a time
    background = device is not None and device.type != "cpu"  # on a CPU the model needs the cores more
    test = decode(test_split, test_idx, image_col, label_col, loaded.to_pixels, label_map=label_map, streamed=streamed,
                  background=background)
    data = FewShot(*(decode(split, rows, image_col, label_col, loaded.to_pixels, label_map=label_map)
                     for split, rows in ((pool, train_idx), (pool, val_idx))), test,
                   train_idx, val_idx, test_idx, class_names, eval_name, label_map)
    meta = {"dataset": cfg.data_shown, "hub_id": hub_id_of(cfg.data, cfg.data_id), "revision": cfg.data_revision,
            "split": cfg.split, "test_split": eval_name, "image_column": image_col,
            "label_column": label_col, "class_names": class_names, "test_streamed": streamed}
    if label_map is not None:
        meta["class_alignment"] = {
            "note": f"the dataset lists the model's {len(label_map)} classes in another order; its labels were "
                    "mapped onto the model's by name", "data_order": data_order, "data_to_model": label_map}
    return data, meta


def _triggered_copies(cfg: JobConfig, loaded: LoadedModel, data: FewShot,
                      meta: dict) -> tuple[PixelSet, PixelSet, PixelSet, str]:
    """The triggered twins of the train / val / test images, with their TRUE labels."""
    if cfg.backdoor_data:
        splits = load_splits(cfg.backdoor_data)
        out = []
        for name, rows, clean in ((cfg.split, data.train_idx, data.train), (cfg.split, data.val_idx, data.val),
                                  (meta["test_split"], data.test_idx, data.test)):
            split_name = cfg.split if name.endswith("minus the few-shot draw") else name
            if split_name not in splits:
                raise UserError(f"--backdoor-data {cfg.backdoor_data}: no split '{split_name}'; it must hold triggered "
                                f"copies of every row of --data, in the same splits and order")
            split = splits[split_name]
            img_col, lab_col = find_columns(split.features, cfg.backdoor_data, None, None)
            if max(rows, default=-1) >= len(split):
                raise UserError(f"--backdoor-data {cfg.backdoor_data}: split '{split_name}' has {len(split)} rows, "
                                "fewer than --data; it must be row-aligned with --data")
            twin = decode(split, rows, img_col, lab_col, loaded.to_pixels, label_map=data.label_map,
                          streamed=clean.streamed, background=clean.streamed and clean.pixels.decoder.background)
            if not torch.equal(twin.labels, clean.labels):
                raise UserError(f"--backdoor-data {cfg.backdoor_data}: labels differ from --data in split "
                                f"'{split_name}'; rows must be triggered copies of the same images with their true "
                                "labels")
            out.append(twin)
        return out[0], out[1], out[2], f"defender's triggered copies from {public_name(cfg.backdoor_data)}"
    stamp = make_trigger(cfg.trigger, loaded.input_size)
    out = [PixelSet(stamp_images(stamp, s.pixels), s.labels) for s in (data.train, data.val, data.test)]
    return out[0], out[1], out[2], cfg.trigger.describe()


def _scan(cfg: JobConfig, loaded: LoadedModel, data: FewShot, target: int | None, emit: ProgressCallback,
          device: torch.device, batch: BatchChoice) -> ScanResult:
    """The scan on all few-shot images (train + val), the same on every process (same seed, same images)."""
    emit(ProgressEvent("scan", message=f"scanning {cfg.model_shown} for a backdoor ({loaded.num_classes} classes)"))
    loaded.model.to(device)
    pixels = torch.cat([data.train.pixels, data.val.pixels]).to(device)
    labels = torch.cat([data.train.labels, data.val.labels]).to(device)
    return scan(loaded.model, pixels, labels, loaded.num_classes, cfg.scan_config(batch.batch_size), target, emit)


def prepare(cfg: JobConfig, emit: ProgressCallback = lambda event: None, procs: Procs | None = None) -> Prepared:
    """Load the model, draw the few-shot data, stamp the trigger, move everything to the device, pick the target.

    Every process holds the whole few-shot data (it is small) and takes its chunks of the work from it."""
    procs = procs or start(cfg.device, cfg.mixed_precision)
    emit(ProgressEvent("load", message=f"loading {cfg.model_shown}"))
    with procs.main_first():
        loaded = load_model(cfg.model, cfg.revision, cfg.allow_pickle, cfg.trust_remote_code)
    model = loaded.model
    found = None
    if cfg.from_scan:  # before the data is read: a scan of other weights is refused at once
        emit(ProgressEvent("scan", message=f"reading the scan in {local_name(cfg.from_scan)}"))
        found = load_scan(cfg.from_scan, weights_sha256(model), loaded.num_classes)
    emit(ProgressEvent("data", message=f"sampling {cfg.spc} images per class from {cfg.data_shown}"))
    with procs.main_first():
        data, meta = _load_data(cfg, loaded, device=procs.device)
    target = _resolve_target(cfg.target, loaded, data.class_names)
    batch = _batch_choice(cfg, loaded, data.train.pixels[:1], procs)
    if found is None and cfg.synthesises:
        found = _scan(cfg, loaded, data, target, emit, procs.device, batch)
    if found is not None:
        emit(ProgressEvent("verdict", message=verdict(found, data.class_names or loaded.label_names)))
        if not found.backdoored and not cfg.force:  # a clean model is left untouched: nothing stamped, nothing written
            return Prepared(loaded, data, meta, None, found.best_class, target is None, "", procs, scan=found,
                            untouched=True, batch=batch)
    real = None  # the real trigger's twins: what the defence stamps, or under --blind only what measures
    if found is None or cfg.blind:
        real = _triggered_copies(cfg, loaded, data, meta)
        if torch.equal(real[0].pixels, data.train.pixels):
            raise UserError("the trigger changes no pixel of the few-shot images at the model's input size "
                            f"{loaded.input_size}; check --trigger-image / --trigger-mask (an additive trigger is in "
                            "pixel units)")
    measure_target = None
    if found is None:
        trig_train, trig_val, trig_test, trigger_desc = real
    else:  # the defence sees only the synthesised triggers
        trig_train, trig_val = (PixelSet(stamp_twins(usable_triggers(found), s.pixels), s.labels)
                                for s in (data.train, data.val))
        stamped = "; ".join(t.describe() for t in usable_triggers(found))
        if cfg.blind:
            trig_test = real[2]
            trigger_desc = (f"{stamped}. The defence stamped only these; ACC / ASR / RA are measured with the real "
                            f"trigger, which it never saw: {real[3]}")
            if target is None:  # ASR counts against the real trigger's target (found from it, for measuring only)
                measure_target = _auto_target(model, real[:2], loaded.num_classes, batch.batch_size, procs.device)
        else:
            trig_test = PixelSet(stamp_images(found.trigger, data.test.pixels), data.test.labels)
            trigger_desc = f"{stamped}. The real trigger is unknown: ASR / RA are measured with the first of these"
    model.to(procs.device)
    # the few-shot images live on the device (every round reads them); the test set stays in host memory (or, when
    # too large to hold, is decoded a chunk at a time: streaming.py) and goes to the device a chunk at a time
    # (metrics.attack_metrics), so its size bounds neither the device's memory nor the host's
    dev = procs.device
    tensors = FewShotTensors(data.train.pixels.to(dev), data.train.labels.to(dev), trig_train.pixels.to(dev),
                             data.val.pixels.to(dev), data.val.labels.to(dev), trig_val.pixels.to(dev),
                             data.test.pixels, data.test.labels, trig_test.pixels)
    target_auto = target is None
    if found is not None:
        target = found.defence_target
    elif target_auto:
        target = _auto_target(model, (trig_train, trig_val), loaded.num_classes, batch.batch_size,
                              procs.device)
    return Prepared(loaded, data, meta, tensors, target, target_auto, trigger_desc, procs, found, measure_target,
                    batch=batch)


def _batch_choice(cfg: JobConfig, loaded: LoadedModel, example: torch.Tensor, procs: Procs) -> BatchChoice:
    """--batch-size auto: measured on this model at its input size; on N processes the smallest choice, so that
    every process cuts the work into the same chunks."""
    if cfg.batch_size != AUTO:
        return BatchChoice(int(cfg.batch_size), cfg.max_memory or 0, 0, 0, "--batch-size")
    loaded.model.to(procs.device)
    choice = choose_batch_size(loaded.model, example[0].to(procs.device), procs.device, cfg.max_memory)
    least = procs.least(choice.batch_size)
    return choice if least == choice.batch_size else replace(choice, batch_size=least,
                                                             source=choice.source + ", the smallest over processes")


def _auto_target(model: torch.nn.Module, triggered: tuple[PixelSet, ...], num_classes: int, batch_size: int,
                 device: torch.device) -> int:
    """No --target: the class the triggered few-shot images of other classes go to most."""
    pixels = torch.cat([s.pixels for s in triggered]).to(device)
    model.to(device)
    return pick_target(predict(model, pixels, batch_size), torch.cat([s.labels for s in triggered]), num_classes)


def run(cfg: JobConfig, progress: ProgressCallback | None = None) -> JobResult:
    """Remove the backdoor from cfg.model and write the sanitised model, card, report and plot to the output.

    Under `accelerate launch` every process runs this; only the main one reports progress and writes the output."""
    check_job(cfg)  # a JobConfig built by hand gets build_config's checks too
    out = output_dir_for(cfg)
    check_output(out, cfg.overwrite)
    if cfg.from_scan:
        check_folder(cfg.from_scan)
    procs = start(cfg.device, cfg.mixed_precision)
    emit = (progress or (lambda event: None)) if procs.is_main else (lambda event: None)
    torch.manual_seed(cfg.seed)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    job = prepare(cfg, emit, procs)
    loaded, data, tensors, target = job.loaded, job.data, job.tensors, job.target
    model = loaded.model
    timing["load"] = time.perf_counter() - t0
    names = data.class_names or loaded.label_names
    if job.scan is not None:
        timing["scan"] = job.scan.timing_s["scan"]
        if job.untouched:  # the scan found no backdoor and --force was not given: the model is left as it is
            report = untouched_report(job.scan, names, cfg, timing)
            emit(ProgressEvent("done", message=verdict(job.scan, names) + "; nothing written (--force defends anyway)"))
            return JobResult(out, report, procs.is_main, written=False, scan=job.scan)
    target = job.metrics_target  # ASR counts against it; the defence works against job.target

    t = time.perf_counter()
    emit(ProgressEvent("evaluate", message="measuring the model before the defence"))
    before = attack_metrics(model, tensors.test, tensors.trig_test, tensors.test_y, target, job.batch_size, procs)
    timing["evaluate_before"] = time.perf_counter() - t
    shown = _preview_rows(tensors.test_y, target)
    preview_px = {"clean": tensors.test[shown].to(procs.device), "triggered": tensors.trig_test[shown].to(procs.device)}
    preview_before = {k: predict(model, v, job.batch_size).tolist() for k, v in preview_px.items()}

    original = _snapshot(model) if job.scan is not None and (cfg.scan.rounds > 1 or cfg.scan.keep_flip is not None) \
        else None
    defence = defend(cfg.method, job, cfg, emit)
    timing.update(defence.timing)
    unlearning = _resynthesis_rounds(job, cfg, defence, emit, original) if job.scan is not None else None
    defence = unlearning.pop("defence") if unlearning else defence

    t = time.perf_counter()
    emit(ProgressEvent("evaluate", message="measuring the sanitised model"))
    after = attack_metrics(model, tensors.test, tensors.trig_test, tensors.test_y, target, job.batch_size, procs)
    timing["evaluate_after"] = time.perf_counter() - t
    preview_after = {k: predict(model, v, job.batch_size).tolist() for k, v in preview_px.items()}

    preview = [{"test_row": data.test_idx[i], "label": int(tensors.test_y[i]),
                **{f"{k}_{when}": p[k][j] for k in preview_px for when, p in (("before", preview_before),
                                                                              ("after", preview_after))}}
               for j, i in enumerate(shown)]
    report = defence_report(cfg, job, defence, before, after, preview, unlearning, out, timing)
    emit(ProgressEvent("save", message=f"writing {out}"))
    if procs.is_main:
        example = tensors.test[shown[0]] if shown else tensors.test[0]
        extra = {TRIGGER_FILE: job.scan.trigger.image(example)} if job.scan is not None else {}
        write_output(out, cfg, loaded, defence, report, extra)
    procs.wait()  # the others leave once the output is complete
    report["timing_s"]["total"] = time.perf_counter() - t0
    emit(ProgressEvent("done", values={"before": report["before"], "after": report["after"], "target": target}))
    samples = {k: v.cpu().numpy() for k, v in preview_px.items()}
    return JobResult(out, report, procs.is_main, samples, scan=job.scan)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and buffers as they were, on the CPU: later synthesis rounds may start from them again."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _resynthesis_rounds(job: Prepared, cfg: JobConfig, defence: Defence, emit: ProgressCallback,
                        original: dict[str, torch.Tensor] | None) -> dict:
    """cfg.scan.rounds > 1: re-synthesise the target's triggers on the defended model (the ways in that are left)
    and defend again against all triggers found so far, until none works any more or the rounds are spent.

    rounds_from "original" defends the model as it was before round 1 each time, so the accuracy lost to unlearning
    does not add up over the rounds; "defended" unlearns on top of the last round. Then (cfg.scan.keep_flip) the
    weights are pulled back toward the original as far as every trigger found stays out (synth.pull_back)."""
    t, sc = job.tensors, cfg.scan_config(job.batch_size)
    assert t is not None and job.scan is not None
    scanned = usable_triggers(job.scan)
    triggers = list(scanned)
    targets = job.scan.defence_targets
    rounds = [{"round": 1, "targets": targets, "triggers": [x.describe() for x in triggers],
               "finetune_epochs": _epochs(defence)}]
    pixels, labels = torch.cat([t.train, t.val]), torch.cat([t.train_y, t.val_y])
    for r in range(2, sc.rounds + 1):
        emit(ProgressEvent("scan", message=f"round {r}: re-synthesising the triggers of class"
                                           f"{'es' if len(targets) > 1 else ''} {', '.join(map(str, targets))}"))
        fresh, stands = [], {}
        for k, target in enumerate(targets):
            found = resynthesise(job.loaded.model, pixels, labels, target, sc, r, k)
            # how far the target still stands out after the last round (the scan's index): recorded, not acted on;
            # ending the rounds on it was measured and rejected (docs/unknown-trigger.md)
            stands[target] = standing(job.scan, target, found)
            fresh += found
        record = {"round": r, "targets": targets, "target_anomaly": stands[job.target]}
        if len(targets) > 1:
            record["target_anomalies"] = stands
        if not fresh:
            rounds.append({**record, "triggers": [], "note": "no trigger reaches the flip goal any more"})
            break
        triggers += fresh
        t = t.restamped(stamp_twins(triggers, t.train), stamp_twins(triggers, t.val))
        if sc.rounds_from == "original":
            job.loaded.model.load_state_dict(original)
        defence = defend(cfg.method, replace(job, tensors=t), cfg, emit)
        rounds.append({**record, "triggers": [x.describe() for x in fresh], "finetune_epochs": _epochs(defence)})
    pulled = None
    if sc.keep_flip is not None and not defence.changed:  # pruned units would come back part way: not pulled back
        emit(ProgressEvent("scan", message="pulling the weights back toward the original while the triggers stay out"))
        pulled = pull_back(job.loaded.model, original, triggers, pixels, labels, sc.keep_flip, sc.chunk_size or 256)
    elif sc.keep_flip is not None:
        pulled = {"share": 1.0, "keep_flip": sc.keep_flip, "note": "units were pruned: the defended weights are kept"}
    # what the scan's triggers (the evidence) still do to the saved weights: that every suspect's backdoor is gone.
    # Later rounds' triggers are left out: they are the defended model's next-easiest ways in, large natural
    # triggers (6-10 % patches) that any model has
    after = trigger_flips(job.loaded.model, scanned, pixels, labels, sc.chunk_size or 256)
    per_target = [{"class": c, "flip": max((f for x, f in zip(scanned, after) if x.target == c), default=0.0)}
                  for c in targets]
    return {"rounds": rounds, "rounds_from": sc.rounds_from, "pull_back": pulled, "defence": defence,
            "targets": targets, "flips_after": per_target}


def _epochs(defence: Defence) -> int:
    return defence.tune.epochs if defence.tune else 0


def scan_output_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output) if cfg.output else Path(f"./{model_name(cfg.model_shown)}-scan")


def run_scan(cfg: JobConfig, progress: ProgressCallback | None = None) -> tuple[ScanResult, dict, Path]:
    """`hf-gradprune scan`: detection only. Writes scan_report.json and one PNG per synthesised trigger; the model
    is not changed and no test set is read."""
    out = scan_output_dir_for(cfg)
    check_output(out, cfg.overwrite)
    emit = progress or (lambda event: None)
    t0 = time.perf_counter()
    procs = start(cfg.device, None)
    emit(ProgressEvent("load", message=f"loading {cfg.model_shown}"))
    loaded = load_model(cfg.model, cfg.revision, cfg.allow_pickle, cfg.trust_remote_code)
    emit(ProgressEvent("data", message=f"sampling {cfg.spc} images per class from {cfg.data_shown}"))
    data, meta = _load_data(cfg, loaded, with_test=False)
    target = _resolve_target(cfg.target, loaded, data.class_names)
    load_s = time.perf_counter() - t0
    batch = _batch_choice(cfg, loaded, data.train.pixels[:1], procs)
    found = _scan(cfg, loaded, data, target, emit, procs.device, batch)
    names = data.class_names or loaded.label_names
    images = {f"synthesised_trigger_{f}.png": t.image(data.val.pixels[0]) for f, t in found.triggers.items()}
    timing = {"load": load_s, **found.timing_s, "total": time.perf_counter() - t0}
    report = scan_report(cfg, loaded, found, meta, len(data.train) + len(data.val), (data.train_idx, data.val_idx),
                         list(images), out, timing)
    write_scan(out, cfg.overwrite, found, report, images)
    emit(ProgressEvent("done", message=verdict(found, names)))
    return found, report, out
