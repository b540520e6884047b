"""Model card: rendered from `model_cards/` with huggingface_hub.ModelCard, metrics as Hub eval metadata."""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = "gradprune_card.md"
METRICS = (("acc", "accuracy", "ACC (clean accuracy)"),
           ("asr", "attack_success_rate", "ASR (attack success rate)"),
           ("ra", "robust_accuracy", "RA (robust accuracy)"))


def template_path() -> Path:
    return Path(str(resources.files("hf_gradprune.model_cards").joinpath(TEMPLATE)))


def _pct(metrics: dict) -> dict:
    return {f"{k}_pct": f"{100 * metrics[k]:.2f}" for k in ("acc", "asr", "ra")}


def _layer_rows(pruned: list[dict]) -> list[dict]:
    per_layer: OrderedDict[str, list[int]] = OrderedDict()
    for p in pruned:
        per_layer.setdefault(p["layer"], []).append(p["filter"])
    return [{"layer": k, "count": len(v), "indices": ", ".join(map(str, sorted(v)))} for k, v in per_layer.items()]


def _score_desc(prune_cfg: dict) -> str:
    what = {"grad": "the mean\nabsolute gradient of the unlearning loss",
            "grad_x_weight": "the mean\nabsolute gradient x weight of the unlearning loss (variant --score grad_x_weight)"}
    desc = what[prune_cfg.get("score", "grad")]
    if prune_cfg.get("normalise", "none") == "layer":
        desc += ", divided by its layer's mean (variant --score-norm layer)"
    return desc


def render_card(report: dict, plot_file: str, license: str | None = None) -> ModelCard:
    from .hub import is_hub_id, model_name as name_of
    source, data = report["source"]["model"], report["data"]["dataset"]
    library = report["source"]["library"]
    model_name = f"{name_of(source)}-gradprune"
    split = report["data"]["test_split"]
    results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                          dataset_type=data if is_hub_id(data) else name_of(data),
                          dataset_name=name_of(data), dataset_split=split,
                          metric_type=mtype, metric_name=mname, metric_value=round(100 * report["after"][key], 2),
                          dataset_config=None)
               for key, mtype, mname in METRICS]
    card_data = ModelCardData(
        model_name=model_name, library_name=library, pipeline_tag="image-classification", license=license,
        base_model=source if is_hub_id(source) else None,
        datasets=[data] if is_hub_id(data) else None,
        tags=["backdoor-defense", "gradprune", "pruning", library], eval_results=results)
    load = ('import timm\nmodel = timm.create_model("hf-hub:<repo-id>", pretrained=True)' if library == "timm" else
            'from transformers import AutoImageProcessor, AutoModelForImageClassification\n'
            'model = AutoModelForImageClassification.from_pretrained("<repo-id>")\n'
            'processor = AutoImageProcessor.from_pretrained("<repo-id>")')
    repo = report.get("push", {}).get("repo_id")
    if repo:
        load = load.replace("<repo-id>", repo)
    prune, cfg = report["prune"], report["config"]
    pruned = report["pruned"]
    target = report["target"]
    return ModelCard.from_template(
        card_data, template_path=str(template_path()),
        model_name=model_name, source=source, data=data, load_snippet=load, plot_file=plot_file,
        before=_pct(report["before"]), after=_pct(report["after"]),
        n_clean=report["after"]["n_clean"], n_triggered=report["after"]["n_triggered"], test_split=split,
        trigger=report["trigger"], target=f'{target["index"]} ({target["name"]})' if target.get("name") else target["index"],
        target_note=" (found automatically: the class most triggered few-shot images were sent to)" if target["auto"] else "",
        input_size=f'{report["data"]["input_size"][0]}x{report["data"]["input_size"][1]}',
        spc=cfg["spc"], split=cfg["split"], n_train=report["data"]["n_train"], n_val=report["data"]["n_val"],
        seed=cfg["seed"], n_pruned=len(pruned), n_layers=len({p["layer"] for p in pruned}),
        total_filters=report["total_filters"], rounds_tried=len(prune["rounds"]), stop_reason=prune["stop_reason"],
        alpha=cfg["prune"]["alpha"], score_desc=_score_desc(cfg["prune"]), tune_epochs=report["finetune"]["epochs"],
        tune_best_epoch=report["finetune"]["best_epoch"], layer_rows=_layer_rows(pruned), command=report["command"])
