"""`hf-gradprune COMMAND`: defend (the default), scan, push, demo; one module per command.

User errors print one line and exit 2; a failed upload exits 3 with the local folder intact and the retry command;
`scan --fail-if-backdoored` exits 1 when it finds a backdoor.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import published_argv, redacted_command
from ..errors import UserError
from . import defend, demo, push, scan
from .console import EXIT_BACKDOORED, EXIT_PUSH, EXIT_USER, process_tag
from .defend import job_config

COMMANDS = {"defend": defend, "scan": scan, "push": push, "demo": demo}
EXAMPLES = """examples:
  hf-gradprune demo                                                         # offline
  hf-gradprune org/backdoored-resnet --data org/my-clean-images --trigger badnet --push
  hf-gradprune scan org/suspect-model --data org/my-clean-images --fail-if-backdoored
  hf-gradprune org/suspect-model --data org/my-clean-images --trigger unknown
  hf-gradprune push ./backdoored-resnet-gradprune --repo-id me/resnet-clean

`hf-gradprune MODEL --data DATA ...` is `hf-gradprune defend MODEL --data DATA ...`; `hf-gradprune COMMAND --help`
lists each command's flags.
"""

__all__ = ["EXIT_BACKDOORED", "EXIT_PUSH", "EXIT_USER", "build_parser", "entry", "job_config", "main",
           "published_argv", "redacted_command"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-gradprune", allow_abbrev=False, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find and remove backdoors in timm / transformers image classifiers on the Hugging Face Hub "
                    "with a few clean images per class (Grad-Prune, Dunnett et al., 2024).")
    p.add_argument("--version", action="version", version=f"hf-gradprune {__version__}")
    commands = p.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for module in COMMANDS.values():
        module.register(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["defend", *argv]  # the documented bare form: hf-gradprune MODEL --data DATA
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USER
        return args.run(args, argv[1:])
    except UserError as e:
        print(f"hf-gradprune: error{process_tag()}: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("hf-gradprune: interrupted before the output was complete; nothing was written to it", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
