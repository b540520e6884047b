"""Every command-line option, defined once: the `defend` and `scan` commands add these groups to their parsers, and
`config.build_config` takes its defaults, types and choices from the same parsers, so the CLI, the Space and library
callers see one set of options.

Full flag names only (`allow_abbrev=False`): the published command is scrubbed flag by flag (config.py's
`published_argv`), and an abbreviation (--tok, --out) would slip a token or a path past it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .finetune import AUGMENTATIONS
from .job import BaselineConfig
from .methods import METHODS
from .parallel import MIXED_PRECISIONS
from .prune import NORMALISATIONS, SCORES, PruneConfig
from .recipes import DEFAULT_RECIPE, RECIPES, SYNTHESISED_TUNE_STEPS
from .synth import ROUNDS_FROM, SCAN_SELECTS, ScanConfig
from .triggers import TRIGGER_KINDS, UNKNOWN

if TYPE_CHECKING:
    from collections.abc import Callable


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="Hub model id (org/name) or a local folder in Hub layout")
    p.add_argument("--revision", help="branch, tag or commit of a Hub MODEL")


def add_data(p: argparse.ArgumentParser, evaluation: bool = True) -> None:
    """The clean few-shot images; `evaluation`: the test-set flags too (the defence measures, a scan does not)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="datasets Hub id or local folder with the clean images")
    g.add_argument("--data-revision")
    g.add_argument("--split", default="train", help="few-shot pool (default: train)")
    if evaluation:
        g.add_argument("--eval-split",
                       help="test set (default: 'test' if present, else the pool minus the few-shot draw)")
    g.add_argument("--image-column", help="default: the dataset's Image feature")
    g.add_argument("--label-column", help="default: the dataset's ClassLabel feature")
    g.add_argument("--spc", type=int, default=10, help="images per class, train + validation (default 10; 2 = 1 + 1)")
    if evaluation:
        g.add_argument("--val-ratio", type=float, default=0.1,
                       help="share of SPC used for validation (at least 1 per class)")
    g.add_argument("--seed", type=int, default=0)
    if evaluation:
        g.add_argument("--eval-limit", type=int, help="cap the test set at N images (seeded draw) for speed")


def add_trigger(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
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
    return g


def add_scan(g: argparse._ActionsContainer) -> None:
    """How the scan searches for a backdoor (`scan`, `--trigger unknown`, `--blind`)."""
    g.add_argument("--scan-steps", type=int, default=ScanConfig.steps,
                   help=f"optimisation steps per class and trigger family (default {ScanConfig.steps})")
    g.add_argument("--scan-threshold", type=float, default=ScanConfig.threshold,
                   help=f"anomaly index above which a class is a backdoor target (default {ScanConfig.threshold})")
    g.add_argument("--scan-classes", type=int, default=ScanConfig.max_classes,
                   help=f"classes synthesised for in full (default {ScanConfig.max_classes}); with more classes "
                        "--scan-select picks the suspects among them")
    g.add_argument("--scan-select", choices=SCAN_SELECTS, default=ScanConfig.select,
                   help="with more classes than --scan-classes, how the suspects are picked: screen (default; "
                        f"{ScanConfig.screen_steps} steps of every class's search on {ScanConfig.screen_batch} "
                        "images, the most promising continue; up to "
                        f"{ScanConfig.screen_classes} classes, above that the probe) or probe (one untargeted trigger "
                        "per family; its cost does not grow with the classes, but it misses targets)")


def add_synthesis(g: argparse._ActionsContainer) -> None:
    """How a defence against a synthesised trigger unlearns it (`--trigger unknown`, `--blind`)."""
    g.add_argument("--synth-rounds", type=int, default=ScanConfig.rounds,
                   help="--trigger unknown / --blind: synthesise -> unlearn rounds; each later round re-synthesises "
                        "the target's triggers on the defended model and unlearns them too "
                        f"(default {ScanConfig.rounds})")
    g.add_argument("--synth-from", choices=ROUNDS_FROM, default=ScanConfig.rounds_from,
                   help="what each later round defends against all triggers found so far: the original model "
                        "(default; accuracy lost to unlearning does not add up) or the last round's")
    g.add_argument("--keep-flip", type=float, default=ScanConfig.keep_flip,
                   help="--trigger unknown / --blind: after the last round, pull the weights back toward the original "
                        "model as far as no synthesised trigger sends more than this share of the other classes' "
                        f"few-shot images to the target (default {ScanConfig.keep_flip})")
    g.add_argument("--no-pull-back", action="store_true",
                   help="keep the defended weights as the last round left them")
    g.add_argument("--from-scan", metavar="DIR",
                   help="--trigger unknown / --blind: defend against the triggers that an earlier `hf-gradprune scan` "
                        "of this model synthesised (its output folder), the scan you reviewed, instead of scanning "
                        "again; refused when the weights differ from the scanned ones")


def add_defence(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--clean-views", type=int,
                   help="gradprune: shifted copies of each clean training image that also learn the original "
                        "model's output, so unlearning keeps its behaviour on more clean images (robust recipe with a "
                        "known trigger 4, else 0)")
    g.add_argument("--twin-repeats", type=int,
                   help="gradprune: rows each triggered twin takes in the fine-tuning set, its weight against the "
                        "clean images and their views (robust recipe with a known trigger 2, else 1)")
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


def add_output(g: argparse._ActionsContainer, default: str) -> None:
    g.add_argument("--output", help=f"output folder (default {default})")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def add_names(g: argparse._ActionsContainer) -> None:
    """How the card and report name a local MODEL / --data folder (names.py)."""
    g.add_argument("--source-id",
                   help="the Hub repo (org/name) a local MODEL folder lives at: the card and report name "
                        "it and the card's base_model is set to it (default: the folder's name only)")
    g.add_argument("--data-id", help="the Hub repo (org/name) a local --data folder lives at: the card and report name "
                                     "it and the card's datasets is set to it (default: the folder's name only)")


def add_hub(g: argparse._ActionsContainer) -> None:
    """Uploading a result (`defend --push`, `push`)."""
    g.add_argument("--repo-id", help="default <your user>/<model-name>-<method>")
    g.add_argument("--private", action="store_true")
    g.add_argument("--create-pr", action="store_true")
    g.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login); never written anywhere")


def add_safety(g: argparse._ActionsContainer) -> None:
    g.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin): runs code")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code")


def add_memory(g: argparse._ActionsContainer) -> None:
    g.add_argument("--batch-size", default="auto",
                   help="images per forward + backward pass (scoring, checks, evaluation; fine-tuning and synthesis "
                        "steps are accumulated over batches of this size); also the unit of work shared out to "
                        "processes. Default auto: the largest that fits --max-memory, measured on the model")
    g.add_argument("--max-memory", help="memory one batch may take, e.g. 4GiB (default: 2 GiB on a CPU, at most a "
                                        "quarter of the free RAM; 60 %% of the free memory on a GPU)")


def add_runtime(g: argparse._ActionsContainer, precision: bool = True) -> None:
    g.add_argument("--device", help="torch device for a single process (default: accelerate's choice)")
    if precision:
        g.add_argument("--mixed-precision", choices=list(MIXED_PRECISIONS),
                       help="fine-tuning precision (default: accelerate's config, else no); scoring stays fp32")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def defend_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag of `hf-gradprune defend` (and of the bare `hf-gradprune MODEL ...`)."""
    add_model(p)
    add_data(p)
    g = add_trigger(p)
    add_scan(g)
    add_synthesis(g)
    add_defence(p)
    g = p.add_argument_group("output and Hub")
    add_output(g, "./<model-name>-<method>")
    g.add_argument("--push", action="store_true", help="upload the output folder to the Hub")
    add_hub(g)
    add_names(g)
    g = p.add_argument_group("safety and runtime")
    add_safety(g)
    add_memory(g)
    add_runtime(g)
    return p


def scan_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag of `hf-gradprune scan`."""
    add_model(p)
    add_data(p, evaluation=False)
    g = p.add_argument_group("scan")
    g.add_argument("--target", default="auto", help="always scan this class (index or name)")
    g.add_argument("--fail-if-backdoored", action="store_true",
                   help="exit 1 when a backdoor is found (a release gate; bad input exits 2)")
    add_scan(g)
    g = p.add_argument_group("output")
    add_output(g, "./<model-name>-scan")
    add_names(g)
    g = p.add_argument_group("safety and runtime")
    add_safety(g)
    add_memory(g)
    add_runtime(g, precision=False)
    return p


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The options a parsed command line gives, as `config.build_config` takes them (the subcommand's own
    bookkeeping, `command` and `run`, left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}


def parser(flags: Callable[[argparse.ArgumentParser], argparse.ArgumentParser], prog: str,
           cls: type[argparse.ArgumentParser] = argparse.ArgumentParser, **kwargs: Any) -> argparse.ArgumentParser:
    """A stand-alone parser with one command's flags (build_config's defaults and types, published_argv)."""
    return flags(cls(prog=prog, allow_abbrev=False, **kwargs))
