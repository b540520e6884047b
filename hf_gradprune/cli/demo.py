"""`hf-gradprune demo`: plant a BadNets backdoor in a small timm CNN on scikit-learn's digits and remove it, offline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .console import progress_bars, summary

HELP = "offline demo: plant a backdoor in a small digits CNN, then remove it"
EXAMPLES = """examples:
  hf-gradprune demo
  hf-gradprune demo --workdir /tmp/hf-gradprune-demo --seed 1 --quiet
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help=HELP, epilog=EXAMPLES, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Offline demo: plant a BadNets backdoor in a small timm CNN trained on "
                                        "scikit-learn's digits, then remove it with the defence's own job.")
    p.add_argument("--workdir", default="hf-gradprune-demo", help="where the model, data and result go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..demo import run_demo
    t0 = time.perf_counter()
    progress = progress_bars(args.quiet)
    try:
        result = run_demo(Path(args.workdir), progress, seed=args.seed)
    finally:
        if progress:
            progress.close()
    print(summary(result.report, result.output_dir))
    print(f"demo time: {time.perf_counter() - t0:.1f} s (training the backdoored model: "
          f"{result.report['timing_s']['demo_build']:.1f} s)")
    return 0
