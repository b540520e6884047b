"""`hf-gradprune defend MODEL --data DATA [--trigger ...] [--push]`: remove a backdoor (the bare
`hf-gradprune MODEL --data DATA` is this command)."""

from __future__ import annotations

import argparse

from ..config import build_config, redacted_command
from ..job import JobConfig
from ..names import model_name
from ..options import defend_flags, given, parser
from .console import progress_bars, push, resolve_repo_id, summary

HELP = "remove a backdoor (the default command: `hf-gradprune MODEL --data DATA` is `defend`)"
DESCRIPTION = ("Remove a backdoor from a timm / transformers image classifier (CNN, ViT, Swin, ConvNeXt) by "
               "unlearning: gradient-based pruning of filters / neurons / heads + fine-tuning (Dunnett et al., 2024), "
               "with the trigger given, synthesised (--trigger unknown) or hidden from the defence (--blind).")
EXAMPLES = """examples:
  hf-gradprune org/backdoored-resnet --data org/my-clean-images --spc 10 --trigger badnet
  hf-gradprune defend ./my-model --data ./my-images --trigger patch --trigger-image T.png --trigger-mask M.png
  hf-gradprune org/suspect-model --data org/my-clean-images --trigger unknown
  hf-gradprune org/backdoored-resnet --data org/my-clean-images --trigger badnet --blind   # honest evaluation
  hf-gradprune org/backdoored-resnet --data org/my-clean-images --method ftsam            # a baseline
  hf-gradprune org/backdoored-resnet --data org/my-clean-images --push --repo-id me/resnet-clean
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("defend", help=HELP, description=DESCRIPTION, epilog=EXAMPLES, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    defend_flags(p)
    p.set_defaults(run=run)


def job_config(argv: list[str], raising: bool = False) -> tuple[JobConfig, argparse.Namespace]:
    """The defence's command line -> (its JobConfig, the parsed flags), through `build_config` like every caller."""
    from ..config import _RaisingParser
    args = parser(defend_flags, "hf-gradprune defend", _RaisingParser if raising else argparse.ArgumentParser,
                  description=DESCRIPTION).parse_args(argv)
    cfg = build_config(vars(args))
    cfg.command = redacted_command(argv)  # the card's command: as typed, less the token and local paths
    return cfg, args


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..pipeline import run as run_job
    cfg = build_config(given(args))
    cfg.command = redacted_command(argv)
    progress = progress_bars(args.quiet)
    if args.push:  # before the long run: a missing login should not cost the user the whole defence
        cfg.repo_id = resolve_repo_id(args.repo_id, f"{model_name(cfg.model_shown)}-{args.method}", args.token)
    try:
        result = run_job(cfg, progress)
    finally:
        if progress:
            progress.close()
    if not result.is_main:  # `accelerate launch`: the main process reports and pushes
        return 0
    if not result.written:
        print(f"scan: {result.report['scan']['verdict']}\nnothing written: the model is left as it is "
              "(--force defends anyway)")
        return 0
    print(summary(result.report, result.output_dir))
    if args.push:
        return push(result.output_dir, cfg.repo_id, args.token, args.private, args.create_pr)
    return 0
