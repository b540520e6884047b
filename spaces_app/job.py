"""What the Space does between the browser and the pipeline, kept free of Gradio so it can be tested headless.

The form becomes the options the CLI's flags give (`hf_gradprune.config.build_config`, the one path to a job), so
the Space runs the CLI's job with the CLI's checks and error messages; uploads are unpacked into a per-job folder
under caps a public Space needs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_gradprune.config import build_config, command_argv, published_argv, redacted_command
from hf_gradprune.errors import UserError
from hf_gradprune.finetune import TuneConfig
from hf_gradprune.hub import PushFailed, default_repo_id, failure_reason, push_folder
from hf_gradprune.job import JobConfig
from hf_gradprune.names import HUB_ID, model_name, public_name
from hf_gradprune.progress import ProgressEvent

JOB_PREFIX = "gradprune-job-"
_ONE_JOB = threading.Lock()  # one defence at a time in this process, whatever the queue does with abandoned tabs
_DEMO = threading.Lock()
DEMO_MODEL = "digits-resnet18-backdoored"


@dataclass
class SpaceSettings:
    """Limits and switches: a public Space is strict, a local run (`python spaces_app/app.py`) is not."""
    in_space: bool = False  # SPACE_ID is set: running on Hugging Face Spaces
    login: bool = False  # show "Sign in with Hugging Face" and push with the signed-in user's OAuth token
    local_paths: bool = True  # the model / dataset boxes may name folders on this machine (never in a Space)
    max_spc: int = 100
    max_upload_mb: int = 500  # per upload, and per unpacked zip
    max_eval: int | None = None  # cap on test images per job (None: the whole test split)
    job_ttl_s: int = 6 * 3600  # finished jobs older than this are deleted when the next job starts
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "hf-gradprune-space")

    @classmethod
    def from_env(cls, **overrides) -> SpaceSettings:
        in_space = bool(os.environ.get("SPACE_ID"))
        env = {"max_spc": int(os.environ.get("GRADPRUNE_MAX_SPC", 100)),
               "max_upload_mb": int(os.environ.get("GRADPRUNE_MAX_UPLOAD_MB", 500)),
               "max_eval": int(os.environ["GRADPRUNE_MAX_EVAL"]) if os.environ.get("GRADPRUNE_MAX_EVAL") else
               (2000 if in_space else None)}
        if os.environ.get("GRADPRUNE_WORKDIR"):
            env["workdir"] = Path(os.environ["GRADPRUNE_WORKDIR"])
        return cls(**{"in_space": in_space, "login": in_space, "local_paths": not in_space, **env, **overrides})


class JobCancelled(Exception):
    """The browser tab that started the job went away: stop at the next progress event, write nothing."""


@dataclass
class JobOutcome:
    job_dir: Path
    output_dir: Path | None  # None: trigger unknown and no backdoor found, nothing written
    zip_path: Path | None
    report: dict
    samples: dict[str, np.ndarray]
    command: str  # the CLI command that gives the same numbers (uploads and folders by their names: names.py)


def new_job_dir(settings: SpaceSettings) -> Path:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    sweep_old_jobs(settings)
    return Path(tempfile.mkdtemp(prefix=JOB_PREFIX, dir=settings.workdir))


def sweep_old_jobs(settings: SpaceSettings, now: float | None = None) -> None:
    now = time.time() if now is None else now
    for d in settings.workdir.glob(f"{JOB_PREFIX}*"):
        if d.is_dir() and now - d.stat().st_mtime > settings.job_ttl_s:
            shutil.rmtree(d, ignore_errors=True)


def remove_job(job: dict | str | Path | None) -> None:
    """A session's job folder goes when the session ends or starts another job (gr.State's delete_callback)."""
    job_dir = job.get("job_dir") if isinstance(job, dict) else job
    if job_dir and Path(job_dir).name.startswith(JOB_PREFIX):
        shutil.rmtree(job_dir, ignore_errors=True)


def unpack_upload(files: list[str | Path], dest: Path, what: str, max_mb: int) -> Path:
    """An uploaded Hub-layout folder: one .zip of it, or its files. Returns the folder that holds config.json /
    the dataset files (a zip made of the folder itself has it one level down)."""
    files = [Path(f) for f in files]
    limit = max_mb * 1024 * 1024
    total = sum(f.stat().st_size for f in files)
    if total > limit:
        raise UserError(f"{what} upload: {total / 2**20:.0f} MB, more than this Space's {max_mb} MB; "
                        "push the folder to the Hub and give its id instead")
    dest.mkdir(parents=True, exist_ok=True)
    if len(files) == 1 and files[0].suffix.lower() == ".zip":
        _unzip(files[0], dest, what, limit)
    else:
        for f in files:
            if f.suffix.lower() == ".zip":
                raise UserError(f"{what} upload: a .zip must come alone; upload one .zip of the folder or its files")
            shutil.copy2(f, dest / f.name)
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if not entries:
        raise UserError(f"{what} upload: empty; upload the folder's files or one .zip of it")
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _unzip(path: Path, dest: Path, what: str, limit: int) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{what} upload {path.name}: not a readable .zip file") from None
    with archive:
        members = archive.infolist()
        if sum(m.file_size for m in members) > limit:
            raise UserError(f"{what} upload {path.name}: unpacks to more than this Space's {limit // 2**20} MB; "
                            "push the folder to the Hub and give its id instead")
        root = dest.resolve()
        for m in members:
            target = (dest / m.filename).resolve()
            if not target.is_relative_to(root) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise UserError(f"{what} upload {path.name}: entry {m.filename!r} points outside the folder "
                                "(absolute path, '..' or a link); zip the folder itself")
        archive.extractall(dest)


def resolve_input(text: str | None, files: list | None, job_dir: Path, what: str, flag: str,
                  settings: SpaceSettings) -> tuple[str, str]:
    """(path or Hub id to load, the name to show in the command and card: the CLI's, names.public_name)."""
    if files:
        first = Path(files[0])
        name = first.stem if len(files) == 1 and first.suffix.lower() == ".zip" else f"uploaded-{what.lower()}"
        dest = job_dir / "inputs" / what.lower() / (re.sub(r"[^\w.\-]", "-", name).strip(".") or what.lower())
        folder = unpack_upload(files, dest, what, settings.max_upload_mb)
        return str(folder), public_name(str(folder))
    text = (text or "").strip()
    if not text:
        raise UserError(f"{flag}: give a Hub {what.lower()} id (org/name) "
                        "or upload a Hub-layout folder (.zip or its files)")
    if not settings.local_paths and (not HUB_ID.match(text) or Path(text).exists()):
        raise UserError(f"{flag} {text}: give a Hub id (org/name); this Space does not read paths on its machine "
                        "(upload the folder instead)")
    return text, public_name(text)


def _with_limit(value, cap: int | None, flag: str, hint: str) -> None:
    if cap is not None and value is not None and value > cap:
        raise UserError(f"{flag} {value}: this Space allows at most {cap}; {hint}")


def form_values(settings: SpaceSettings, form: dict, job_dir: Path) -> tuple[dict, str]:
    """The form -> (the options of `hf-gradprune defend`, as `build_config` takes them, under this Space's caps;
    how the model is shown). A box left empty or at its default is left out, as a person would leave the flag out."""
    model, model_shown = resolve_input(form.get("model_id"), form.get("model_files"), job_dir, "Model", "MODEL",
                                       settings)
    data, _ = resolve_input(form.get("data_id"), form.get("data_files"), job_dir, "Dataset", "--data", settings)
    spc = int(form.get("spc") or 10)
    _with_limit(spc, settings.max_spc, "--spc", "run the CLI (hf-gradprune MODEL --spc N) for more")
    eval_limit = form.get("eval_limit")
    eval_limit = int(eval_limit) if eval_limit not in (None, "", 0) else settings.max_eval
    _with_limit(eval_limit, settings.max_eval, "--eval-limit", "run the CLI for the whole test split")
    kind, method = form.get("trigger") or "badnet", form.get("method") or "gradprune"
    relevant = {"trigger_image": kind in ("patch", "blended", "additive"), "trigger_mask": kind == "patch",
                "blend_alpha": kind == "blended", "bpp_levels": kind == "bpp", "recipe": method == "gradprune"}
    # the number boxes show every method's fine-tuning defaults; left there, the chosen method's own apply
    shown_defaults = {"tune_patience": TuneConfig.patience, "max_epochs": TuneConfig.max_epochs}
    values = {"model": model, "data": data, "split": form.get("split"), "spc": spc, "seed": form.get("seed"),
              "eval_limit": eval_limit, "trigger": kind, "trigger_image": form.get("trigger_image"),
              "trigger_mask": form.get("trigger_mask"), "blend_alpha": form.get("blend_alpha"),
              "bpp_levels": form.get("bpp_levels"), "target": form.get("target") or None, "method": method,
              "recipe": form.get("recipe"), "alpha": form.get("alpha"), "prune_patience": form.get("prune_patience"),
              # empty (or 0, what an emptied number box gives back): the recipe's own (robust 0, paper 500)
              "max_rounds": form.get("max_rounds") or None, "tune_patience": form.get("tune_patience"),
              "max_epochs": form.get("max_epochs")}
    return {k: v for k, v in values.items() if v not in (None, "") and relevant.get(k, True)
            and v != shown_defaults.get(k)}, model_shown


def build_job(settings: SpaceSettings, form: dict, job_dir: Path) -> tuple[JobConfig, list[str]]:
    """The form -> (the job, the command it equals as the card and the page show it: MODEL and flags, no --output).
    Every value goes through `build_config`, the CLI's one path to a job, with its checks and messages."""
    values, model_shown = form_values(settings, form, job_dir)
    argv = command_argv(values)
    output = job_dir / f"{model_name(model_shown)}-{values['method']}"
    cfg = build_config({**values, "output": str(output)})
    cfg.command = redacted_command(argv)
    return cfg, published_argv(argv)


def run_job(settings: SpaceSettings, form: dict, progress: Callable[[ProgressEvent], None],
            cancelled: threading.Event | None = None) -> JobOutcome:
    """One defence from the form: the CLI's job (same JobConfig, same pipeline.run) in a fresh job folder."""
    from hf_gradprune.pipeline import run
    job_dir = new_job_dir(settings)
    try:
        cfg, _ = build_job(settings, form, job_dir)

        def emit(event: ProgressEvent) -> None:
            if cancelled is not None and cancelled.is_set():
                raise JobCancelled()
            progress(event)

        with _ONE_JOB:
            try:
                result = run(cfg, emit)
            except UserError as e:  # name the uploads as the user knows them, not by this machine's paths
                message = str(e)
                for real, label in ((cfg.model, cfg.model_shown), (cfg.data, cfg.data_shown)):
                    message = message.replace(real, label)
                raise UserError(message) from None
        if not result.written:  # trigger unknown, no backdoor found: nothing to download
            shutil.rmtree(job_dir, ignore_errors=True)
            return JobOutcome(job_dir, None, None, result.report, None, cfg.command)
        zip_path = Path(shutil.make_archive(str(job_dir / model_name(str(result.output_dir))), "zip",
                                            root_dir=result.output_dir.parent, base_dir=result.output_dir.name))
        return JobOutcome(job_dir, result.output_dir, zip_path, result.report, result.samples, cfg.command)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(job_dir / "inputs", ignore_errors=True)  # uploads are not kept past the job


def demo_inputs(settings: SpaceSettings) -> tuple[str, str]:
    """For a visitor with no backdoored model at hand: the offline demo's digits CNN with a BadNets backdoor
    (target 0) and its dataset, as the two zips a user would upload. Built once per machine (about 15 s)."""
    from hf_gradprune.demo import build_backdoored_digits
    root = settings.workdir / "demo"
    with _DEMO:
        if not (root / "ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            built = build_backdoored_digits(root / "build")
            Path(built["model"]).rename(root / "build" / DEMO_MODEL)
            for folder, archive in ((DEMO_MODEL, DEMO_MODEL), ("data", "digits")):
                shutil.make_archive(str(root / archive), "zip", root_dir=root / "build", base_dir=folder)
            (root / "ready").touch()
    return str(root / f"{DEMO_MODEL}.zip"), str(root / "digits.zip")


def push_outcome(output_dir: str | Path, repo: str, private: bool, token: str | None) -> str:
    """Upload a finished job's folder; `token` is the signed-in user's OAuth token (None: this machine's login).

    Returns the URL. Errors never carry the token."""
    repo = (repo or "").strip()
    if not repo or not re.fullmatch(r"([\w.\-]+/)?[\w.\-]+", repo):
        raise UserError(f"repo name {repo!r}: give a name (or org/name) made of letters, digits, '-', '_' and '.'")
    try:
        repo_id = repo if "/" in repo else default_repo_id(repo, token)
    except Exception as e:
        raise UserError(f"cannot find your Hub user name ({type(e).__name__}); "
                        "sign in again, or give org/name") from None
    try:
        return push_folder(Path(output_dir), repo_id, token=token, private=private)
    except PushFailed as failed:
        raise UserError(f"upload to {repo_id} failed ({failure_reason(failed.cause, token)}); the sanitised model is "
                        "intact: press Push again, or download the zip and run 'hf-gradprune push FOLDER'") from None
