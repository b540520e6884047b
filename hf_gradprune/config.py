"""Options -> JobConfig, once: every check and the recipe, for the CLI (its parsed flags), the Space (its form) and
library callers (a dict) alike.

    from hf_gradprune import build_config, run
    cfg = build_config({"model": "org/backdoored-resnet", "data": "org/my-clean-images", "trigger": "badnet"})
    result = run(cfg)

Keys are the flags' names with dashes as underscores (`--scan-steps` -> `scan_steps`); a key left out takes the
flag's default, a value the flag would refuse is refused with the flag's one-line message.
"""

from __future__ import annotations

import argparse
import functools
import shlex
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal, NoReturn

from .data import train_per_class
from .errors import UserError
from .finetune import TuneConfig
from .job import BaselineConfig, JobConfig
from .memory import parse_batch_size, parse_memory
from .methods import METHODS
from .names import check_hub_id, file_name, local_name, public_name
from .options import defend_flags, parser, scan_flags
from .parallel import MIXED_PRECISIONS
from .recipes import recipe_configs
from .synth import ScanConfig
from .triggers import UNKNOWN, TriggerSpec

Command = Literal["defend", "scan"]


class _RaisingParser(argparse.ArgumentParser):
    """For callers that are not a terminal (the Space, published_argv): a bad flag is a UserError, not a usage dump
    and exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


@functools.cache
def _parser(command: Command) -> argparse.ArgumentParser:
    flags = {"defend": defend_flags, "scan": scan_flags}[command]
    return parser(flags, f"hf-gradprune {command}", _RaisingParser)


def _actions(command: Command) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _parser(command)._actions if a.dest != "help"}


def _flag(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()


def defaults(command: Command = "defend") -> dict[str, Any]:
    """Every option of the command with its default (the required MODEL and --data: None)."""
    return {dest: None if a.required else a.default for dest, a in _actions(command).items()}


def _value(action: argparse.Action, value: Any) -> Any:
    """A value as the flag would take it from a command line (the Space's number boxes give floats)."""
    flag = _flag(action)
    if value is None:
        return None
    if isinstance(action, argparse._StoreTrueAction) and not isinstance(value, bool):
        raise UserError(f"{flag}: give True or False, not {value!r}")
    if action.type is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise UserError(f"{flag} {value}: must be a whole number")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag} {value}: must be a whole number") from None
    elif action.type is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag} {value}: must be a number") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{flag} {value}: choose one of {', '.join(map(str, action.choices))}")
    return value


def options(values: Mapping[str, Any], command: Command = "defend") -> argparse.Namespace:
    """The values, checked one by one against the command's flags, with every default filled in."""
    actions = _actions(command)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"{unknown[0]}: not an option of hf-gradprune {command}; options are the flags' names with "
                        "dashes as underscores (--scan-steps: scan_steps)")
    merged = {**defaults(command), **{k: _value(actions[k], v) for k, v in values.items()}}
    for dest, action in actions.items():
        if action.required and not merged[dest]:
            raise UserError(f"{_flag(action)}: required")
    return argparse.Namespace(**merged)


def _at_least(flag: str, value: int | float | None, low: int | float, what: str) -> None:
    if value is not None and value < low:
        raise UserError(f"{flag} {value}: must be {what}")


def _check_scan(o: argparse.Namespace) -> ScanConfig:
    for flag, value in (("--scan-steps", o.scan_steps), ("--scan-classes", o.scan_classes)):
        _at_least(flag, value, 1, "at least 1")
    if o.scan_classes < ScanConfig.candidates + 1:
        raise UserError(f"--scan-classes {o.scan_classes}: must be at least {ScanConfig.candidates + 1} "
                        "(the suspects plus reference classes)")
    if o.scan_threshold <= 0:
        raise UserError(f"--scan-threshold {o.scan_threshold}: must be positive")
    cfg = ScanConfig(steps=o.scan_steps, threshold=o.scan_threshold, max_classes=o.scan_classes, select=o.scan_select)
    if "synth_rounds" not in o:  # `scan`: no defence rounds
        return cfg
    _at_least("--synth-rounds", o.synth_rounds, 1, "at least 1")
    if not 0 <= o.keep_flip < 1:
        raise UserError(f"--keep-flip {o.keep_flip}: must be at least 0 and below 1 (a share of images); "
                        "--no-pull-back keeps the defended weights")
    return replace(cfg, rounds=o.synth_rounds, rounds_from=o.synth_from,
                   keep_flip=None if o.no_pull_back else o.keep_flip)


def _check_defence(o: argparse.Namespace) -> None:
    if not 0 <= o.alpha < 1:
        raise UserError(f"--alpha {o.alpha}: must be a fraction in [0, 1)")
    for flag, value in (("--prune-patience", o.prune_patience), ("--max-rounds", o.max_rounds),
                        ("--tune-patience", o.tune_patience), ("--tune-batch-size", o.tune_batch_size),
                        ("--nad-teacher-epochs", o.nad_teacher_epochs), ("--anp-iters", o.anp_iters)):
        _at_least(flag, value, 1, "at least 1")
    _at_least("--max-epochs", o.max_epochs, 0, "0 or more")
    _at_least("--max-steps", o.max_steps, 0, "0 (no step limit) or more")
    _at_least("--distill", o.distill, 0, "0 or more")
    _at_least("--clean-views", o.clean_views, 0, "0 (none) or more")
    _at_least("--twin-repeats", o.twin_repeats, 1, "at least 1")
    if o.lr is not None and o.lr <= 0:
        raise UserError(f"--lr {o.lr}: must be positive")
    if not 0 < o.fp_step < 1:
        raise UserError(f"--fp-step {o.fp_step}: must be a fraction in (0, 1)")
    if not 0 <= o.label_smoothing < 1:
        raise UserError(f"--label-smoothing {o.label_smoothing}: must be in [0, 1)")
    for flag, value in (("--clp-u", o.clp_u), ("--sam-rho", o.sam_rho), ("--anp-eps", o.anp_eps)):
        _at_least(flag, value, 0, "0 or more")


def check_job(cfg: JobConfig) -> None:
    """The checks that concern the job as a whole, not one option: `build_config` makes them, and `pipeline.run`
    again for a JobConfig built by hand."""
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method}: unknown; choose one of {', '.join(METHODS)}")
    if cfg.mixed_precision not in (None, *MIXED_PRECISIONS):
        raise UserError(f"--mixed-precision {cfg.mixed_precision}: choose no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and cfg.method == "ftsam":
        raise UserError("--mixed-precision fp16: FT-SAM's two-step optimiser cannot run under a gradient scaler; "
                        "use bf16 or no")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise UserError(f"--eval-limit {cfg.eval_limit}: must be at least 1")
    if cfg.blind and cfg.trigger.kind == UNKNOWN and not cfg.backdoor_data:
        raise UserError("--blind needs the real trigger (--trigger KIND or --backdoor-data) to measure with; without "
                        "one, use --trigger unknown")
    if cfg.trigger.kind == UNKNOWN and cfg.backdoor_data:
        raise UserError("--trigger unknown with --backdoor-data: the triggered copies are the trigger; drop "
                        "--trigger unknown, or add --blind to defend without them and measure with them")
    if cfg.from_scan is not None:
        if not cfg.synthesises:
            raise UserError(f"--from-scan {cfg.from_scan}: only --trigger unknown / --blind defend against a scan's "
                            "triggers; add one of them, or drop --from-scan")
        if cfg.target != "auto":
            raise UserError(f"--from-scan with --target {cfg.target}: the scan named the target; drop --target")
    if cfg.force and not cfg.synthesises:
        raise UserError("--force only applies to --trigger unknown / --blind (defend even when the scan finds no "
                        "backdoor); drop it")


def _tune(defaults: TuneConfig, o: argparse.Namespace) -> TuneConfig:
    """The fine-tuning flags override the chosen method's defaults only where given."""
    given = {"lr": o.lr, "batch_size": o.tune_batch_size, "patience": o.tune_patience,
             "max_epochs": o.max_epochs, "augment": o.augment}
    tune = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    return tune if o.max_steps is None else replace(tune, max_steps=o.max_steps or None)


def build_config(values: Mapping[str, Any], command: Command = "defend") -> JobConfig:
    """The job a command runs, from its options (see the module's docstring). `scan`: detection only."""
    o = options(values, command)
    check_hub_id("--source-id", o.source_id, o.model, "MODEL")
    check_hub_id("--data-id", o.data_id, o.data, "--data")
    scan = _check_scan(o)
    common = dict(model=o.model, data=o.data, output=o.output, revision=o.revision, data_revision=o.data_revision,
                  split=o.split, image_column=o.image_column, label_column=o.label_column, spc=o.spc, seed=o.seed,
                  target=o.target, allow_pickle=o.allow_pickle, trust_remote_code=o.trust_remote_code,
                  overwrite=o.overwrite, device=o.device, source_id=o.source_id, data_id=o.data_id, scan=scan,
                  batch_size=parse_batch_size(o.batch_size), max_memory=parse_memory(o.max_memory))
    if command == "scan":
        cfg = JobConfig(**common, trigger=TriggerSpec(UNKNOWN))
        cfg.command = redacted_command(_argv(o, command), command)
        return cfg
    _check_defence(o)
    prune, tune = recipe_configs(o.recipe, train_per_class(o.spc, o.val_ratio),
                                 synthesised=o.blind or o.trigger == UNKNOWN)
    cfg = JobConfig(
        **common, eval_split=o.eval_split, val_ratio=o.val_ratio, eval_limit=o.eval_limit,
        trigger=TriggerSpec(o.trigger, o.trigger_image, o.trigger_mask, o.blend_alpha, o.bpp_levels),
        backdoor_data=o.backdoor_data, recipe=o.recipe, method=o.method,
        tune=_tune(replace(tune, **{k: v for k, v in (("distill", o.distill), ("clean_views", o.clean_views),
                                                          ("twin_repeats", o.twin_repeats)) if v is not None}), o),
        prune=replace(prune, alpha=o.alpha, patience=o.prune_patience, score=o.score, normalise=o.score_norm,
                      max_rounds=prune.max_rounds if o.max_rounds is None else o.max_rounds),
        baseline=BaselineConfig(tune=_tune(replace(BaselineConfig().tune, alpha=o.alpha), o), fp_step=o.fp_step,
                                nad_teacher_epochs=o.nad_teacher_epochs, clp_u=o.clp_u, sam_rho=o.sam_rho,
                                sam_label_smoothing=o.label_smoothing, anp_iters=o.anp_iters, anp_eps=o.anp_eps),
        mixed_precision=o.mixed_precision, blind=o.blind, force=o.force, from_scan=o.from_scan)
    check_job(cfg)
    cfg.command = redacted_command(_argv(o, command), command)
    return cfg


def command_argv(values: Mapping[str, Any], command: Command = "defend") -> list[str]:
    """The command line that gives these options: MODEL, then each flag whose value is not its default (the command
    a person would type for the Space's form or a library call)."""
    return _argv(options(values, command), command)


def _argv(o: argparse.Namespace, command: Command) -> list[str]:
    out = [o.model]
    for dest, action in _actions(command).items():
        value = getattr(o, dest)
        if not action.option_strings or value == action.default and not action.required:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            out.append(_flag(action))
        else:
            out += [_flag(action), str(value)]
    return out


_DROPPED = ("--token", "--source-id", "--data-id")  # a secret, and ids the published MODEL / --data already are


def published_argv(argv: list[str], command: Command = "defend") -> list[str]:
    """A command line (the flags after the command's name) as the card, the report and the Space show it: the token
    dropped, every local path by its public name (names.py), --source-id / --data-id shown as MODEL / --data."""
    args = _parser(command).parse_args(argv)
    files = {flag: getattr(args, dest, None) and file_name(getattr(args, dest))
             for flag, dest in (("--trigger-image", "trigger_image"), ("--trigger-mask", "trigger_mask"))}
    backdoor_data = getattr(args, "backdoor_data", None)
    shown = {"MODEL": public_name(args.model, args.source_id), "--data": public_name(args.data, args.data_id),
             "--backdoor-data": backdoor_data and public_name(backdoor_data),
             "--output": args.output and local_name(args.output),
             "--from-scan": getattr(args, "from_scan", None) and local_name(args.from_scan), **files}
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


def redacted_command(argv: list[str], command: Command = "defend") -> str:
    """The command for the card and report: the one typed, as published_argv shows it. A defence is shown in its
    documented bare form (hf-gradprune MODEL ...), any other command by its name."""
    return shlex.join(["hf-gradprune", *([] if command == "defend" else [command]), *published_argv(argv, command)])
