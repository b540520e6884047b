"""Model card: rendered from `model_cards/` with huggingface_hub.ModelCard, metrics as Hub eval metadata.

The card names models, datasets and files as the report does (names.py) and links only to the addresses of
`allowed_links`: nothing it says points at this machine or at a page that does not exist.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .units import KINDS

if TYPE_CHECKING:
    from .report import Report  # report.py renders the card: a run-time import would be a cycle

TEMPLATE = "gradprune_card.md"
PAPER_URL = "https://arxiv.org/abs/2405.03918"  # Dunnett et al., 2024, the method's paper
HUB_URL = "https://huggingface.co"
METRICS = (("acc", "accuracy", "ACC (clean accuracy)"),
           ("asr", "attack_success_rate", "ASR (attack success rate)"),
           ("ra", "robust_accuracy", "RA (robust accuracy)"))


def template_path() -> Path:
    return Path(str(resources.files("hf_gradprune.model_cards").joinpath(TEMPLATE)))


def homepage() -> str | None:
    """The project's homepage, as `[project.urls] Homepage` in pyproject.toml gives it; None while it has none
    (or when the package is not installed, as in the Space's bundle): then the card does not link the tool."""
    try:
        entries = metadata.metadata("hf-gradprune").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    urls = {label.strip().lower(): url.strip() for label, _, url in (e.partition(",") for e in entries)}
    return urls.get("homepage")


def hub_url(repo_id: str | None, kind: Literal["model", "dataset"] = "model") -> str | None:
    """The Hub page of a model or dataset id (None for None)."""
    if not repo_id:
        return None
    return f"{HUB_URL}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"


def allowed_links(report: Report) -> list[str]:
    """Every address a card may link to, the one list of them: the paper on arXiv, the project's homepage (when
    pyproject.toml has one) and the Hub pages of the model, dataset and repo ids the report names. A link is allowed
    when it is one of these or a page below one (`link_allowed`)."""
    ids = [(report["source"].get("hub_id"), "model"), (report["data"].get("hub_id"), "dataset"),
           (report.get("push", {}).get("repo_id"), "model")]
    links = [PAPER_URL, homepage(), *(hub_url(repo, kind) for repo, kind in ids)]
    return [link for link in links if link]


def link_allowed(url: str, allowed: list[str]) -> bool:
    return any(url == a or url.startswith(a.rstrip("/") + "/") for a in allowed)


def _pct(metrics: dict) -> dict:
    return {f"{k}_pct": f"{100 * metrics[k]:.2f}" for k in ("acc", "asr", "ra")}


def _layer_rows(changed: list[dict]) -> list[dict]:
    """One row per (layer, unit kind): how many were zeroed, and which."""
    per_layer: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
    for p in changed:
        per_layer.setdefault((p["layer"], p["kind"]), []).append(p["index"])
    return [{"layer": layer, "kind": KINDS[kind], "count": len(v), "indices": ", ".join(map(str, sorted(v)))}
            for (layer, kind), v in per_layer.items()]


def render_card(report: Report, plot_file: str, license: str | None = None) -> ModelCard:
    from .names import model_name as name_of
    source, data = report["source"]["model"], report["data"]["dataset"]
    source_id, data_id = report["source"].get("hub_id"), report["data"].get("hub_id")
    library = report["source"]["library"]
    method = report["method"]
    model_name = f"{name_of(source)}-{method['name']}"
    split = report["data"]["test_split"]
    results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                          dataset_type=data_id or name_of(data),
                          dataset_name=name_of(data), dataset_split=split,
                          metric_type=mtype, metric_name=mname, metric_value=round(100 * report["after"][key], 2),
                          dataset_config=None)
               for key, mtype, mname in METRICS]
    card_data = ModelCardData(
        model_name=model_name, library_name=library, pipeline_tag="image-classification", license=license,
        base_model=source_id, datasets=[data_id] if data_id else None,
        tags=["backdoor-defense", "hf-gradprune", method["name"], library], eval_results=results)
    load = ('import timm\nmodel = timm.create_model("hf-hub:<repo-id>", pretrained=True)' if library == "timm" else
            'from transformers import AutoImageProcessor, AutoModelForImageClassification\n'
            'model = AutoModelForImageClassification.from_pretrained("<repo-id>")\n'
            'processor = AutoImageProcessor.from_pretrained("<repo-id>")')
    repo = report.get("push", {}).get("repo_id")
    if repo:
        load = load.replace("<repo-id>", repo)
    cfg, changed, target = report["config"], report["pruned"], report["target"]
    return ModelCard.from_template(
        card_data, template_path=str(template_path()),
        model_name=model_name, source=source, source_url=hub_url(source_id), revision=report["source"].get("revision"),
        data=data, data_url=hub_url(data_id, "dataset"), tool_url=homepage(), paper_url=PAPER_URL,
        load_snippet=load, plot_file=plot_file,
        before=_pct(report["before"]), after=_pct(report["after"]),
        n_clean=report["after"]["n_clean"], n_triggered=report["after"]["n_triggered"], test_split=split,
        trigger=report["trigger"],
        target=f'{target["index"]} ({target["name"]})' if target.get("name") else target["index"],
        target_note=(" (found automatically: the class most triggered few-shot images were sent to)"
                     if target["auto"] else ""),
        input_size=f'{report["data"]["input_size"][0]}x{report["data"]["input_size"][1]}',
        spc=cfg["spc"], split=cfg["split"], n_train=report["data"]["n_train"], n_val=report["data"]["n_val"],
        seed=cfg["seed"], method_title=method["title"], method_desc=method["description"],
        recipe=method.get("recipe"), recipe_desc=method.get("recipe_description"),
        method_reference=method["reference"], method_summary=method["summary"],
        uses_triggered=method["name"] == "gradprune", data_free=method["name"] == "clp",
        plot_caption="Channels zeroed per conv layer (no data used)" if method["name"] == "clp" else
        "How the defence went, on the validation split",
        layer_rows=_layer_rows(changed), command=report["command"], scan=report.get("scan"),
        class_alignment=report["data"].get("class_alignment"))
