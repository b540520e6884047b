"""The pruning curve people look at: val accuracy and val ASR against the val unlearning loss, per round."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .prune import PruneResult

if TYPE_CHECKING:
    from .finetune import TuneResult


def plot_rounds(result: PruneResult, alpha: float, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fewshot = result.check_on == "fewshot"
    rounds = [0] + [r.round for r in result.rounds]
    acc = [result.base_val_acc] + [r.val_acc for r in result.rounds]
    loss = [result.base_val_unlearning_loss] + [r.val_unlearning_loss for r in result.rounds]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(rounds, [100 * a for a in acc], "o-", color="tab:blue", ms=3, label="val ACC (clean)")
    checked = acc
    if fewshot:
        checked = [result.base_fewshot_acc] + [r.fewshot_acc for r in result.rounds]
        loss = [result.base_fewshot_unlearning_loss] + [r.fewshot_unlearning_loss for r in result.rounds]
        ax.plot(rounds, [100 * a for a in checked], "o-", color="tab:cyan", ms=3, label="few-shot ACC (train + val)")
    if result.base_val_asr is not None:
        asr = [result.base_val_asr] + [r.val_asr for r in result.rounds]
        ax.plot(rounds, [100 * a for a in asr], "s-", color="tab:red", ms=3, label="val ASR (triggered)")
    undone = [(r.round, 100 * c) for r, c in zip(result.rounds, checked[1:]) if r.undone]
    if undone:
        ax.scatter(*zip(*undone), marker="x", color="k", s=30, zorder=3, label="unit undone and skipped")
    ax.axhline(100 * (checked[0] - alpha), color="tab:blue", ls=":", lw=1, label=f"ACC floor (alpha={alpha:g})")
    ax.axvline(result.kept_rounds, color="k", ls="--", lw=1, label=f"kept: round {result.kept_rounds}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kinds = list(dict.fromkeys(r.kind for r in result.rounds)) or ["unit"]
    ax.set_xlabel(f"pruning round (one {' / '.join(kinds)} each)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax2 = ax.twinx()
    where = "few-shot" if fewshot else "val"
    ax2.plot(rounds, loss, "^-", color="tab:green", ms=3, label=f"{where} unlearning loss")
    ax2.set_ylabel("unlearning loss (CE of triggered images vs true labels)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    fig.legend(lines, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    skipped = f", {result.skipped} undone" if result.skipped else ""
    ax.set_title(f"Gradient-based pruning: {len(result.rounds)} rounds tried{skipped}, stop: {result.stop_reason}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curve(path: Path, title: str, xlabel: str, xs: list, series: dict[str, list[float]], ylabel: str = "%",
               marker: tuple[float, str] | None = None, floor: tuple[float, str] | None = None) -> Path:
    """A baseline's curve: validation accuracy over its sweep, or validation loss over fine-tuning epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for (label, ys), style in zip(series.items(), ("o-", "s-", "^-")):
        ax.plot(xs, ys, style, label=label, ms=3)
    if floor:
        ax.axhline(floor[0], color="tab:blue", ls=":", lw=1, label=floor[1])
    if marker:
        ax.axvline(marker[0], color="k", ls="--", lw=1, label=marker[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tuning(tuned: TuneResult, title: str, path: Path) -> Path:
    return plot_curve(path, title, "fine-tuning epoch", list(range(len(tuned.val_losses))),
                      {"val loss (clean)": tuned.val_losses}, ylabel="cross-entropy",
                      marker=(tuned.best_epoch, f"kept: epoch {tuned.best_epoch}"))
