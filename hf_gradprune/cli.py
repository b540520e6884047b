"""`hf-gradprune MODEL --data DATA [--push]`, `hf-gradprune demo`, `hf-gradprune push DIR`.

User errors print one line and exit 2; a failed upload exits 3 with the local folder intact and the retry command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .data import train_per_class
from .errors import UserError
from .finetune import AUGMENTATIONS, TuneConfig
from .job import BaselineConfig
from .memory import parse_batch_size, parse_memory
from .methods import METHODS
from .names import check_hub_id, file_name, local_name, model_name, public_name
from .prune import NORMALISATIONS, SCORES, PruneConfig
from .recipes import DEFAULT_RECIPE, RECIPES, SYNTHESISED_TUNE_STEPS, recipe_configs
from .synth import ScanConfig
from .triggers import TRIGGER_KINDS, UNKNOWN, TriggerSpec
from .units import count_kinds

if TYPE_CHECKING:
    from .pipeline import JobConfig

EXIT_USER, EXIT_PUSH = 2, 3
EXIT_BACKDOORED = 1  # `scan --fail-if-backdoored` found one


def _scan_flags(g) -> None:
    g.add_argument("--scan-steps", type=int, default=ScanConfig.steps,
                   help=f"optimisation steps per class and trigger family (default {ScanConfig.steps})")
    g.add_argument("--scan-threshold", type=float, default=ScanConfig.threshold,
                   help=f"anomaly index above which a class is a backdoor target (default {ScanConfig.threshold})")
    g.add_argument("--scan-classes", type=int, default=ScanConfig.max_classes,
                   help=f"classes synthesised for in full (default {ScanConfig.max_classes}); with more classes "
                        "--scan-select picks the suspects among them")
    g.add_argument("--scan-select", choices=("screen", "probe"), default=ScanConfig.select,
                   help="with more classes than --scan-classes, how the suspects are picked: screen (default; "
                        f"{ScanConfig.screen_steps} steps of every class's search on {ScanConfig.screen_batch} "
                        "images, the most promising continue; up to "
                        f"{ScanConfig.screen_classes} classes, above that the probe) or probe (one untargeted trigger "
                        "per family; its cost does not grow with the classes, but it misses targets)")
    g.add_argument("--synth-rounds", type=int, default=ScanConfig.rounds,
                   help="--trigger unknown / --blind: synthesise -> unlearn rounds; each later round re-synthesises "
                        "the target's triggers on the defended model and unlearns them too "
                        f"(default {ScanConfig.rounds})")
    g.add_argument("--synth-from", choices=("original", "defended"), default=ScanConfig.rounds_from,
                   help="what each later round defends against all triggers found so far: the original model "
                        "(default; accuracy lost to unlearning does not add up) or the last round's")
    g.add_argument("--keep-flip", type=float, default=ScanConfig.keep_flip,
                   help="--trigger unknown / --blind: after the last round, pull the weights back toward the original "
                        "model as far as no synthesised trigger sends more than this share of the other classes' "
                        f"few-shot images to the target (default {ScanConfig.keep_flip})")
    g.add_argument("--no-pull-back", action="store_true",
                   help="keep the defended weights as the last round left them")


def _memory_flags(g) -> None:
    g.add_argument("--batch-size", default="auto",
                   help="images per forward + backward pass (scoring, checks, evaluation; fine-tuning and synthesis "
                        "steps are accumulated over batches of this size); also the unit of work shared out to "
                        "processes. Default auto: the largest that fits --max-memory, measured on the model")
    g.add_argument("--max-memory", help="memory one batch may take, e.g. 4GiB (default: 2 GiB on a CPU, at most a "
                                        "quarter of the free RAM; 60 %% of the free memory on a GPU)")


def _scan_config(args) -> ScanConfig:
    for flag, value in (("--scan-steps", args.scan_steps), ("--scan-classes", args.scan_classes),
                        ("--synth-rounds", args.synth_rounds)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.scan_classes < ScanConfig.candidates + 1:
        raise UserError(f"--scan-classes {args.scan_classes}: must be at least {ScanConfig.candidates + 1} "
                        "(the suspects plus reference classes)")
    if not 0 <= args.keep_flip < 1:
        raise UserError(f"--keep-flip {args.keep_flip}: must be at least 0 and below 1 (a share of images); "
                        "--no-pull-back keeps the defended weights")
    if args.scan_threshold <= 0:
        raise UserError(f"--scan-threshold {args.scan_threshold}: must be positive")
    return ScanConfig(steps=args.scan_steps, threshold=args.scan_threshold, max_classes=args.scan_classes,
                      select=args.scan_select, rounds=args.synth_rounds, rounds_from=args.synth_from,
                      keep_flip=None if args.no_pull_back else args.keep_flip)


def _main_parser(cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    # full flag names only: the published command is scrubbed flag by flag (published_argv), and an abbreviation
    # (--tok, --out) would slip a token or a path past it
    p = cls(
        prog="hf-gradprune", allow_abbrev=False,
        description="Remove a backdoor from a timm / transformers image classifier (CNN, ViT, Swin, ConvNeXt) by "
                    "unlearning: gradient-based pruning of filters / neurons / heads + fine-tuning "
                    "(Dunnett et al., 2024). Other commands: 'hf-gradprune demo' (offline demo), "
                    "'hf-gradprune push DIR' (upload an output folder).")
    p.add_argument("model", metavar="MODEL", help="Hub model id (org/name) or a local folder in Hub layout")
    p.add_argument("--version", action="version", version=f"hf-gradprune {__version__}")
    p.add_argument("--revision", help="branch, tag or commit of a Hub MODEL")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="datasets Hub id or local folder with the clean images")
    g.add_argument("--data-revision")
    g.add_argument("--split", default="train", help="few-shot pool (default: train)")
    g.add_argument("--eval-split", help="test set (default: 'test' if present, else the pool minus the few-shot draw)")
    g.add_argument("--image-column", help="default: the dataset's Image feature")
    g.add_argument("--label-column", help="default: the dataset's ClassLabel feature")
    g.add_argument("--spc", type=int, default=10, help="images per class, train + validation (default 10; 2 = 1 + 1)")
    g.add_argument("--val-ratio", type=float, default=0.1,
                   help="share of SPC used for validation (at least 1 per class)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-limit", type=int, help="cap the test set at N images (seeded draw) for speed")
    g = p.add_argument_group("trigger (stamped in pixel space at the model's input size, before normalisation)")
    g.add_argument("--trigger", choices=(*TRIGGER_KINDS, UNKNOWN), default="badnet",
                   help="the attack's trigger; unknown: scan the model, synthesise the trigger from the few-shot "
                        "images and defend with it (a clean model is left untouched unless --force)")
    g.add_argument("--trigger-image", help="patch / blended: image file; additive: .npy perturbation in pixel units")
    g.add_argument("--trigger-mask", help="patch: mask image, 255 = trigger pixel")
    g.add_argument("--blend-alpha", type=float, default=0.2, help="blended: x' = (1-a) x + a t (default 0.2)")
    g.add_argument("--bpp-levels", type=int, default=8, help="bpp: colour levels per channel (default 8)")
    g.add_argument("--backdoor-data", help="your own triggered copies of --data (same splits, rows and true labels)")
    g.add_argument("--target", default="auto", help="target class index or name (default: auto, found from the data)")
    g.add_argument("--blind", action="store_true",
                   help="defend as under --trigger unknown, never showing the defence the given trigger; it only "
                        "measures ACC / ASR / RA (honest evaluation of the trigger-free defence)")
    g.add_argument("--force", action="store_true",
                   help="--trigger unknown / --blind: defend even when the scan finds no backdoor")
    _scan_flags(g)
    g = p.add_argument_group("defence")
    g.add_argument("--method", choices=list(METHODS), default="gradprune",
                   help="gradprune (default, the paper's method) or a baseline: ft, fp, nad, clp, ftsam, anp")
    g.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="gradprune: robust (default: no pruning at 5 or more training images per class unless "
                        "--max-rounds N, robust pruning below that; fine-tuning on clean + "
                        "triggered images at lr 0.001 cosine distils the original model's outputs on the clean images "
                        "and is selected on the unlearning loss) or paper (the paper's exact procedure)")
    g = p.add_argument_group("pruning (gradprune; --alpha also bounds fp's and anp's sweeps)")
    g.add_argument("--alpha", type=float, default=PruneConfig.alpha,
                   help="stop when val accuracy drops by more than this absolute fraction (default 0.10)")
    g.add_argument("--prune-patience", type=int, default=PruneConfig.patience, help="Pp (default 10)")
    g.add_argument("--max-rounds", type=int,
                   help="default: the recipe's (robust: 0, no pruning, measured best after its fine-tuning, or 500 "
                        "below 5 training images per class; paper 500). "
                        "N > 0 under the robust recipe prunes with its rules: bound on all few-shot images, a filter "
                        "that breaks it skipped")
    g.add_argument("--score", choices=SCORES, default=PruneConfig.score,
                   help="filter score: grad = mean |dL/dW| (paper, default); "
                        "grad_x_weight = mean |dL/dW * W| (variant)")
    g.add_argument("--score-norm", choices=NORMALISATIONS, default=PruneConfig.normalise,
                   help="layer: divide scores by their layer's mean before picking (variant; default none)")
    g = p.add_argument_group("fine-tuning (defaults: gradprune lr 0.001 cosine (paper recipe: 0.001 constant), no "
                             "augmentation; ft/fp/nad/ftsam lr 0.01 cosine, crop-flip)")
    g.add_argument("--tune-patience", type=int, help="Pt: early-stop patience on the val loss (default 10)")
    g.add_argument("--max-epochs", type=int, help="default 100")
    g.add_argument("--max-steps", type=int,
                   help="end fine-tuning (and its cosine schedule) after about this many optimiser steps, at most "
                        f"--max-epochs; 0: no step limit (default: {SYNTHESISED_TUNE_STEPS} for Grad-Prune against a "
                        "synthesised trigger, else none)")
    g.add_argument("--lr", type=float)
    g.add_argument("--tune-batch-size", type=int, help="default 128")
    g.add_argument("--distill", type=float,
                   help="gradprune: weight of distilling the original model's output on each clean image into the "
                        "image and its triggered twin (robust recipe 3; paper 0 = true labels only)")
    g.add_argument("--augment", choices=AUGMENTATIONS,
                   help="crop = random crop with 1/8-side zero padding; crop-flip adds horizontal flips (off for "
                        "images where left and right differ in meaning, e.g. traffic signs)")
    g = p.add_argument_group("baselines")
    g.add_argument("--fp-step", type=float, default=BaselineConfig.fp_step,
                   help="fp: share of channels per step (0.01)")
    g.add_argument("--nad-teacher-epochs", type=int, default=BaselineConfig.nad_teacher_epochs)
    g.add_argument("--clp-u", type=float, default=BaselineConfig.clp_u, help="clp: prune above mean + u * std (3)")
    g.add_argument("--sam-rho", type=float, default=BaselineConfig.sam_rho, help="ftsam: rho (CIFAR-10 2.0, GTSRB 8.0)")
    g.add_argument("--label-smoothing", type=float, default=BaselineConfig.sam_label_smoothing,
                   help="ftsam: (CIFAR-10 0.1, GTSRB 0.0)")
    g.add_argument("--anp-iters", type=int, default=BaselineConfig.anp_iters, help="anp: mask iterations (2000)")
    g.add_argument("--anp-eps", type=float, default=BaselineConfig.anp_eps)
    g = p.add_argument_group("output and Hub")
    g.add_argument("--output", help="output folder (default ./<model-name>-gradprune)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    g.add_argument("--push", action="store_true", help="upload the output folder to the Hub")
    g.add_argument("--repo-id", help="default <your user>/<model-name>-<method>")
    g.add_argument("--source-id",
                   help="the Hub repo (org/name) a local MODEL folder lives at: the card and report name "
                        "it and the card's base_model is set to it (default: the folder's name only)")
    g.add_argument("--data-id", help="the Hub repo (org/name) a local --data folder lives at: the card and report name "
                                     "it and the card's datasets is set to it (default: the folder's name only)")
    g.add_argument("--private", action="store_true")
    g.add_argument("--create-pr", action="store_true")
    g.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login); never written anywhere")
    g = p.add_argument_group("safety and runtime")
    g.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin): runs code")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code")
    _memory_flags(g)
    g.add_argument("--device", help="torch device for a single process (default: accelerate's choice)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="fine-tuning precision (default: accelerate's config, else no); scoring stays fp32")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-gradprune push",
                                description="Upload an hf-gradprune output folder to the Hub.")
    p.add_argument("folder")
    p.add_argument("--repo-id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--revision", help="branch or PR ref (refs/pr/N) to commit to, e.g. to retry into an opened PR")
    p.add_argument("--token")
    return p


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-gradprune demo",
                                description="Offline demo: plant a BadNets backdoor in a small timm CNN trained on "
                                            "scikit-learn's digits, then remove it with the main job.")
    p.add_argument("--workdir", default="hf-gradprune-demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


_DROPPED = ("--token", "--source-id", "--data-id")  # a secret, and ids the published MODEL / --data already are


def _published_values(args: argparse.Namespace) -> dict[str, str | None]:
    """Each path-valued flag -> how the published command names its value (names.py); "MODEL": the positional."""
    files = {flag: value and file_name(value) for flag, value in (("--trigger-image", args.trigger_image),
                                                                  ("--trigger-mask", args.trigger_mask))}
    return {"MODEL": public_name(args.model, args.source_id), "--data": public_name(args.data, args.data_id),
            "--backdoor-data": args.backdoor_data and public_name(args.backdoor_data),
            "--output": args.output and local_name(args.output), **files}


def published_argv(argv: list[str]) -> list[str]:
    """The command line as the card, the report and the Space show it: the token dropped, every local path by its
    public name, --source-id / --data-id shown as MODEL / --data themselves."""
    args = _main_parser(_RaisingParser).parse_args(argv)
    shown = _published_values(args)
    out, i = [], 0
    while i < len(argv):
        flag, eq, _ = argv[i].partition("=")
        takes = 1 if eq else 2  # --flag=value or --flag value
        if flag in _DROPPED:
            i += takes
        elif flag in shown:
            out += [f"{flag}={shown[flag]}"] if eq else [flag, str(shown[flag])]
            i += takes
        else:
            out.append(shown["MODEL"] if argv[i] == args.model else argv[i])
            i += 1
    return out


def redacted_command(argv: list[str]) -> str:
    """The command for the card and report: the one typed, as published_argv shows it."""
    return shlex.join(["hf-gradprune", *published_argv(argv)])


class TqdmProgress:
    """Progress events -> one tqdm bar per stage, on stderr."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        from tqdm.auto import tqdm
        units = {"prune": "round", "finetune": "epoch", "scan": "trigger"}
        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            if event.message:
                print(f"[hf-gradprune] {event.message}", file=sys.stderr)
        if self.bar is None and event.stage in units and event.total:
            self.bar = tqdm(total=event.total, desc=event.stage, unit=units[event.stage], file=sys.stderr,
                            dynamic_ncols=True)
        if self.bar is not None and event.step:
            self.bar.update(event.step - self.bar.n)
            vals = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in event.values.items() if v is not None}
            self.bar.set_postfix(vals, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _units(changed: list[dict]) -> str:
    """[{"kind": "head", ...}, {"kind": "neuron", ...}] -> "2 units (1 head, 1 neuron)"."""
    detail = ", ".join(f"{n} {k}" for k, n in count_kinds(changed).items())
    return f"{len(changed)} unit{'s' if len(changed) != 1 else ''}" + (f" ({detail})" if detail else "")


def _summary(report: dict, out: Path) -> str:
    b, a, t = report["before"], report["after"], report["target"]
    name = f" ({t['name']})" if t.get("name") else ""
    lines = [f"target class: {t['index']}{name}{' [auto]' if t['auto'] else ''}",
             *([f"scan: {report['scan']['verdict']}; trigger synthesised, ASR measured with "
                f"{report['scan']['asr_measured_with']}"] if "scan" in report else []),
             f"method {report['method']['title']}: zeroed {_units(report['pruned'])}, fine-tuned "
             f"{report['finetune_epochs']} epochs",
             f"{'':8}{'before':>9}{'after':>9}"]
    for key, label in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA")):
        lines.append(f"{label:8}{100 * b[key]:8.2f}%{100 * a[key]:8.2f}%")
    lines.append(f"output: {out}")
    return "\n".join(lines)


def _retry_command(out: Path, repo_id: str, private: bool, create_pr: bool, revision: str | None) -> str:
    args = ["hf-gradprune", "push", str(out), "--repo-id", repo_id] + (["--private"] if private else [])
    if revision:  # a PR already opened: retry into it rather than opening another
        args += ["--revision", revision]
    elif create_pr:
        args += ["--create-pr"]
    return shlex.join(args)


def _push(out: Path, repo_id: str, token: str | None, private: bool, create_pr: bool,
          revision: str | None = None) -> int:
    from .hub import PushFailed, failure_reason, push_folder
    try:
        url = push_folder(out, repo_id, token=token, private=private, create_pr=create_pr, revision=revision)
    except PushFailed as failed:  # network, auth, permissions: whatever it is, the local folder stays
        print(f"hf-gradprune: error: upload to {repo_id} failed ({failure_reason(failed.cause, token)}); the sanitised "
              f"model is intact in {out}; retry with: "
              f"{_retry_command(out, repo_id, private, create_pr, failed.revision)}",
              file=sys.stderr)
        return EXIT_PUSH
    except KeyboardInterrupt:
        print(f"hf-gradprune: upload interrupted; the sanitised model is intact in {out}; retry with: "
              f"{_retry_command(out, repo_id, private, create_pr, revision)}", file=sys.stderr)
        return 130
    print(f"pushed: {url}")
    return 0


def _resolve_repo_id(repo_id: str | None, model_name: str, token: str | None) -> str:
    if repo_id:
        return repo_id
    from .hub import default_repo_id
    try:
        return default_repo_id(model_name, token)
    except Exception as e:
        raise UserError(f"--push: cannot find your Hub user name ({type(e).__name__}); log in with 'hf auth login', "
                        "set HF_TOKEN, or give --repo-id") from None


class _RaisingParser(argparse.ArgumentParser):
    """For callers that are not a terminal (the Space): a bad flag is a UserError, not a usage dump + exit."""

    def error(self, message: str):
        raise UserError(message)


def job_config(argv: list[str], raising: bool = False) -> tuple[JobConfig, argparse.Namespace]:
    """The command line -> the pipeline's JobConfig, with every check the CLI makes (the Space builds an argv too,
    so both give the same job and the same error messages)."""
    from .pipeline import JobConfig
    args = _main_parser(_RaisingParser if raising else argparse.ArgumentParser).parse_args(argv)
    trigger = TriggerSpec(args.trigger, args.trigger_image, args.trigger_mask, args.blend_alpha, args.bpp_levels)
    prune, tune = recipe_configs(args.recipe, train_per_class(args.spc, args.val_ratio),
                                 synthesised=args.blind or args.trigger == UNKNOWN)
    cfg = JobConfig(model=args.model, data=args.data, output=args.output, revision=args.revision,
                    data_revision=args.data_revision, split=args.split, eval_split=args.eval_split,
                    image_column=args.image_column, label_column=args.label_column, spc=args.spc,
                    val_ratio=args.val_ratio, seed=args.seed, eval_limit=args.eval_limit, trigger=trigger,
                    backdoor_data=args.backdoor_data, target=args.target,
                    recipe=args.recipe, method=args.method,
                    tune=_tune(tune if args.distill is None else replace(tune, distill=args.distill), args),
                    prune=replace(prune, alpha=args.alpha, patience=args.prune_patience, score=args.score,
                                  normalise=args.score_norm,
                                  max_rounds=prune.max_rounds if args.max_rounds is None else args.max_rounds),
                    baseline=BaselineConfig(tune=_tune(replace(BaselineConfig().tune, alpha=args.alpha), args),
                                            fp_step=args.fp_step,
                                            nad_teacher_epochs=args.nad_teacher_epochs, clp_u=args.clp_u,
                                            sam_rho=args.sam_rho, sam_label_smoothing=args.label_smoothing,
                                            anp_iters=args.anp_iters, anp_eps=args.anp_eps),
                    batch_size=parse_batch_size(args.batch_size), max_memory=parse_memory(args.max_memory),
                    allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, device=args.device,
                    mixed_precision=args.mixed_precision, source_id=args.source_id, data_id=args.data_id,
                    blind=args.blind, force=args.force, scan=_scan_config(args))
    _check_numbers(args)
    check_hub_id("--source-id", args.source_id, args.model, "MODEL")
    check_hub_id("--data-id", args.data_id, args.data, "--data")
    cfg.command = redacted_command(argv)
    return cfg, args


def main_job(argv: list[str]) -> int:
    cfg, args = job_config(argv)
    from .pipeline import run
    if args.quiet:
        _quiet_libraries()
    if args.push:  # before the long run: a missing login should not cost the user the whole defence
        cfg.repo_id = _resolve_repo_id(args.repo_id, f"{model_name(cfg.model_shown)}-{args.method}", args.token)
    progress = None if args.quiet else TqdmProgress()
    try:
        result = run(cfg, progress)
    finally:
        if progress:
            progress.close()
    if not result.is_main:  # `accelerate launch`: the main process reports and pushes
        return 0
    if not result.written:
        print(f"scan: {result.report['scan']['verdict']}\nnothing written: the model is left as it is "
              "(--force defends anyway)")
        return 0
    print(_summary(result.report, result.output_dir))
    if args.push:
        return _push(result.output_dir, cfg.repo_id, args.token, args.private, args.create_pr)
    return 0


def _tune(defaults: TuneConfig, args) -> TuneConfig:
    """The fine-tuning flags override the chosen method's defaults only where given."""
    given = {"lr": args.lr, "batch_size": args.tune_batch_size, "patience": args.tune_patience,
             "max_epochs": args.max_epochs, "augment": args.augment}
    tune = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    return tune if args.max_steps is None else replace(tune, max_steps=args.max_steps or None)


def _check_numbers(args) -> None:
    if not 0 <= args.alpha < 1:
        raise UserError(f"--alpha {args.alpha}: must be a fraction in [0, 1)")
    for flag, value in (("--prune-patience", args.prune_patience), ("--max-rounds", args.max_rounds),
                        ("--tune-patience", args.tune_patience),
                        ("--tune-batch-size", args.tune_batch_size), ("--nad-teacher-epochs", args.nad_teacher_epochs),
                        ("--anp-iters", args.anp_iters)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.max_epochs is not None and args.max_epochs < 0:
        raise UserError(f"--max-epochs {args.max_epochs}: must be 0 or more")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f"--max-steps {args.max_steps}: must be 0 (no step limit) or more")
    if args.distill is not None and args.distill < 0:
        raise UserError(f"--distill {args.distill}: must be 0 or more")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if not 0 < args.fp_step < 1:
        raise UserError(f"--fp-step {args.fp_step}: must be a fraction in (0, 1)")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    for flag, value in (("--clp-u", args.clp_u), ("--sam-rho", args.sam_rho), ("--anp-eps", args.anp_eps)):
        if value < 0:
            raise UserError(f"{flag} {value}: must be 0 or more")


def _quiet_libraries() -> None:
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    datasets.disable_progress_bars()
    disable_progress_bars()


def push_command(argv: list[str]) -> int:
    args = _push_parser().parse_args(argv)
    out = Path(args.folder)
    report_file = out / "gradprune_report.json"
    if not report_file.is_file():
        raise UserError(f"push {out}: no gradprune_report.json, so not an hf-gradprune output folder")
    try:
        report = json.loads(report_file.read_text())
        source, method = report["source"]["model"], report.get("tool", {}).get("method", "gradprune")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"push {out}: gradprune_report.json is not a valid hf-gradprune report ({type(e).__name__}); "
                        "re-run the defence to write it") from None
    if "hub_id" not in report["source"]:  # written before names.py: its card and report may hold this machine's paths
        raise UserError(f"push {out}: written by an older hf-gradprune, whose card and report can name local paths; "
                        "re-run the defence to write ones that are safe to publish")
    repo_id = _resolve_repo_id(args.repo_id, f"{model_name(str(source))}-{method}", args.token)
    return _push(out, repo_id, args.token, args.private, args.create_pr, args.revision)


def _scan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-gradprune scan", allow_abbrev=False,
        description="Detection only: is MODEL backdoored, and to which class? Synthesises a patch-like and a "
                    "blend-like trigger per scanned class from the few-shot images; writes scan_report.json and the "
                    "synthesised triggers as PNG. Exit 0, or 1 with --fail-if-backdoored when one is found.")
    p.add_argument("model", metavar="MODEL", help="Hub model id (org/name) or a local folder in Hub layout")
    p.add_argument("--revision")
    p.add_argument("--data", required=True, help="datasets Hub id or local folder with clean labelled images")
    p.add_argument("--data-revision")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.add_argument("--spc", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="auto", help="always scan this class (index or name)")
    p.add_argument("--output", help="output folder (default ./<model-name>-scan)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fail-if-backdoored", action="store_true", help="exit 1 when a backdoor is found (CI gates)")
    p.add_argument("--source-id", help="the Hub repo a local MODEL folder lives at (named in the report)")
    p.add_argument("--data-id", help="the Hub repo a local --data folder lives at")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    _memory_flags(p)
    _scan_flags(p)
    return p


def scan_command(argv: list[str]) -> int:
    args = _scan_parser().parse_args(argv)
    from .pipeline import JobConfig, run_scan
    if args.quiet:
        _quiet_libraries()
    check_hub_id("--source-id", args.source_id, args.model, "MODEL")
    check_hub_id("--data-id", args.data_id, args.data, "--data")
    cfg = JobConfig(model=args.model, data=args.data, output=args.output, revision=args.revision,
                    data_revision=args.data_revision, split=args.split, image_column=args.image_column,
                    label_column=args.label_column, spc=args.spc, seed=args.seed, target=args.target,
                    trigger=TriggerSpec(UNKNOWN), allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, device=args.device,
                    source_id=args.source_id, data_id=args.data_id, scan=_scan_config(args),
                    batch_size=parse_batch_size(args.batch_size), max_memory=parse_memory(args.max_memory))
    # the published command: model and data by their public names, never a path of this machine or a token
    cfg.command = shlex.join(["hf-gradprune", "scan", cfg.model_shown, "--data", cfg.data_shown, "--spc",
                              str(args.spc), "--seed", str(args.seed), "--scan-steps", str(args.scan_steps)])
    progress = None if args.quiet else TqdmProgress()
    try:
        found, report, out = run_scan(cfg, progress)
    finally:
        if progress:
            progress.close()
    print(f"{public_name(args.model, args.source_id)}: {report['verdict']}")
    print(f"evidence: {report['evidence']}")
    print(f"report: {out / 'scan_report.json'}; synthesised triggers: "
          + ", ".join(str(out / f) for f in report["files"] if f.endswith(".png")))
    return EXIT_BACKDOORED if found.backdoored and args.fail_if_backdoored else 0


def demo_command(argv: list[str]) -> int:
    args = _demo_parser().parse_args(argv)
    import time

    from .demo import run_demo
    if args.quiet:
        _quiet_libraries()
    t0 = time.perf_counter()
    progress = None if args.quiet else TqdmProgress()
    try:
        result = run_demo(Path(args.workdir), progress, seed=args.seed)
    finally:
        if progress:
            progress.close()
    print(_summary(result.report, result.output_dir))
    print(f"demo time: {time.perf_counter() - t0:.1f} s (training the backdoored model: "
          f"{result.report['timing_s']['demo_build']:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo_command, "push": push_command, "scan": scan_command}
    try:
        if argv and argv[0] in commands:
            code = commands[argv[0]](argv[1:])
        else:
            code = main_job(argv)
    except UserError as e:
        print(f"hf-gradprune: error{_process_tag()}: {e}", file=sys.stderr)
        code = EXIT_USER
    except KeyboardInterrupt:
        print("hf-gradprune: interrupted before the output was complete; nothing was written to it", file=sys.stderr)
        code = 130
    return code


def _process_tag() -> str:
    """Under `accelerate launch` each process says who it is, so an error on one of them is not a mystery."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""


def entry() -> None:
    sys.exit(main())
