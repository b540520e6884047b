"""The pruning curve people look at: val accuracy and val ASR against the val unlearning loss, per round."""

from __future__ import annotations

from pathlib import Path

from .prune import PruneResult


def plot_rounds(result: PruneResult, alpha: float, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [0] + [r.round for r in result.rounds]
    acc = [result.base_val_acc] + [r.val_acc for r in result.rounds]
    loss = [result.base_val_unlearning_loss] + [r.val_unlearning_loss for r in result.rounds]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(rounds, [100 * a for a in acc], "o-", color="tab:blue", label="val ACC (clean)")
    if result.base_val_asr is not None:
        asr = [result.base_val_asr] + [r.val_asr for r in result.rounds]
        ax.plot(rounds, [100 * a for a in asr], "s-", color="tab:red", label="val ASR (triggered)")
    ax.axhline(100 * (result.base_val_acc - alpha), color="tab:blue", ls=":", lw=1, label=f"ACC floor (alpha={alpha:g})")
    ax.axvline(result.kept_rounds, color="k", ls="--", lw=1, label=f"kept: round {result.kept_rounds}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pruning round (one filter each)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax2 = ax.twinx()
    ax2.plot(rounds, loss, "^-", color="tab:green", label="val unlearning loss")
    ax2.set_ylabel("unlearning loss (CE of triggered images vs true labels)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    fig.legend(lines, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    ax.set_title(f"Gradient-based pruning: {len(result.rounds)} rounds tried, stop: {result.stop_reason}", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
