"""The baseline defences (`--method`), each end to end on the tiny backdoored model: real training, real metrics,
real files that timm reloads."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import built_once, read_report, run_cli
from hf_gradprune.hub import load_model
from hf_gradprune.masks import ChannelMask
from hf_gradprune.methods import METHODS
from hf_gradprune.methods.ftsam import SAM
from hf_gradprune.prune import FilterPruner

# digits are not mirror-symmetric: fine-tune with crops only, as a user would for such data; batch 16, since the
# default 128 is one step per epoch on 90 images (measured on this model at batch 128: FT, NAD and FT-SAM keep ASR
# above 88 %; at 16 they end below 5 %)
TUNE = ["--augment", "crop", "--tune-batch-size", "16"]
# NAD at the baselines' lr 0.01: on this fixture as trained on an Intel Xeon (AVX-512) its attention loss broke
# validation accuracy at once and no epoch was kept (ASR 99.7 % unchanged); lr 0.002 ends at 69.7 %, ACC -0.8 pts
RUNS = {"ft": TUNE, "fp": TUNE, "nad": [*TUNE, "--lr", "0.002"], "ftsam": TUNE, "clp": [],
        # this 16-128-channel model collapses under ANP's CIFAR-10 eps of 0.4 (measured: 216 masks at 0 after 2000
        # iterations, so even the lowest threshold breaks validation accuracy and nothing is pruned); 0.2 suits it.
        # ANP picks its threshold on the validation split: with 1 image per class, one image is the whole alpha
        # (under torch 2.14.1 it kept threshold 0.85, 301 channels, at val ACC 0.9 and lost 21 pts of test ACC);
        # 3 per class (--val-ratio 0.3) kept 0.25, 104 channels: test ACC -10 pts, ASR 94 -> 0.3 %.
        # On the fixture as trained on an Intel Xeon (AVX-512), eps 0.1 / 0.15 / 0.2 / 0.3 left ASR at 98.8-99.7 %;
        # 0.25 took it to 92.6 % (ACC -8.4 pts): ANP is the weakest baseline on this model on any machine
        "anp": ["--anp-eps", "0.25", "--anp-iters", "500", "--val-ratio", "0.3"]}


@pytest.fixture(scope="module")
def baseline_run(timm_backdoor, tmp_path_factory) -> Callable[[str], tuple[Path, dict]]:
    """A method's run on the backdoored model -> (its output, its report), made the first time a test asks for it
    (each method apart, so that the test processes share the six runs out instead of waiting on one another)."""
    def defend(method: str, folder: Path) -> Path:
        out = folder / "out"
        assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet",
                       "--method", method, *RUNS[method]) == 0
        return out

    def run(method: str) -> tuple[Path, dict]:
        out = built_once(tmp_path_factory, f"baseline-{method}", lambda folder: defend(method, folder))
        return out, read_report(out)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "fp", "nad", "ftsam", "anp"])
def test_baseline_lowers_asr_within_alpha(baseline_run, method):
    _, report = baseline_run(method)
    before, after = report["before"], report["after"]
    assert before["asr"] > 0.9  # the fixture really is backdoored
    assert after["asr"] < before["asr"] - 0.05, (method, before, after)
    assert after["ra"] > before["ra"]
    # the methods hold VALIDATION accuracy within alpha = 0.1; with 10 validation images the test drop can be larger
    assert before["acc"] - after["acc"] <= 0.15, (method, before, after)
    for step in report["prune"].get("curve", []):
        if step.get("pruned") == len(report["pruned"]):
            assert report["prune"]["curve"][0]["val_acc"] - step["val_acc"] <= 0.10 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_baseline_output_reloads_and_card_names_the_method(baseline_run, timm_backdoor, method):
    import timm
    out, report = baseline_run(method)
    assert report["method"]["name"] == method and report["tool"]["method"] == method
    assert f"--method {method}" in report["command"]
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name.endswith(f"-{method}") and method in card.data.tags
    title, _, reference = METHODS[method]
    assert f"method **{title}**" in card.text and reference in card.text
    assert f"{100 * report['after']['asr']:.2f} %" in card.text
    assert (out / "gradprune_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == load_file(Path(timm_backdoor["model"]) / "model.safetensors").keys()
    assert all(torch.equal(v, saved[k]) for k, v in reloaded.state_dict().items())
    if method in ("ft", "nad", "ftsam"):
        assert report["pruned"] == [] and report["finetune_epochs"] >= 1
    if method != "clp":  # only CLP is data-free
        assert "does not use triggered images" in card.text


@pytest.mark.slow
def test_fp_keeps_the_last_step_within_alpha_and_the_mask_through_fine_tuning(baseline_run):
    out, report = baseline_run("fp")
    details = report["prune"]
    curve = details["curve"]
    kept = details["kept_channels"]
    assert kept == len(report["pruned"]) > 0
    base = curve[0]["val_acc"]
    within = [c for c in curve if base - c["val_acc"] <= 0.10 + 1e-9]
    assert kept == max(c["pruned"] for c in within)  # the last step within alpha, not the first one past it
    assert any(c["pruned"] > kept for c in curve) or details["stop_reason"] != "accuracy"
    head = load_file(out / "model.safetensors")["fc.weight"]
    cols = [p["index"] for p in report["pruned"]]
    assert head[:, cols].abs().max() == 0  # still zero after fine-tuning
    assert (head.abs().sum(0) > 0).sum() == head.shape[1] - kept
    scores = [p["score"] for p in report["pruned"]]
    assert scores == sorted(scores)  # least activated first


@pytest.mark.slow
def test_anp_zeroes_the_norm_scales_it_reports(baseline_run, timm_backdoor):
    out, report = baseline_run("anp")
    saved, source = load_file(out / "model.safetensors"), load_file(Path(timm_backdoor["model"]) / "model.safetensors")
    assert report["pruned"] and report["prune"]["threshold"] > 0
    for p in report["pruned"]:
        assert saved[f"{p['layer']}.weight"][p["index"]] == 0
        assert p["score"] < report["prune"]["threshold"]
    changed = {k for k in saved if not torch.equal(saved[k], source[k])}
    assert changed == {f"{p['layer']}.weight" for p in report["pruned"]}  # no fine-tuning, nothing else moved


@pytest.mark.slow
def test_clp_is_data_free_and_changes_only_the_channels_it_reports(baseline_run, timm_backdoor, tmp_path):
    out, report = baseline_run("clp")
    assert report["pruned"], "u = 3 finds outlier channels in this model"
    # data-free: another few-shot draw (seed, SPC) gives the same channels and the same weights
    other = tmp_path / "other"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", other, "--quiet",
                   "--method", "clp", "--seed", "7", "--spc", "4") == 0
    assert read_report(other)["pruned"] == report["pruned"]
    saved, again = load_file(out / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    source = load_model(timm_backdoor["model"])
    pruner = FilterPruner(source.model, source.net, torch.zeros(1, 3, *source.input_size, dtype=torch.uint8))
    norm_names = {id(m): n for n, m in source.net.named_modules()}
    allowed = set()
    for p in report["pruned"]:
        allowed |= {(f"{p['layer']}.weight", p["index"])}
        allowed |= {(f"{norm_names[id(n)]}.{w}", p["index"]) for n in pruner.norms[p["layer"]]
                    for w in ("weight", "bias")}
    original = load_file(Path(timm_backdoor["model"]) / "model.safetensors")
    for k, v in saved.items():
        diff = (v != original[k])
        if diff.any():
            rows = torch.nonzero(diff.reshape(len(v), -1).any(1)).flatten().tolist()
            assert {(k, r) for r in rows} <= allowed, k
    for p in report["pruned"]:
        assert saved[f"{p['layer']}.weight"][p["index"]].abs().sum() == 0

    # the scores are the paper's upper bound, recomputed here with numpy's SVD for one pruned layer
    layer = report["pruned"][0]["layer"]
    conv = dict(source.net.named_modules())[layer]
    norm = pruner.norms[layer][0]
    w = original[f"{layer}.weight"].numpy()
    scale = np.abs(norm.weight.detach().numpy() / np.sqrt(norm.running_var.numpy() + norm.eps))
    bound = np.array([np.linalg.svd(w[k].reshape(conv.in_channels // conv.groups, -1) * scale[k],
                                    compute_uv=False).max() for k in range(len(w))])
    expected = np.flatnonzero(bound > bound.mean() + 3 * bound.std(ddof=1)).tolist()
    assert [p["index"] for p in report["pruned"] if p["layer"] == layer] == expected


@pytest.mark.slow
def test_baseline_same_seed_same_weights(baseline_run, timm_backdoor, tmp_path):
    out = tmp_path / "again"
    assert run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", out, "--quiet",
                   "--method", "ftsam", *RUNS["ftsam"]) == 0
    first_out, first = baseline_run("ftsam")
    assert (read_report(out)["after"], read_report(out)["finetune_epochs"]) == \
        (first["after"], first["finetune_epochs"])
    a, b = load_file(out / "model.safetensors"), load_file(first_out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fp", "nad"])
def test_baselines_on_transformers(hf_backdoor, tmp_path, method):
    """FP finds transformers' classifier and NAD its stage outputs (hidden states), generically."""
    from transformers import AutoModelForImageClassification
    out = tmp_path / method
    assert run_cli(hf_backdoor["model"], "--data", hf_backdoor["data"], "--output", out, "--quiet",
                   "--method", method, *TUNE) == 0
    report = read_report(out)
    net = AutoModelForImageClassification.from_pretrained(out)
    if method == "nad":
        # NAD's betas (500 / 1000) were set for PreActResNet-18 at 32x32; on this 3-stage model the distillation
        # drives validation accuracy out of alpha from the first epoch (measured: 1.0 -> 0.1), so the within-alpha
        # selection returns the model before fine-tuning instead of a broken one
        assert report["prune"]["teacher"]["epochs"] >= 1 and report["finetune_epochs"] >= 1
        assert report["after"]["acc"] >= report["before"]["acc"] - 0.10
    if method == "fp":
        assert report["after"]["asr"] < report["before"]["asr"]
        weight = net.classifier[1].weight
        assert report["pruned"] and all(weight[:, p["index"]].abs().sum() == 0 for p in report["pruned"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "resnet"


def test_unknown_method_is_a_clear_error(timm_backdoor, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(timm_backdoor["model"], "--data", timm_backdoor["data"], "--output", tmp_path / "x", "--method", "nc")
    assert e.value.code == 2 and "--method: invalid choice: 'nc'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- shared pieces --------------------------------------------------------------------------------------------

def test_sam_step_is_the_adaptive_sharpness_aware_update():
    w0 = torch.tensor([1.0, -2.0])
    p = nn.Parameter(w0.clone())
    target = torch.tensor([0.5, 0.5])

    def closure():
        opt.zero_grad()
        loss = ((p - target) ** 2 * torch.tensor([1.0, 3.0])).sum()
        loss.backward()
        return loss
    rho, lr = 0.5, 0.1
    opt = SAM([p], rho=rho, adaptive=True, lr=lr, momentum=0.0, weight_decay=0.0)
    opt.step(closure)
    grad = lambda w: 2 * (w - target) * torch.tensor([1.0, 3.0])  # noqa: E731
    g = grad(w0)
    e = rho * w0.abs() ** 2 * g / (w0.abs() * g).norm()
    assert torch.allclose(p.detach(), w0 - lr * grad(w0 + e))


def test_channel_mask_undo_and_reapply():
    p = nn.Parameter(torch.arange(12.0).view(3, 4))
    mask = ChannelMask()
    mask.zero(p, 1, 2)
    mask.zero(p, 1, 0)
    assert p[:, 2].abs().sum() == 0 and p[:, 0].abs().sum() == 0
    mask.undo_to(1)
    assert torch.equal(p[:, 0].detach(), torch.tensor([0.0, 4.0, 8.0])) and p[:, 2].abs().sum() == 0
    with torch.no_grad():
        p.add_(1.0)
    mask.reapply()
    assert p[:, 2].abs().sum() == 0 and len(mask) == 1


@pytest.mark.slow
def test_fp_fine_tuning_stays_within_alpha_of_the_unpruned_model(baseline_run):
    """One alpha for the whole defence: every epoch FP keeps is within alpha of the model BEFORE pruning."""
    _, report = baseline_run("fp")
    base = report["prune"]["curve"][0]["val_acc"]
    accs = report["finetune"]["val_accs"]
    assert base - accs[report["finetune"]["best_epoch"]] <= 0.10 + 1e-9
