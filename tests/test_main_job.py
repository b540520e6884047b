"""The main job end to end, as a user runs it: backdoored checkpoint in, sanitised checkpoint + card out."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import PRUNING, read_report, run_cli
from hf_gradprune.hub import LOCAL_FILE, load_model
from hf_gradprune.metrics import attack_metrics
from hf_gradprune.report import DataInfo, Metrics, Report, Source, Target
from hf_gradprune.triggers import TriggerSpec, make_trigger


def assert_backdoor_removed(report: dict, alpha: float = 0.10) -> None:
    before, after = report["before"], report["after"]
    assert before["asr"] > 0.9, before  # the fixture really is backdoored
    assert after["asr"] < 0.15 and after["asr"] < before["asr"] / 5, after
    assert before["acc"] - after["acc"] <= alpha, (before, after)
    assert after["ra"] > 0.7, after
    assert report["target"] == {"index": 0, "name": "zero", "auto": True}


def test_timm_backdoor_removed(timm_result):
    out, report = timm_result
    assert_backdoor_removed(report)
    assert report["rounds"] == len(report["pruned"]) >= 1
    for p in report["pruned"]:
        assert set(p) == {"kind", "layer", "index", "score"} and p["kind"] == "filter" and p["score"] > 0
    assert report["finetune_epochs"] >= 1
    assert report["source"]["library"] == "timm" and report["source"]["revision"] is None
    assert report["config"]["spc"] == 10 and report["data"]["n_train"] == 90 and report["data"]["n_val"] == 10
    assert report["data"]["test_split"] == "test"
    assert report["after"]["n_triggered"] == report["before"]["n_triggered"] > 0


def test_the_report_file_is_the_typed_record(timm_result):
    """The card, the CLI, the Space and the benchmarks read the report through report.Report: every key the job
    writes is declared there, so a reader's key cannot silently go missing."""
    _, report = timm_result
    assert set(report) <= set(Report.__annotations__), set(report) - set(Report.__annotations__)
    assert set(report["before"]) == set(report["after"]) == set(Metrics.__annotations__)
    assert set(report["source"]) == set(Source.__annotations__) and set(report["target"]) == set(Target.__annotations__)
    assert set(DataInfo.__required_keys__) <= set(report["data"]) <= set(DataInfo.__annotations__)


def test_timm_output_reloads_with_same_config_and_measured_numbers(timm_result, timm_backdoor):
    import timm
    out, report = timm_result
    src = Path(timm_backdoor["model"])
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    saved = load_file(out / "model.safetensors")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, saved[k]), k
    original = load_file(src / "model.safetensors")
    assert saved.keys() == original.keys()
    modules = dict(reloaded.named_modules())
    for p in report["pruned"]:
        assert modules[p["layer"]].weight[p["index"]].abs().sum() == 0
    # the numbers in the report are those of the saved file: re-measure through the loader
    loaded = load_model(str(out))
    from datasets import load_dataset
    test = load_dataset(str(timm_backdoor["data"]))["test"]
    clean = torch.from_numpy(loaded.to_pixels(test["image"]))
    labels = torch.tensor(test["label"])
    trig = make_trigger(TriggerSpec("badnet"), loaded.input_size)(clean)
    m = attack_metrics(loaded.model, clean, trig, labels, target=0)
    assert (m.acc, m.asr, m.ra) == pytest.approx((report["after"]["acc"], report["after"]["asr"],
                                                  report["after"]["ra"]))


def _timm_resnet_norm_of(conv: str) -> str:
    """Independent oracle for timm's ResNet: convN feeds bnN, downsample.0 feeds downsample.1."""
    head, last = conv.rsplit(".", 1) if "." in conv else ("", conv)
    last = "1" if last == "0" else last.replace("conv", "bn")
    return f"{head}.{last}" if head else last


def test_pruned_channels_are_exactly_zero_after_their_norm(timm_result):
    out, report = timm_result
    loaded = load_model(str(out))
    modules = dict(loaded.net.named_modules())
    seen = {}
    handles = [modules[_timm_resnet_norm_of(p["layer"])].register_forward_hook(
        lambda m, i, o, key=p["layer"]: seen.__setitem__(key, o)) for p in report["pruned"]]
    loaded.model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    for h in handles:
        h.remove()
    for p in report["pruned"]:
        assert seen[p["layer"]][:, p["index"]].abs().max() == 0, p


def test_card_metadata_parses_back(timm_result):
    out, report = timm_result
    card = ModelCard.load(out / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": round(100 * report["after"]["acc"], 2),
                       "attack_success_rate": round(100 * report["after"]["asr"], 2),
                       "robust_accuracy": round(100 * report["after"]["ra"], 2)}
    assert card.data.library_name == "timm" and "backdoor-defense" in card.data.tags
    text = card.text
    assert f"{100 * report['before']['asr']:.2f} %" in text  # before figures in the table
    assert "gradprune_rounds.png" in text and "2405.03918" in text and "hf-gradprune" in text
    assert (out / "gradprune_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir() if p.name != LOCAL_FILE) == sorted(report["files"])  # + local-only


@pytest.mark.slow
def test_same_seed_same_filters_and_numbers(timm_backdoor, timm_result, tmp_path):
    _, first = timm_result
    out = tmp_path / "again"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet", *PRUNING) == 0
    second = read_report(out)
    assert second["pruned"] == first["pruned"]
    assert (second["before"], second["after"], second["finetune_epochs"]) == \
           (first["before"], first["after"], first["finetune_epochs"])
    a, b = load_file(out / "model.safetensors"), load_file(Path(timm_result[0]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_backdoor_removed_and_reloads(hf_backdoor, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    out = tmp_path / "hf-out"
    assert run_cli(hf_backdoor["model"], "--data", hf_backdoor["data"], "--output", out, "--quiet") == 0
    report = read_report(out)
    assert_backdoor_removed(report)  # the default recipe: no pruning, its fine-tuning alone
    assert report["method"]["recipe"] == "robust" and report["pruned"] == []
    assert report["source"]["library"] == "transformers"
    src = Path(hf_backdoor["model"])
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    net = AutoModelForImageClassification.from_pretrained(out)
    AutoImageProcessor.from_pretrained(out)
    modules = dict(net.named_modules())
    for p in report["pruned"]:
        assert modules[p["layer"]].weight[p["index"]].abs().sum() == 0
    assert {r.metric_type for r in ModelCard.load(out / "README.md").data.eval_results} == \
           {"accuracy", "attack_success_rate", "robust_accuracy"}


def test_named_target_and_eval_limit(timm_backdoor, tmp_path):
    out = tmp_path / "o"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet",
                   "--target", "zero", "--eval-limit", "50", "--max-rounds", "2", "--max-epochs", "1") == 0
    report = read_report(out)
    assert report["target"] == {"index": 0, "name": "zero", "auto": False}
    assert report["after"]["n_clean"] == 50
    assert len(report["prune"]["rounds"]) <= 2 and report["finetune_epochs"] <= 1


@pytest.mark.slow
def test_opt_in_score_variant_is_used_and_said_in_the_card(timm_backdoor, timm_result, tmp_path):
    out = tmp_path / "variant"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet",
                   "--score", "grad_x_weight", "--score-norm", "layer", *PRUNING) == 0
    report = read_report(out)
    assert report["config"]["prune"]["score"] == "grad_x_weight" and report["config"]["prune"]["normalise"] == "layer"
    assert_backdoor_removed(report)
    default_first = timm_result[1]["prune"]["rounds"][0]
    variant_first = report["prune"]["rounds"][0]
    assert variant_first["score"] != default_first["score"]  # a different score really was computed
    card = (out / "README.md").read_text()
    assert "--score grad_x_weight" in card and "--score-norm layer" in card
