"""Grad-Prune variants measured against the two recipes (`tiers.py TIER --variant NAME`, rows in
results/<tier>-<NAME>/): each is a recipe plus changes to its PruneConfig / TuneConfig, so every row can be rerun.
The robust recipe was chosen on CIFAR-10 BadNets / Blended / LF and GTSRB Blended, SPC 10, seed 0, from the
`search` group; `tiers.py cpu --tag avx2 --compare` prints them side by side. The first three are the opt-in score
variants and the no-pruning ablation measured earlier, on the paper's recipe."""

from __future__ import annotations

from dataclasses import replace

from hf_gradprune.recipes import SYNTHESISED_TUNE_STEPS
from hf_gradprune.synth import ScanConfig

_PRUNE = {"max_rounds": 500}  # the robust recipe's pruning rules, switched on
_LR003 = {"lr": 0.003, "patience": 10}

# name -> (recipe, PruneConfig changes, TuneConfig changes, what it tests[, JobConfig changes])
VARIANTS: dict[str, tuple] = {
    "grad_x_weight": ("paper", {"score": "grad_x_weight"}, {}, "paper, filter score mean |dL/dW x W|"),
    "layer": ("paper", {"normalise": "layer"}, {}, "paper, scores divided by their layer's mean"),
    "finetune-only": ("paper", {"max_rounds": 0}, {}, "paper, no pruning: its fine-tuning stage alone"),
    # --- search (CIFAR-10 BadNets / Blended / LF and GTSRB Blended, SPC 10, seed 0). "a-": the candidate the search
    # started from, robust pruning (bound on all few-shot images, a filter that breaks it skipped) + distillation
    # fine-tuning at lr 0.003, and one change to it; "n-": no pruning. The default (robust) is n- at lr 0.001.
    "a-prune-lr003": ("robust", _PRUNE, _LR003, "robust pruning + distillation fine-tuning at lr 0.003"),
    "a-paper-prune": ("robust", {**_PRUNE, "check_on": "val", "on_break": "stop"}, _LR003,
                      "a- with the paper's pruning (bound on the validation split, stop at the first break)"),
    "a-objective": ("robust", {**_PRUNE, "keep_on": "objective"}, _LR003,
                    "a- keeping the pruning round with the lowest clean + unlearning loss"),
    "a-alpha03": ("robust", {**_PRUNE, "alpha": 0.03}, _LR003, "a- with a pruning bound of 0.03"),
    "a-objective-alpha03": ("robust", {**_PRUNE, "keep_on": "objective", "alpha": 0.03}, _LR003,
                            "a- with both of the two above"),
    "a-nodistill": ("robust", _PRUNE, {**_LR003, "distill": 0.0}, "a- without distillation (true labels only)"),
    "n-lr003": ("robust", {}, {**_LR003, "patience": 10}, "no pruning, distillation fine-tuning at lr 0.003"),
    "n-distill-only-lr003": ("robust", {}, {**_LR003, "patience": 10, "hard_labels": 0.0},
                             "n-lr003 on the distillation targets alone (no true labels)"),
    "n-hard03-lr003": ("robust", {}, {**_LR003, "patience": 10, "hard_labels": 0.3},
                       "n-lr003 with the true labels at weight 0.3"),
    # --- issue 31: the robust recipe with clean views (4 shifted copies of each clean image, each twin counted twice),
    # chosen on the architecture benchmark's dev models and measured here on models it was not chosen on
    "views4": ("robust", {}, {"clean_views": 4, "twin_repeats": 2},
               "robust with 4 shifted clean views per image and each twin counted twice (issue 31)"),
    "views0": ("robust", {}, {"clean_views": 0, "twin_repeats": 1},
               "robust as it was before issue 31: no clean views, each twin once"),
    "r-latest30": ("robust", {}, {"select": "latest_within_alpha", "max_epochs": 30, "patience": 10},
                   "robust, 30 epochs (cosine over 30), keeping the last epoch within alpha"),
    "r-patience10": ("robust", {}, {"patience": 10}, "robust with the paper's fine-tuning patience of 10"),
    "r-prune": ("robust", _PRUNE, {}, "robust + robust pruning (`--max-rounds 500`) at every SPC"),
    "r-noprune": ("robust", {"max_rounds": 0}, {}, "robust without pruning at every SPC (the default from SPC 6 on)"),
    "r-paper-select": ("robust", {}, {"select": "loss"}, "robust with the paper's epoch selection (clean val loss)"),
    "r-crop": ("robust", {}, {"augment": "crop"}, "robust + random-crop augmentation"),
    "r-sam": ("robust", {}, {"sam_rho": 2.0}, "robust + FT-SAM's adaptive SAM step (rho 2)"),
    "r-lr003": ("robust", {}, {"lr": 0.003}, "robust at lr 0.003 (patience 30, as the default)"),
    "r-bounded": ("robust", {}, {"select": "unlearning_within_alpha"},
                  "the robust recipe before this search: the same selection among epochs within alpha on the "
                  "validation split"),
    "r-unbounded": ("robust", {}, {"select": "unlearning"},
                    "robust keeping the epoch with the lowest clean + unlearning validation loss, no accuracy bound"),
    "r-bneval": ("robust", {}, {"frozen_norm_stats": True},
                 "robust with batch-norm statistics frozen while fine-tuning"),
    # --- the trigger unknown (run with --blind): the robust recipe against a synthesised trigger fine-tunes for about
    # recipes.SYNTHESISED_TUNE_STEPS optimiser steps per round; these are the same defence with another length
    "s-epochs100": ("robust", {}, {"max_steps": None},
                    "the trigger-unknown defence before the step budget: up to 100 epochs per round (cosine over 100)"),
    "s-nopullback": ("robust", {}, {"max_steps": SYNTHESISED_TUNE_STEPS},
                     "the trigger-unknown defence before the pull-back: the defended weights as the last round "
                     "left them",
                     {"scan": ScanConfig(keep_flip=None)}),
    "s-lr5e-4": ("robust", {}, {"max_steps": SYNTHESISED_TUNE_STEPS, "lr": 0.0005},
                 "s-nopullback at half the learning rate (0.0005)", {"scan": ScanConfig(keep_flip=None)}),
    # the step budget on the known trigger (robust keeps 100 epochs there)
    "r-steps80": ("robust", {}, {"max_steps": 80},
                  "robust, fine-tuning for about 80 optimiser steps (cosine over them)"),
    "r-val30": ("robust", {}, {}, "robust with 3 of the SPC images per class for validation (--val-ratio 0.3)",
                {"val_ratio": 0.3}),
}


def variant_configs(name: str, spc: int):
    """(recipe, PruneConfig, TuneConfig, JobConfig changes) of a variant, for a job at `spc`."""
    from hf_gradprune.data import train_per_class
    from hf_gradprune.recipes import recipe_configs
    recipe, prune_changes, tune_changes, _, *job = VARIANTS[name]
    job_changes = job[0] if job else {}
    prune, tune = recipe_configs(recipe, train_per_class(spc, job_changes.get("val_ratio", 0.1)))
    return recipe, replace(prune, **prune_changes), replace(tune, **tune_changes), job_changes
