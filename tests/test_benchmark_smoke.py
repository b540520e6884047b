"""The benchmark harness end to end on its smoke tier: real training of four backdoored models (built-in digits
data, no ../shared/data needed), the real defence on each and the six baselines on one, real metrics, the table
and the scatter plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"dataset", "model", "attack", "spc", "seed", "before", "after", "rounds", "rounds_tried", "stop_reason",
            "finetune_epochs", "pruned", "timing_s", "wall_s", "per_round_over_floor", "backdoored_model"}
STAGES = {"load", "evaluate_before", "prune", "per_round", "round_floor", "finetune", "evaluate_after", "total"}


@pytest.mark.slow
def test_smoke_tier(tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tiers.py"), "smoke", "--results", str(results),
           "--cache", str(cache), "--data", str(tmp_path / "no-shared-data")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    every = json.loads((results / "results.json").read_text())
    rows = [r for r in every if r["method"] == "gradprune"]  # the default (robust) recipe
    paper = {r["attack"]: r for r in every if r["method"] == "gradprune-paper"}
    assert sorted(r["attack"] for r in rows) == ["badnet", "blended", "bpp", "lf"] == sorted(paper)
    for r in rows + list(paper.values()):
        assert ROW_KEYS <= r.keys() and STAGES <= r["timing_s"].keys()
        assert r["dataset"] == "digits" and r["spc"] == 10 and r["seed"] == 0
        assert r["backdoored_model"]["trigger_changed_pixel_share"] > 0
        assert r["after"]["n_clean"] == r["before"]["n_clean"] > 300  # same test images before and after
        assert r["after"]["acc"] >= r["before"]["acc"] - 0.05
        assert r["rounds"] == len(r["pruned"]) <= r["rounds_tried"]
        assert r["recipe"] == ("robust" if r["method"] == "gradprune" else "paper")
    for r in rows:  # both recipes defend the same model with the same few-shot draw and test images
        assert r["before"] == paper[r["attack"]]["before"]

    # the baselines ran on the same model, draw and test images as Grad-Prune's BadNets row
    baselines = {r["method"]: r for r in every if not r["method"].startswith("gradprune")}
    assert sorted(baselines) == ["anp", "clp", "fp", "ft", "ftsam", "nad"]
    badnet = next(r for r in rows if r["attack"] == "badnet")
    for r in baselines.values():
        assert ROW_KEYS <= r.keys() and r["attack"] == "badnet" and r["per_round_over_floor"] is None
        assert r["before"] == badnet["before"] and r["backdoored_model"] == badnet["backdoored_model"]
        assert r["rounds"] == len(r["pruned"])

    # the three static attacks take hold on digits in 12 epochs, and the default recipe removes them (the paper's
    # recipe is not held to it: on one machine its LF row ended where it began, stopped by one validation image)
    # (BPP's colour squeeze barely changes near-binary digit strokes: its smoke model learns no backdoor)
    took_hold = {r["attack"]: r for r in rows if r["before"]["asr"] >= 0.5}
    assert {"badnet", "blended", "lf"} <= took_hold.keys()
    for r in took_hold.values():
        assert r["after"]["asr"] < 0.2 < r["before"]["asr"], r["attack"]
        assert r["after"]["ra"] > r["before"]["ra"]

    table = (results / "table.md").read_text()
    # 4 rows per recipe, 6 baselines, a recipe-against-recipe row per attack, and a winners row for each cell where a
    # backdoor took hold and two methods ran
    assert table.count("| digits |") == 4 + 4 + 6 + 4 + 3 and "scatter_digits.png" in table
    assert "Which method wins where" in table and "The default recipe against the paper's" in table
    assert (results / "scatter_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((cache / "models").iterdir())) == 4

    # rerun: cached models and finished rows are reused, nothing is retrained or re-run
    again = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch" not in again.stderr
    assert json.loads((results / "results.json").read_text()) == every


def test_verdict_against_the_paper():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import verdict

    def row(asr_before, asr_after, acc_before=0.8, acc_after=0.75):
        return {"before": {"asr": asr_before, "acc": acc_before}, "after": {"asr": asr_after, "acc": acc_after}}

    assert verdict([row(0.9, 0.05), row(0.9, 0.07)], "8.7").startswith("meets (ASR 6.0 vs 8.7")
    assert verdict([row(0.9, 0.05), row(0.9, 0.15)], "8.7").startswith("misses (ASR 10.0")
    assert verdict([row(0.9, 0.01, 0.8, 0.65)], "8.7").startswith("misses")  # ACC fell by more than alpha
    assert verdict([row(0.04, 0.03)], "37.6") == "no backdoor planted"
    assert verdict([row(0.9, 0.05)], "n/a") == ""


def test_blind_summary_counts_a_missed_backdoor_at_its_full_asr():
    """A backdoored model that the scan calls clean is left as it was: the blind means count its ASR in full (with
    no accuracy lost), never drop it as a missing row, and the baselines are compared on the seeds all methods ran."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tiers import blind_means, blind_vs_baselines

    model = {"acc": 0.80, "asr": 0.90, "ra": 0.1}

    def blind(seed, after=None):
        scan = {"backdoored": after is not None, "target_found": after is not None}
        row = {"dataset": "d", "attack": "badnet", "spc": 2, "seed": seed, "written": after is not None,
               "scan": scan, "backdoored_model": model}
        return row | ({"before": model, "after": {"acc": after[0], "asr": after[1]}} if after else {})

    rows = [blind(0, (0.70, 0.02)), blind(1)]  # seed 1: missed by the scan, untouched
    means = blind_means(rows).splitlines()[2]
    # (10 + 0) / 2 points lost, (2 + 90) / 2 % ASR left, 1 of 2 targets found
    assert means.split(" | ")[3:7] == ["2", "1 / 2", "5.0", "46.0"], means
    base = [{"dataset": "d", "attack": "badnet", "spc": 2, "seed": s, "method": "ft", "after": {"acc": a, "asr": r}}
            for s, a, r in ((0, 0.75, 0.5), (1, 0.65, 0.3), (2, 0.1, 0.1))]
    line = blind_vs_baselines(rows, base).splitlines()[2]
    assert line == "| d | 2 | badnet | 0,1 | 80.0 / 90.0 | 75.0 / 46.0 | 70.0 / 40.0 |", line


def test_architecture_benchmark_is_split_before_any_choice_and_summarised_apart():
    """Dev (chosen on) is five families on seeds 0-1; every other family, and every dev family's seed 2, is test."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from architectures import DEV, SEEDS, split_of, summarise
    from hf_gradprune.demo import digits_architectures
    families = digits_architectures()
    dev = {(f, s) for f in families for s in SEEDS if split_of(f, s) == "dev"}
    assert len(families) == 10 and {f for f, _ in dev} == set(DEV) and len(dev) == 10
    assert all(split_of(f, s) == "test" for f in families if f not in DEV for s in SEEDS)
    assert all(split_of(f, max(SEEDS)) == "test" for f in DEV)
    rows = [{"acc_drop": d, "after": {"asr": a}} for d, a in ((0.01, 0.02), (0.05, 0.0), (-0.01, 0.04))]
    got = summarise(rows)
    assert got["n"] == 3 and abs(got["acc_drop_mean"] - 0.05 / 3) < 1e-12 and got["acc_drop_max"] == 0.05
    assert got["asr_after_max"] == 0.04 and abs(got["asr_after_mean"] - 0.02) < 1e-12


def test_paper_tier_models_see_what_the_tool_sees(tmp_path):
    """The paper-cpu tier's model reads 32 px images resized to 64 by its own preprocessing: the zoo poisons and trains
    on exactly the pixels the tool decodes for that model when it loads the saved folder (the trigger lives at the
    same resolution for attacker and defender)."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hf_gradprune.demo import save_timm, timm_classifier
    from hf_gradprune.hub import load_model
    from tiers import TIERS
    from zoo import preprocessed
    recipe = TIERS["paper-cpu"].recipes["cifar10"]
    assert recipe.input_size == 64
    names = [f"c{i}" for i in range(10)]
    model = timm_classifier(recipe.arch, names, size=recipe.input_size, **recipe.model_args)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ours = preprocessed(model, images)
    assert ours.shape == (5, 64, 64, 3)
    loaded = load_model(str(save_timm(model, tmp_path / "model", recipe.model_args, names)))
    assert loaded.input_size == (64, 64)
    tools = loaded.to_pixels([Image.fromarray(im) for im in images])  # (N, 3, H, W)
    assert np.array_equal(ours, tools.transpose(0, 2, 3, 1))
