"""The detection benchmark's design, checked without training: the population covers what the Hub has (families,
datasets, trigger kinds, every corner and the centre, targets, poisoning rates, clean models with and without
augmentation) on both sides of a split fixed before any scan, its triggers stamp what they say, and its summary
counts a missed backdoor as a wrong target."""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import detection  # noqa: E402
from hf_gradprune.triggers import make_trigger  # noqa: E402


def test_population_is_fixed_balanced_and_split_before_tuning():
    specs = detection.population()
    assert specs == detection.population()  # drawn from a fixed seed: the split never moves
    assert len({s.name for s in specs}) == len(specs) == 70
    for part, backdoored in (("dev", 20), ("test", 30)):
        side = [s for s in specs if s.split == part]
        assert Counter(s.backdoored for s in side) == {True: backdoored, False: 10}
        # every family and dataset on both sides, clean models with and without augmentation on both sides
        assert {(s.family, s.dataset) for s in side} == {(f, d) for f in detection.FAMILIES for d in detection.DATASETS}
        assert {s.augment for s in side if not s.backdoored} == {True, False}
        assert {s.trigger["kind"] for s in side if s.backdoored} == {"patch", "blend", "additive"}
    # the later draws (bd4) leave every earlier one where it was: the first and last of the first 60 keep the
    # configuration (and so the cache key) they were trained under
    assert specs[:60] == [s for s in specs if not s.name.endswith("-bd4")]
    assert (specs[0].name, specs[0].key()) == ("cifar10-timm-resnet-bd0", "f61c7e0d01")
    assert (specs[59].name, specs[59].key()) == ("gtsrb-hf-resnet-clean1", "e2e68cbc9b")
    backdoored = [s for s in specs if s.backdoored]
    assert {s.trigger["place"] for s in backdoored if s.trigger["kind"] == "patch"} == set(detection.PLACES)
    assert {s.trigger["size"] for s in backdoored if s.trigger["kind"] == "patch"} <= set(range(2, 7))
    assert all(0.01 <= s.poison_rate <= 0.1 for s in backdoored)
    assert len({s.target for s in backdoored}) > 15 and Counter(s.target for s in backdoored)[0] < 5
    assert all(0.1 <= s.trigger["alpha"] <= 0.3 for s in backdoored if s.trigger["kind"] == "blend")


def test_triggers_stamp_where_and_what_the_spec_says(tmp_path):
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    for s in detection.population():
        if not s.backdoored:
            continue
        t = s.trigger
        stamped = make_trigger(detection.trigger_spec(t, tmp_path / s.name), (32, 32))(x)
        changed = (stamped != x).any(1)[0]
        if t["kind"] == "patch":  # only the patch's own pixels (a colour equal to the background may change none)
            outside = changed.clone()
            outside[t["y"]:t["y"] + t["size"], t["x"]:t["x"] + t["size"]] = False
            assert not outside.any() and changed.any(), s.name
        else:  # blends and additive signals touch most of the image
            assert changed.float().mean() > 0.5, s.name


def _row(name, split, backdoored, anomaly, right=False, called=None, kind="patch"):
    return {"name": name, "split": split, "family": "f", "dataset": "d", "backdoored": backdoored,
            "planted": True if backdoored else None, "anomaly": anomaly, "target_right": right,
            "called_backdoored": anomaly > 2 if called is None else called,
            "trigger": {"kind": kind} if backdoored else None, "timing_s": {"scan": 1.0},
            "target": 0 if backdoored else None, "scan": {"per_class": [{"class": 1 if name == "c" else 0}]}}


def test_summary_counts_a_missed_backdoor_as_a_wrong_target():
    rows = [_row("a", "dev", True, 6.0, right=True), _row("b", "dev", True, 3.0, right=False),  # wrong class named
            _row("c", "dev", True, 1.0), _row("d", "dev", False, 0.5), _row("e", "dev", False, 2.5)]
    rows.append({**_row("f", "dev", True, 0.1), "planted": False})  # not planted: left out
    m = detection.summarise(rows)
    assert (m["n_backdoored"], m["n_clean"]) == (3, 2) and m["not_planted"] == ["f"]
    assert m["target_accuracy"] == 1 / 3 and m["detected"] == 2 / 3 and m["clean_called_clean"] == 0.5
    assert m["target_scanned"] == 2 / 3  # "c": its target was not among the classes scanned
    # pairs (backdoored, clean) ranked right: 6 > both, 3 > both, 1 > 0.5 only -> 5 of 6
    assert np.isclose(m["auroc"], 5 / 6)


def test_a_row_scanned_under_other_settings_is_stale_unless_they_cannot_act(monkeypatch):
    spec_c = next(s for s in detection.population() if s.dataset == "cifar10")
    spec_g = next(s for s in detection.population() if s.dataset == "gtsrb")
    rows = {s.name: {"key": s.key(), "scan_settings": detection.scan_settings("default", s.dataset)}
            for s in (spec_c, spec_g)}
    assert all(detection.is_current(rows[s.name], s, "default") for s in (spec_c, spec_g))
    assert not detection.is_current({**rows[spec_c.name], "key": "0" * 10}, spec_c, "default")  # retrained model
    # the class selection acts only above max_classes (10): GTSRB's 43 classes rescan, CIFAR-10's 10 do not
    monkeypatch.setitem(detection.VARIANTS, "default", {"select": "probe"})
    assert detection.is_current(rows[spec_c.name], spec_c, "default")
    assert not detection.is_current(rows[spec_g.name], spec_g, "default")
    # where the probe chooses, the screen's settings cannot act: a GTSRB row scanned under the probe stays current
    probed = {"key": spec_g.key(), "scan_settings": detection.scan_settings("default", "gtsrb")}
    monkeypatch.setitem(detection.VARIANTS, "default", {"select": "probe", "screen_batch": 64, "screen_steps": 5})
    assert detection.is_current(probed, spec_g, "default")
    monkeypatch.setitem(detection.VARIANTS, "default", {"select": "probe", "probe_steps": 30})
    assert not detection.is_current(probed, spec_g, "default")
    monkeypatch.setitem(detection.VARIANTS, "default", {"steps": 300})  # acts on every model
    assert not detection.is_current(rows[spec_c.name], spec_c, "default")


def test_a_new_threshold_rejudges_rows_without_a_rescan(monkeypatch):
    spec = next(s for s in detection.population() if s.backdoored)
    row = {"key": spec.key(), "scan_settings": {**detection.scan_settings("default", spec.dataset), "threshold": 2.0},
           "anomaly": 2.3, "best_class": spec.target, "target": spec.target, "verdict": "scanned under 2.0"}
    assert detection.is_current(row, spec, "default")  # the threshold measures nothing: no rescan
    monkeypatch.setitem(detection.VARIANTS, "default", {"threshold": 2.0})
    at_2 = detection.judged(row, "default")
    assert at_2["called_backdoored"] and at_2["target_right"] and at_2["verdict"] == "scanned under 2.0"
    monkeypatch.setitem(detection.VARIANTS, "default", {"threshold": 2.5})
    at_25 = detection.judged(row, "default")
    assert not at_25["called_backdoored"] and not at_25["target_right"] and at_25["reported_target"] is None
    assert at_25["verdict"].startswith("no backdoor found: highest anomaly index 2.30 <= 2.5")
