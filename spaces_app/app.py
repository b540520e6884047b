"""hf-gradprune as a Gradio app: the CLI's job in the browser, for a Hugging Face Space or a local run.

    python spaces_app/app.py            # http://127.0.0.1:7860, no network needed for local folders
    python spaces_app/app.py --login    # also "Sign in with Hugging Face" (Gradio mocks it with your local login)

The app turns the form into the CLI's job (`hf_gradprune.build_config`) and runs the same
`hf_gradprune.pipeline.run`; progress reaches the page through the pipeline's progress callback (gr.Progress + a
live log).
"""

# no `from __future__ import annotations` here: Gradio reads the gr.OAuthToken annotation to inject the token
import argparse
import os
import queue
import re
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # job.py beside this file, also when run from elsewhere
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from hf_gradprune import __version__  # noqa: E402
from hf_gradprune.errors import UserError  # noqa: E402
from hf_gradprune.finetune import TuneConfig  # noqa: E402
from hf_gradprune.methods import METHODS  # noqa: E402
from hf_gradprune.progress import ProgressEvent  # noqa: E402
from hf_gradprune.prune import PruneConfig  # noqa: E402
from hf_gradprune.recipes import DEFAULT_RECIPE  # noqa: E402
from hf_gradprune.report import PLOT_FILE, TRIGGER_FILE, Report  # noqa: E402
from hf_gradprune.triggers import TRIGGER_KINDS, UNKNOWN  # noqa: E402
from job import SpaceSettings, demo_inputs, push_outcome, remove_job, resolve_input, run_job  # noqa: E402

METRIC_ROWS = (("acc", "ACC (clean accuracy)"), ("asr", "ASR (attack success rate)"), ("ra", "RA (robust accuracy)"))
FORM = ("model_id", "model_files", "data_id", "data_files", "split", "spc", "seed", "trigger", "trigger_image",
        "trigger_mask", "blend_alpha", "bpp_levels", "target", "method", "recipe", "alpha", "prune_patience",
        "max_rounds", "tune_patience", "max_epochs", "eval_limit")
TRIGGER_HELP = {"badnet": "white square at the bottom-right corner (3x3 at 32x32, scaled); no image needed",
                "patch": "your patch image + mask image (255 = trigger pixel), stamped at the model's input size",
                "blended": "your image blended in: x' = (1 - alpha) x + alpha t",
                "bpp": "colour depth squeezed to N levels per channel; no image needed",
                "additive": "a .npy perturbation in pixel units (3, H, W) added and clipped",
                UNKNOWN: "the model is scanned first: a patch-like and a blend-like trigger are synthesised per class "
                         "from your few-shot images; a backdoor's target needs a far smaller one. The defence then "
                         "unlearns the synthesised trigger; ASR is measured with it. A clean model is left untouched"}
TRIGGER_CHOICES = [(kind, kind) for kind in TRIGGER_KINDS] + [("I don't know the trigger", UNKNOWN)]


def metrics_table(report: Report) -> list[list[str]]:
    return [[label, f"{100 * report['before'][k]:.2f} %", f"{100 * report['after'][k]:.2f} %"]
            for k, label in METRIC_ROWS]


def split_card(text: str) -> tuple[str, str]:
    """(YAML metadata, markdown body) of a model card."""
    m = re.match(r"^---\n(.*?)\n---\n?(.*)$", text, re.S)
    return (m.group(1), m.group(2)) if m else ("", text)


def card_markdown(output_dir: Path) -> tuple[str, str]:
    """The card as the Hub shows it; its plot (a relative link on the Hub) is inlined, so no folder is served."""
    import base64
    meta, body = split_card((output_dir / "README.md").read_text())
    for name in (PLOT_FILE, TRIGGER_FILE):
        if (output_dir / name).is_file():
            inline = "data:image/png;base64," + base64.b64encode((output_dir / name).read_bytes()).decode()
            body = body.replace(f"]({name})", f"]({inline})")
    return meta, body


def preview_gallery(report: Report, samples: dict, names: list[str] | None) -> list[tuple[Image.Image, str]]:
    """Each shown test image, clean and triggered, with the prediction before -> after the defence."""
    target = report["target"]["index"]

    def name(i: int) -> str:
        n = f"{i}" + (f" {names[i]}" if names and str(names[i]) != str(i) else "")
        return n + (" (target)" if i == target else "")

    out = []
    for j, row in enumerate(report.get("preview", [])):
        for kind in ("clean", "triggered"):
            px = np.ascontiguousarray(samples[kind][j].transpose(1, 2, 0))
            img = Image.fromarray(px).resize((px.shape[1] * 4, px.shape[0] * 4), Image.NEAREST)
            out.append((img, f"{kind} · true {name(row['label'])} · {name(row[f'{kind}_before'])} -> "
                             f"{name(row[f'{kind}_after'])}"))
    return out


class EventLog:
    """Progress events -> log lines and gr.Progress steps. Filled from the job's thread, read by the page's."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.lines: list[str] = []
        self.rounds: list[dict] = []  # the live pruning curve: one row per (round, series)
        self.epochs: list[tuple[int, float]] = []  # without pruning rounds, the live curve is fine-tuning's val loss
        self.t0 = time.perf_counter()

    def __call__(self, event: ProgressEvent) -> None:
        self.events.put(event)

    def line(self, e: ProgressEvent) -> str | None:
        t = f"[{time.perf_counter() - self.t0:6.1f} s]"
        v = e.values
        if e.stage == "prune" and e.step:
            shown = " · ".join(f"{k.replace('_', ' ')} "
                               + (f"{100 * x:.1f} %" if k.endswith(("acc", "asr")) else f"{x:.3f}")
                               for k, x in v.items() if isinstance(x, float))
            return (f"{t} prune round {e.step}" + (f": {e.message}" if e.message else "")
                    + (f" · {shown}" if shown else ""))
        if e.stage == "finetune" and e.step:
            return f"{t} fine-tune epoch {e.step}" + (f" · val loss {v['val_loss']:.4f}" if "val_loss" in v else "")
        if e.stage == "done":
            return f"{t} done"
        return f"{t} {e.stage}: {e.message}" if e.message else None

    def drain(self, progress) -> bool:
        changed = False
        while True:
            try:
                e = self.events.get_nowait()
            except queue.Empty:
                return changed
            if e.stage == "prune" and e.step:
                self.rounds = [r for r in self.rounds if r["round"] != e.step] + [
                    {"round": e.step, "percent": 100 * e.values[k], "series": name}
                    for k, name in (("val_acc", "val ACC (clean)"), ("val_asr", "val ASR (triggered)"))
                    if isinstance(e.values.get(k), float)]
            if e.stage == "finetune" and e.step and isinstance(e.values.get("val_loss"), float):
                self.epochs = [p for p in self.epochs if p[0] != e.step] + [(e.step, e.values["val_loss"])]
            text = self.line(e)
            if text:
                self.lines.append(text)
                changed = True
            if e.stage in ("prune", "finetune") and e.total:
                progress((min(e.step, e.total), e.total), desc=f"{e.stage} {e.message or ''}".strip(),
                         unit="rounds" if e.stage == "prune" else "epochs")
            elif e.message:
                progress(None, desc=e.message)

    def curve(self):
        """The rounds so far as a small matplotlib figure (the card's full plot comes at the end)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 2.4), dpi=90)
        if not self.rounds and self.epochs:  # the recipe does not prune: show fine-tuning
            ax.plot(*zip(*sorted(self.epochs)), "o-", ms=3, label="clean val loss")
            ax.set_xlabel("fine-tuning epoch")
            ax.set_ylabel("cross-entropy")
            ax.legend(fontsize=7, frameon=False)
            fig.tight_layout()
            plt.close(fig)
            return fig
        for series, style in (("val ACC (clean)", "o-"), ("val ASR (triggered)", "s-")):
            pts = sorted((r["round"], r["percent"]) for r in self.rounds if r["series"] == series)
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label=series)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("pruning round")
        ax.set_ylabel("%")
        if self.rounds:
            ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        plt.close(fig)
        return fig

    @property
    def text(self) -> str:
        return "\n".join(self.lines[-400:])


def build_app(settings: SpaceSettings | None = None) -> gr.Blocks:
    settings = settings or SpaceSettings.from_env()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="hf-gradprune", analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(f"# hf-gradprune {__version__}\nRemove a backdoor from a timm / transformers image classifier with "
                    "a few clean images per class: gradient-based pruning (conv filters, MLP neurons, attention heads) "
                    "+ fine-tuning (Dunnett et al., 2024). "
                    "The same job as `hf-gradprune MODEL --data DATA` on the command line.")
        if settings.login:
            gr.LoginButton()
        job_state = gr.State(None, time_to_live=settings.job_ttl_s, delete_callback=remove_job)
        demo_btn = gr.Button("No backdoored model at hand? Plant a BadNets backdoor in a small digits CNN "
                             "(about 15 s) and fill in the form with it", size="sm", elem_id="demo")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### 1. Model")
                model_id = gr.Textbox(label="Model: Hub id (org/name)"
                                      + (" or local folder" if settings.local_paths else ""),
                                      placeholder="org/resnet18-backdoored", elem_id="model_id")
                model_files = gr.File(label="... or upload a Hub-layout folder: one .zip or its files",
                                      file_count="multiple", type="filepath", elem_id="model_files")
                load_btn = gr.Button("Load model (fills the target classes; also on Enter or upload)", size="sm",
                                     elem_id="load_model")
                model_info = gr.Markdown(elem_id="model_info")
                gr.Markdown("### 2. Few-shot data")
                data_id = gr.Textbox(label="Dataset: Hub id" + (" or local folder" if settings.local_paths else ""),
                                     placeholder="uoft-cs/cifar10", elem_id="data_id")
                data_files = gr.File(label="... or upload a Hub-layout dataset folder: one .zip or its parquet files",
                                     file_count="multiple", type="filepath", elem_id="data_files")
                with gr.Row():
                    split = gr.Textbox("train", label="Split (few-shot pool)", elem_id="split")
                    spc = gr.Number(10, label=f"Images per class (SPC, at most {settings.max_spc})", precision=0,
                                    minimum=2, maximum=settings.max_spc, elem_id="spc")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                gr.Markdown("### 3. Trigger and target")
                trigger = gr.Radio(TRIGGER_CHOICES, value="badnet", label="Trigger", elem_id="trigger")
                trigger_help = gr.Markdown(TRIGGER_HELP["badnet"])
                with gr.Row():
                    trigger_image = gr.File(label="Trigger image (patch / blended) or .npy (additive)", type="filepath",
                                            visible=False, elem_id="trigger_image")
                    trigger_mask = gr.File(label="Mask image (patch)", type="filepath", visible=False,
                                           elem_id="trigger_mask")
                blend_alpha = gr.Slider(0.01, 1.0, 0.2, step=0.01, label="Blend alpha", visible=False)
                bpp_levels = gr.Slider(2, 128, 8, step=1, label="BPP colour levels", visible=False)
                target = gr.Dropdown([("auto (found from the data)", "auto")], value="auto", label="Target class",
                                     allow_custom_value=True, elem_id="target")
                with gr.Accordion("Advanced", open=False):
                    method = gr.Dropdown([(f"{v[0]} ({k})", k) for k, v in METHODS.items()], value="gradprune",
                                         label="Defence", elem_id="method")
                    recipe = gr.Dropdown([("robust (default)", "robust"),
                                          ("paper (the paper's exact procedure)", "paper")],
                                         value=DEFAULT_RECIPE, label="Grad-Prune recipe", elem_id="recipe")
                    alpha = gr.Number(PruneConfig.alpha, label="alpha: largest val accuracy drop", elem_id="alpha")
                    prune_patience = gr.Number(PruneConfig.patience, label="Pp: pruning patience (rounds)", precision=0)
                    max_rounds = gr.Number(None,
                                           label="Max pruning rounds (empty or 0: the recipe's; robust 0, paper 500)",
                                           precision=0,
                                           elem_id="max_rounds")
                    tune_patience = gr.Number(TuneConfig.patience, label="Pt: fine-tuning patience (epochs)",
                                              precision=0)
                    max_epochs = gr.Number(TuneConfig.max_epochs, label="Max fine-tuning epochs", precision=0,
                                           elem_id="max_epochs")
                    eval_limit = gr.Number(settings.max_eval or 0, label="Test images (0 = the whole test split"
                                           + (f"; at most {settings.max_eval} here" if settings.max_eval else "") + ")",
                                           precision=0, elem_id="eval_limit")
                run_btn = gr.Button("Remove the backdoor", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False, elem_id="log")
                live = gr.Plot(label="Pruning rounds or fine-tuning epochs (live, validation set)", format="png",
                               elem_id="live")
                metrics = gr.Dataframe(headers=["metric", "before", "after"], label="Before / after (test split)",
                                       interactive=False, elem_id="metrics")
                curve = gr.Image(label="Pruning curve", type="filepath", interactive=False, elem_id="curve")
                synthesised = gr.Image(label="Synthesised trigger | a test image | stamped (trigger unknown)",
                                       type="filepath", interactive=False, elem_id="synthesised")
                preview = gr.Gallery(label="Test images: prediction before -> after the defence "
                                           "(click for the full caption)",
                                     columns=4, height=300, object_fit="contain",
                                     elem_id="preview")
                download = gr.File(label="Output folder (.zip)", interactive=False, elem_id="download")
                with gr.Accordion("Model card", open=True):
                    card = gr.Markdown(elem_id="card")
                    card_meta = gr.Code(language="yaml", label="Card metadata (Hub eval results)", interactive=False)
                gr.Markdown("### Push to the Hub\nNothing is uploaded until you press Push"
                            + (" (signed in with Hugging Face above)." if settings.login else
                               " (uses this machine's login: `hf auth login` or HF_TOKEN)."))
                with gr.Row():
                    repo_name = gr.Textbox(label="Repo name (or org/name)", elem_id="repo_name")
                    private = gr.Checkbox(True, label="Private", elem_id="private")
                push_btn = gr.Button("Push to Hub", interactive=False, elem_id="push")
                push_result = gr.Markdown(elem_id="push_result")

        def show_trigger(kind):
            return (TRIGGER_HELP[kind], gr.update(visible=kind in ("patch", "blended", "additive")),
                    gr.update(visible=kind == "patch"), gr.update(visible=kind == "blended"),
                    gr.update(visible=kind == "bpp"))

        trigger.change(show_trigger, trigger, [trigger_help, trigger_image, trigger_mask, blend_alpha, bpp_levels])

        def load_model_info(mid, mfiles):
            try:
                text, choices = describe_model(settings, mid, mfiles)
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return text, gr.update(choices=choices, value="auto")

        load_btn.click(load_model_info, [model_id, model_files], [model_info, target])
        model_id.submit(load_model_info, [model_id, model_files], [model_info, target])  # Enter in the id box
        model_files.upload(load_model_info, [model_id, model_files], [model_info, target])

        def plant_demo():
            model_zip, data_zip = demo_inputs(settings)
            text, choices = describe_model(settings, None, [model_zip])
            return ("", [model_zip], "", [data_zip], text + ". Backdoor: BadNets square, target 0; press "
                    "**Remove the backdoor**.", gr.update(choices=choices, value="auto"), "badnet")

        demo_btn.click(plant_demo, None, [model_id, model_files, data_id, data_files, model_info, target, trigger])
        form_inputs = [model_id, model_files, data_id, data_files, split, spc, seed, trigger, trigger_image,
                       trigger_mask, blend_alpha, bpp_levels, target, method, recipe, alpha, prune_patience,
                       max_rounds, tune_patience, max_epochs, eval_limit]
        outputs = [status, log, live, metrics, curve, preview, download, card, card_meta, repo_name, push_btn,
                   push_result, job_state, synthesised]

        def defend(previous, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom: it injects the tracker)
            remove_job(previous)  # one job folder per session: the last one
            form = dict(zip(FORM, values))
            events = EventLog()
            cancelled, box = threading.Event(), {}

            def work():
                try:
                    box["outcome"] = run_job(settings, form, events, cancelled)
                except BaseException as e:  # reported on the page below
                    box["error"] = e

            worker = threading.Thread(target=work, daemon=True)
            nothing = [gr.update()] * 9
            cleared = [None, None, None, None, "", "", gr.update(), gr.update(interactive=False), ""]  # last run's
            yield ["Running ...", "", events.curve(), *cleared, None, None]
            worker.start()
            try:
                last = 0.0
                while worker.is_alive():
                    worker.join(0.2)
                    if events.drain(progress) and time.perf_counter() - last > 0.5:
                        last = time.perf_counter()
                        yield [gr.update(), events.text, events.curve(), *nothing, None, gr.update()]
            except GeneratorExit:  # the tab went away: stop the job at its next progress event
                cancelled.set()
                raise
            events.drain(progress)
            if "error" in box:
                e = box["error"]
                message = str(e) if isinstance(e, UserError) else f"unexpected error: {type(e).__name__}: {e}"
                if not isinstance(e, UserError):
                    traceback.print_exception(e)
                yield [f"**Error:** {message}", events.text, events.curve(), *nothing, None, gr.update()]
                raise gr.Error(message, print_exception=False)
            o = box["outcome"]
            if o.output_dir is None:  # trigger unknown and the scan found no backdoor: nothing was changed
                yield [f"**No backdoor found**: {o.report['scan']['verdict']}. The model is left as it is and nothing "
                       "was written (the CLI's `--force` defends anyway).", events.text, events.curve(), *nothing,
                       None, None]
                return
            meta, body = card_markdown(o.output_dir)
            trigger_png = o.output_dir / TRIGGER_FILE
            names = o.report["data"].get("class_names")
            b, a = o.report["before"], o.report["after"]
            recipe = o.report["method"].get("recipe")
            title = o.report["method"]["title"] + (f", recipe {recipe}" if recipe else "")
            summary = (f"**Done** ({title}): ASR {100 * b['asr']:.2f} % -> "
                       f"{100 * a['asr']:.2f} %, ACC {100 * b['acc']:.2f} % -> {100 * a['acc']:.2f} %. "
                       f"Same numbers from the CLI: `{o.command}`")
            aligned = o.report["data"].get("class_alignment")
            if aligned:
                summary += f" Note: {aligned['note']}."
            yield [summary, events.text, events.curve(), metrics_table(o.report), str(o.output_dir / PLOT_FILE),
                   preview_gallery(o.report, o.samples, names), str(o.zip_path), body, meta,
                   gr.update(value=o.output_dir.name), gr.update(interactive=True), "",
                   {"job_dir": str(o.job_dir), "output_dir": str(o.output_dir)},
                   str(trigger_png) if trigger_png.is_file() else None]

        run_btn.click(defend, [job_state, *form_inputs], outputs, concurrency_limit=1, concurrency_id="defence",
                      show_progress_on=[status])

        if settings.login:
            def push(job, repo, is_private, oauth_token: gr.OAuthToken | None):
                if oauth_token is None:
                    raise gr.Error("Sign in with Hugging Face (button at the top) to push to your account",
                                   print_exception=False)
                return push_job(job, repo, is_private, oauth_token.token)
        else:
            def push(job, repo, is_private):
                return push_job(job, repo, is_private, None)

        push_btn.click(push, [job_state, repo_name, private], push_result, concurrency_limit=1, concurrency_id="push")
    return demo


def push_job(job: dict | None, repo: str, private: bool, token: str | None) -> str:
    if not job or not Path(job["output_dir"]).is_dir():
        raise gr.Error("nothing to push yet: run the defence first (or the session's result has expired)",
                       print_exception=False)
    try:
        url = push_outcome(job["output_dir"], repo, private, token)
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return f"Pushed: [{url}]({url})"


def describe_model(settings: SpaceSettings, model_id: str | None, model_files: list | None) -> tuple[str, list]:
    """Load the model the way the job will (same checks) and list its classes for the target menu."""
    import shutil
    import tempfile

    from hf_gradprune.hub import load_model
    settings.workdir.mkdir(parents=True, exist_ok=True)
    peek = Path(tempfile.mkdtemp(prefix="peek-", dir=settings.workdir))
    try:
        source, shown = resolve_input(model_id, model_files, peek, "Model", "MODEL", settings)
        loaded = load_model(source)
    finally:
        shutil.rmtree(peek, ignore_errors=True)
    names = loaded.label_names or [str(i) for i in range(loaded.num_classes)]
    choices = [("auto (found from the data)", "auto")] + [(f"{i}: {n}", str(i)) for i, n in enumerate(names)]
    h, w = loaded.input_size
    return (f"**{shown}**: {loaded.library}, {loaded.num_classes} classes, input {h}x{w}, "
            f"{sum(1 for m in loaded.net.modules() if type(m).__name__ == 'Conv2d')} conv layers"), choices


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="hf-gradprune in the browser")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--login", action="store_true", help="show 'Sign in with Hugging Face' outside a Space "
                                                         "(Gradio mocks it with this machine's login)")
    args = ap.parse_args(argv)
    settings = SpaceSettings.from_env(**({"login": True} if args.login else {}))
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1, max_size=20)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{settings.max_upload_mb}mb")


if __name__ == "__main__":
    main()
