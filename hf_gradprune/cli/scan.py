"""`hf-gradprune scan MODEL --data DATA`: is the model backdoored, and to which class? (detection only)"""

from __future__ import annotations

import argparse

from ..config import build_config, redacted_command
from ..names import public_name
from ..options import given, scan_flags
from .console import EXIT_BACKDOORED, progress_bars

HELP = "detection only: is MODEL backdoored, and to which class?"
DESCRIPTION = ("Detection only: is MODEL backdoored, and to which class? Synthesises a patch-like and a blend-like "
               "trigger per scanned class from the few-shot images; writes scan_report.json and the synthesised "
               "triggers as PNG. Exit 0, or 1 with --fail-if-backdoored when one is found (2 on bad input).")
EXAMPLES = """examples:
  hf-gradprune scan org/suspect-model --data org/my-clean-images --spc 10
  hf-gradprune scan ./my-model --data ./my-images --fail-if-backdoored     # a release gate: exit 1 on a backdoor
  hf-gradprune scan org/suspect-model --data org/my-clean-images --scan-classes 20   # scan 20 classes in full
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("scan", help=HELP, description=DESCRIPTION, epilog=EXAMPLES, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    scan_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..pipeline import run_scan
    cfg = build_config(given(args), "scan")
    cfg.command = redacted_command(argv, "scan")  # as typed, less the token and local paths
    progress = progress_bars(args.quiet)
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
