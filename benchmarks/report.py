"""Table (ours beside the paper's Table I) and scatter plots (ACC and RA against ASR, as the paper's Fig. 1)
from the rows of one tier."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PAPER = Path(__file__).resolve().parent / "paper_table1.json"


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def load_rows(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]


def paper_cells() -> dict:
    if not PAPER.is_file():
        return {}
    table = json.loads(PAPER.read_text())
    return {(r["attack"], r["spc"], r["method"]): r for r in table["rows"]}


METHOD_ORDER = ("gradprune", "gradprune-paper", "ft", "fp", "nad", "clp", "ftsam", "anp")


def method_of(row: dict) -> str:
    return row.get("method", "gradprune")


def _paper(cells: dict, dataset: str, attack: str, spc: int, key: str, method: str = "gradprune") -> str:
    method = "gradprune" if method == "gradprune-paper" else method  # Table I has one Grad-Prune: the paper's
    r = cells.get((attack, spc, method)) if dataset == "cifar10" else None
    if not r or r.get(f"{key}_mean") is None:
        return "n/a"
    std = r.get(f"{key}_std")
    return f"{r[f'{key}_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def verdict(rs: list[dict], paper_asr: str, alpha: float = 0.10) -> str:
    """Our mean ASR against the paper's Grad-Prune mean, with the test ACC drop held within alpha."""
    if statistics.mean(r["before"]["asr"] for r in rs) < 0.5:
        return "no backdoor planted"
    if paper_asr == "n/a":
        return ""
    asr = 100 * statistics.mean(r["after"]["asr"] for r in rs)
    drop = statistics.mean(r["before"]["acc"] - r["after"]["acc"] for r in rs)
    ok = asr <= float(paper_asr.split()[0]) and drop <= alpha
    return ("meets" if ok else "misses") + f" (ASR {asr:.1f} vs {paper_asr}, ACC drop {100 * drop:.1f})"


def table(rows: list[dict]) -> str:
    cells = paper_cells()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["attack"], r["spc"], METHOD_ORDER.index(method_of(r))), []).append(r)
    lines = ["| dataset | attack | SPC | method | runs | ACC before | ACC after | ASR before | ASR after | RA after | "
             "paper ASR (same method) | vs paper | zeroed | FT epochs | round / floor | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (d, a, s, m), rs in sorted(groups.items()):
        def col(stage, key, rs=rs):
            return _ms([r[stage][key] for r in rs])
        method = METHOD_ORDER[m]
        paper = _paper(cells, d, a, s, "asr", method)
        floors = [r["per_round_over_floor"] for r in rs if r.get("per_round_over_floor") is not None]
        lines.append(
            f"| {d} | {a} | {s} | {method} | {len(rs)} | {col('before', 'acc')} | {col('after', 'acc')} | "
            f"{col('before', 'asr')} | {col('after', 'asr')} | {col('after', 'ra')} | {paper} | "
            f"{verdict(rs, paper)} | {statistics.mean(r['rounds'] for r in rs):.1f} | "
            f"{statistics.mean(r['finetune_epochs'] for r in rs):.1f} | "
            f"{f'{statistics.median(floors):.2f}' if floors else '-'} | "
            f"{statistics.median(r['wall_s'] for r in rs):.0f} |")
    lines.append("")
    lines.append("Mean ± std over seeds, in %, on the full test set. 'gradprune': Grad-Prune in its default (robust) "
                 "recipe; 'gradprune-paper': in the paper's recipe (`--recipe paper`). 'vs paper': our mean ASR "
                 "against the paper's mean for the same method with the test ACC drop within alpha = 0.1. "
                 "'no backdoor planted': the attack did not take hold in training (ASR before < 50 %), so the cell "
                 "does not test the defence. "
                 "'zeroed': channels the defence zeroed (Grad-Prune: filters kept pruned). "
                 "'round / floor': median time of a pruning round over one forward+backward on the training split "
                 "plus one forward on the validation split, measured in the same run. Paper values: Dunnett et al. "
                 "2024 Table I (PreActResNet-18, CIFAR-10) where available here (benchmarks/paper_table1.json), "
                 "else n/a.")
    return "\n".join(lines)


def winners(rows: list[dict], alpha: float = 0.10) -> str:
    """Per cell, the methods ranked by mean ASR after, among those whose mean ACC drop stays within alpha; only cells
    where the attack took hold and every method has run on the same seeds."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["attack"], r["spc"]), {}).setdefault(method_of(r), []).append(r)
    lines = ["| dataset | attack | SPC | seeds | best (ASR after, ACC drop) | Grad-Prune rank | paper recipe rank | "
             "ASR after by method |",
             "|---|---|---|---|---|---|---|---|"]
    for (d, a, s), by_method in sorted(cells.items()):
        if len(by_method) < 2 or statistics.mean(r["before"]["asr"] for rs in by_method.values() for r in rs) < 0.5:
            continue
        seeds = set.intersection(*({r["seed"] for r in rs} for rs in by_method.values()))
        if not seeds:
            continue
        stats = {}
        for m, rs in by_method.items():
            rs = [r for r in rs if r["seed"] in seeds]
            stats[m] = (statistics.mean(r["after"]["asr"] for r in rs),
                        statistics.mean(r["before"]["acc"] - r["after"]["acc"] for r in rs))
        ok = sorted((asr, m) for m, (asr, drop) in stats.items() if drop <= alpha)
        best = f"{ok[0][1]} ({100 * ok[0][0]:.1f}, {100 * stats[ok[0][1]][1]:.1f})" if ok else "none within alpha"
        def rank(method: str, ok=ok, stats=stats) -> str:
            at = next((i + 1 for i, (_, m) in enumerate(ok) if m == method), None)
            return f"{at} of {len(ok)}" if at else "outside alpha" if method in stats else "-"
        by = ", ".join(f"{m} {100 * stats[m][0]:.1f}{'' if stats[m][1] <= alpha else '*'}"
                       for m in METHOD_ORDER if m in stats)
        lines.append(f"| {d} | {a} | {s} | {len(seeds)} | {best} | {rank('gradprune')} | "
                     f"{rank('gradprune-paper')} | {by} |")
    lines.append("")
    lines.append("Mean over the seeds every method ran, in %. A method whose mean test ACC drop exceeds alpha = 0.1 "
                 "(marked *) is not ranked.")
    return "\n".join(lines)


def recipes(rows: list[dict]) -> str:
    """Grad-Prune's default (robust) recipe against the paper's, draw by draw: the same model, few-shot draw and test
    images in both, so 'worst draw' is the largest ASR by which the default did worse than the paper on one seed."""
    pairs: dict[tuple, list[tuple[dict, dict]]] = {}
    paper = {(r["dataset"], r["attack"], r["spc"], r["seed"]): r for r in rows if method_of(r) == "gradprune-paper"}
    for r in rows:
        key = (r["dataset"], r["attack"], r["spc"], r["seed"])
        if method_of(r) == "gradprune" and key in paper:
            pairs.setdefault(key[:3], []).append((r, paper[key]))
    lines = ["| dataset | attack | SPC | seeds | ASR before | paper: ACC / ASR / RA | robust: ACC / ASR / RA | "
             "ASR robust - paper, worst draw | ACC drop paper / robust |", "|---|---|---|---|---|---|---|---|---|"]

    def mean(rs, part, key):
        return 100 * statistics.mean(r[part][key] for r in rs)
    for (d, a, s), ps in sorted(pairs.items()):
        robust, pap = [p[0] for p in ps], [p[1] for p in ps]
        worst = max(100 * (r["after"]["asr"] - p["after"]["asr"]) for r, p in ps)
        lines.append(f"| {d} | {a} | {s} | {len(ps)} | {mean(pap, 'before', 'asr'):.1f} | "
                     + " | ".join(" / ".join(f"{mean(rs, 'after', k):.1f}" for k in ("acc", "asr", "ra"))
                                  for rs in (pap, robust))
                     + f" | {worst:+.1f} | {mean(pap, 'before', 'acc') - mean(pap, 'after', 'acc'):.1f} / "
                       f"{mean(robust, 'before', 'acc') - mean(robust, 'after', 'acc'):.1f} |")
    lines.append("")
    lines.append("Mean over the seeds both recipes ran, in %; each seed is one few-shot draw, defended by both "
                 "recipes.")
    return "\n".join(lines) if pairs else ""


def scatter(rows: list[dict], path: Path, dataset: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["dataset"] == dataset]
    if not rows:
        return None
    attacks = sorted({r["attack"] for r in rows})
    spcs = sorted({r["spc"] for r in rows})
    colours = dict(zip(spcs, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    markers = dict(zip(METHOD_ORDER, "o^sDvPX*"))
    several = len({method_of(r) for r in rows}) > 1
    fig, axes = plt.subplots(2, len(attacks), figsize=(3.2 * len(attacks), 6), dpi=100, squeeze=False)
    for j, attack in enumerate(attacks):
        for i, key in enumerate(("acc", "ra")):
            ax = axes[i][j]
            for r in rows:
                if r["attack"] != attack:
                    continue
                ax.scatter(100 * r["after"]["asr"], 100 * r["after"][key], color=colours[r["spc"]], s=18,
                           marker=markers[method_of(r)], label=f"SPC {r['spc']}")
                if several:  # a legend entry per method, in black
                    ax.scatter([], [], color="k", marker=markers[method_of(r)], s=18, label=method_of(r))
                ax.scatter(100 * r["before"]["asr"], 100 * r["before"][key], facecolors="none", edgecolors="grey", s=18,
                           label="before")
            ax.set_xlim(-3, 103)
            ax.set_ylim(-3, 103)
            ax.set_xlabel("ASR %")
            ax.set_ylabel(f"{key.upper()} %")
            if i == 0:
                ax.set_title(f"{dataset} / {attack}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 8), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(tier: str, folder: Path) -> str:
    rows = load_rows(folder)
    text = f"# hf-gradprune benchmark, tier `{tier}`\n\n" + table(rows) + "\n"
    both = recipes(rows)
    if both:
        text += "\n## The default recipe against the paper's, draw by draw\n\n" + both + "\n"
    if len({method_of(r) for r in rows}) > 1:
        text += "\n## Which method wins where\n\n" + winners(rows) + "\n"
    for dataset in sorted({r["dataset"] for r in rows}):
        png = scatter(rows, folder / f"scatter_{dataset}.png", dataset)
        if png:
            text += f"\n![{dataset}: ACC and RA against ASR]({png.name})\n"
    (folder / "table.md").write_text(text)
    (folder / "results.json").write_text(json.dumps(rows, indent=2))
    return text


def compare_variants(results: Path, tier: str, seeds: set[int] | None = None) -> str:
    """Grad-Prune's variants (variants.py, their rows under results/experiments/) side by side with its two recipes,
    on the cells they ran (mean over seeds, in %); each variant's column says which recipe it changes."""
    from variants import VARIANTS
    tier_rows = load_rows(results / tier)
    columns = [("robust", [r for r in tier_rows if method_of(r) == "gradprune"]),
               ("paper", [r for r in tier_rows if method_of(r) == "gradprune-paper"])]
    folders = sorted(p for p in (results / "experiments").glob(f"{tier}-*")
                     if p.is_dir() and p.name[len(tier) + 1:] in VARIANTS)
    columns += [(p.name[len(tier) + 1:], load_rows(p)) for p in folders]
    by_cell = {}
    for name, rows in columns:
        for r in rows:
            by_cell.setdefault((r["dataset"], r["attack"], r["spc"]), {}).setdefault(name, []).append(r)
    names = [n for n, rows in columns if rows]
    lines = ["| dataset | attack | SPC | " + " | ".join(f"{n}: ACC / ASR / RA" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    totals = {n: [] for n in names}
    for (d, a, s), cell in sorted(by_cell.items()):
        if len(cell) < 2 or statistics.mean(r["before"]["asr"] for rs in cell.values() for r in rs) < 0.5:
            continue  # nothing to compare, or no backdoor planted (the cell does not test a defence)
        shared = seeds if seeds is not None else set.intersection(*({r["seed"] for r in rs} for rs in cell.values()))
        cols = []
        for n in names:
            rs = [r for r in cell.get(n, []) if r["seed"] in shared]
            if not rs:
                cols.append("-")
                continue
            acc, asr, ra = (100 * statistics.mean(r["after"][k] for r in rs) for k in ("acc", "asr", "ra"))
            totals[n].append((acc, asr, ra))
            cols.append(f"{acc:.1f} / {asr:.1f} / {ra:.1f}")
        lines.append(f"| {d} | {a} | {s} | " + " | ".join(cols) + " |")
    lines.append("| **mean** | | | " + " | ".join(
        " / ".join(f"{statistics.mean(v[i] for v in totals[n]):.1f}" for i in range(3)) if totals[n] else "-"
        for n in names) + " |")
    over = ("seeds " + ", ".join(map(str, sorted(seeds))) if seeds is not None
            else "the seeds every column ran in the cell")
    lines.append(f"\nMean over {over}, in %, after the defence; cells whose attack did "
                 "not take hold are left out. robust / paper: the two recipes. Variants (benchmarks/variants.py):")
    lines += [f"- {n}: {VARIANTS[n][3]}" for n in names if n in VARIANTS]
    return "\n".join(lines)
