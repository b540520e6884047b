"""`hf-gradprune push DIR`: upload an output folder (retry a failed `--push`, or publish after a look)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..names import model_name
from ..options import add_hub
from .console import push, resolve_repo_id

HELP = "upload an hf-gradprune output folder to the Hub"
EXAMPLES = """examples:
  hf-gradprune push ./backdoored-resnet-gradprune --repo-id me/resnet-clean --private
  hf-gradprune push ./backdoored-resnet-gradprune --repo-id org/resnet --create-pr
  hf-gradprune push ./backdoored-resnet-gradprune --repo-id org/resnet --revision refs/pr/1   # retry into a PR
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("push", help=HELP, description="Upload an hf-gradprune output folder to the Hub.",
                            epilog=EXAMPLES, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="an output folder of `hf-gradprune defend`")
    add_hub(p)
    p.add_argument("--revision", help="branch or PR ref (refs/pr/N) to commit to, e.g. to retry into an opened PR")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
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
    repo_id = resolve_repo_id(args.repo_id, f"{model_name(str(source))}-{method}", args.token)
    return push(out, repo_id, args.token, args.private, args.create_pr, args.revision)
