"""What the commands print and how they upload: progress bars, the defence's summary, the push with its retry line,
and the exit codes."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..units import count_kinds

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from ..progress import ProgressEvent, Stage
    from ..report import Report

EXIT_BACKDOORED, EXIT_USER, EXIT_PUSH = 1, 2, 3  # scan --fail-if-backdoored found one; bad input; upload failed


class TqdmProgress:
    """Progress events -> one tqdm bar per stage, on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stage: Stage | None = None

    def __call__(self, event: ProgressEvent) -> None:
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


def progress_bars(quiet: bool) -> TqdmProgress | None:
    """Progress bars unless --quiet, which also silences the libraries' own bars."""
    if not quiet:
        return TqdmProgress()
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    datasets.disable_progress_bars()
    disable_progress_bars()
    return None


def _units(changed: list[dict]) -> str:
    """[{"kind": "head", ...}, {"kind": "neuron", ...}] -> "2 units (1 head, 1 neuron)"."""
    detail = ", ".join(f"{n} {k}" for k, n in count_kinds(changed).items())
    return f"{len(changed)} unit{'s' if len(changed) != 1 else ''}" + (f" ({detail})" if detail else "")


def summary(report: Report, out: Path) -> str:
    """The defence's result in a few lines: target, method, ACC / ASR / RA before and after, the output folder."""
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


def push(out: Path, repo_id: str, token: str | None, private: bool, create_pr: bool,
         revision: str | None = None) -> int:
    """Upload an output folder; on failure the folder stays and the retry command is printed (exit 3)."""
    from ..hub import PushFailed, failure_reason, push_folder
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


def resolve_repo_id(repo_id: str | None, model_name: str, token: str | None) -> str:
    if repo_id:
        return repo_id
    from ..hub import default_repo_id
    try:
        return default_repo_id(model_name, token)
    except Exception as e:
        raise UserError(f"--push: cannot find your Hub user name ({type(e).__name__}); log in with 'hf auth login', "
                        "set HF_TOKEN, or give --repo-id") from None


def process_tag() -> str:
    """Under `accelerate launch` each process says who it is, so an error on one of them is not a mystery."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
