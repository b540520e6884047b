"""Regenerate the result blocks of README.md and docs/*.md from benchmarks/results/, so they cannot drift:

    python benchmarks/docs_blocks.py            # rewrite every block in place
    python benchmarks/docs_blocks.py --check    # exit 1 naming the files out of date (the test suite runs it)

A block is written as `<!-- gen:NAME key=value ... -->` ... `<!-- /gen -->`; the text between the markers is what
BLOCKS[NAME](**keys) returns from the committed rows. Everything outside the markers is prose and is left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(?m)^([ \t]*)(<!-- gen:([\w-]+)((?: [\w-]+=\S+)*) -->\n)(.*?)^\1(<!-- /gen -->)", re.S)
BASELINES = {"ft": "FT", "fp": "FP", "nad": "NAD", "clp": "CLP", "ftsam": "FT-SAM", "anp": "ANP"}
ALPHA = 0.10


def _ints(text: str | None) -> set[int] | None:
    return None if text is None else {int(v) for v in text.split(",")}


def _rows(folder: str, spc: str | None = None, seeds: str | None = None, method: str | None = None) -> list[dict]:
    from report import load_rows, method_of
    spcs, seed_set, methods = _ints(spc), _ints(seeds), None if method is None else set(method.split(","))
    return [r for r in load_rows(RESULTS / folder)
            if (spcs is None or r["spc"] in spcs) and (seed_set is None or r["seed"] in seed_set)
            and (methods is None or method_of(r) in methods)]


def recipes(folder: str, spc: str | None = None, seeds: str | None = None) -> str:
    """The default recipe against the paper's, draw by draw (report.recipes)."""
    from report import recipes as table
    return table(_rows(folder, spc, seeds))


def baselines(folder: str, spc: str | None = None, seeds: str | None = None) -> str:
    """Which method wins where (report.winners)."""
    from report import winners
    return winners(_rows(folder, spc, seeds))


def tier_table(folder: str, method: str | None = None, spc: str | None = None) -> str:
    """Mean ± std per cell and method (report.table)."""
    from report import table
    return table(_rows(folder, spc, None, method))


def results_file(path: str) -> str:
    """A table file a benchmark script wrote from its rows (its heading line left out)."""
    text = (RESULTS / path).read_text().strip()
    return "\n".join(line for line in text.splitlines() if not line.startswith("# ")).strip()


def json_table(module: str, path: str) -> str:
    """A benchmark script's own table function over its JSON rows (scale, streaming, scan_cost)."""
    mod = __import__(module)
    data = json.loads((RESULTS / path).read_text())
    return mod.table(data if isinstance(data, list) else data["rows"])


def detection(part: str = "both", page: str = "docs/detection.md") -> str:
    """The detection benchmark's summary: dev and test lines and the default scan's failures (`page`: the link to
    docs/detection.md from the file the block is in)."""
    import detection as bench
    return bench.results_block(part, page)


def architectures(variant: str | None = None) -> str:
    """The architecture benchmark (benchmarks/architectures.py): one variant's table per family, or (no variant)
    every variant's dev and test summary."""
    import architectures as bench
    return bench.summary_table() if variant is None else bench.table(variant)


def blind_rows(folder: str, compare: str | None = None) -> str:
    """A blind tier's rows one by one (target found, ACC and ASR before -> after), beside another folder's row of
    the same cell where `compare` names one."""
    from report import load_rows

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if not r.get("written"):
            return f"called {'backdoored' if r['scan']['backdoored'] else 'clean'}, untouched"
        b, a = r["before"], r["after"]
        return (f"{'found' if r['scan']['target_found'] else 'missed'}; {100 * b['acc']:.1f} -> {100 * a['acc']:.1f} / "
                f"{100 * b['asr']:.1f} -> {100 * a['asr']:.1f}")
    key = (lambda r: (r["dataset"], r["attack"], r["spc"], r["seed"]))
    other = {key(r): r for r in load_rows(RESULTS / compare)} if compare else {}
    lines = ["| dataset | attack | SPC | seed | " + f"`{folder}`: target; ACC / ASR before -> after"
             + (f" | `{compare}`" if compare else "") + " |", "|---|---|---|---|---|" + ("---|" if compare else "")]
    for r in sorted(load_rows(RESULTS / folder), key=key):
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['spc']} | {r['seed']} | {cell(r)}"
                     + (f" | {cell(other.get(key(r)))}" if compare else "") + " |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def headline(folder: str = "cpu-avx512", blind: str = "cpu-avx512-blind", spc: str = "10") -> str:
    """README's one table: each backdoor at one SPC, the default recipe with the trigger known and unknown, the
    paper's recipe and the best trigger-free baseline within alpha, means over the seeds every column has."""
    from report import method_of
    from tiers import _blind_after
    level = int(spc)
    rows = [r for r in _rows(folder, spc) if r["attack"] != "bpp"]
    blind_rows = [r for r in _rows(blind, spc) if r["attack"] != "clean"]
    lines = [f"| SPC {level} | ACC / ASR before | Grad-Prune, trigger known | paper's recipe | Grad-Prune, trigger "
             "unknown (target found) | best trigger-free baseline within 10 points |", "|---|---|---|---|---|---|"]
    for dataset, attack in sorted({(r["dataset"], r["attack"]) for r in rows}):
        cell = [r for r in rows if (r["dataset"], r["attack"]) == (dataset, attack)]
        by = {m: {r["seed"]: r for r in cell if method_of(r) == m} for m in ("gradprune", "gradprune-paper",
                                                                             *BASELINES)}
        seeds = sorted(by["gradprune"])
        bl = {r["seed"]: r for r in blind_rows if (r["dataset"], r["attack"]) == (dataset, attack)}

        def after(rs: list[dict]) -> str:
            return (f"{100 * _mean([r['after']['acc'] for r in rs]):.1f} / "
                    f"{100 * _mean([r['after']['asr'] for r in rs]):.1f}") if rs else "-"
        first = by["gradprune"][seeds[0]]
        known = after([by["gradprune"][s] for s in seeds])
        paper = after([by["gradprune-paper"][s] for s in seeds if s in by["gradprune-paper"]])
        unknown = "-"
        if bl:
            got = [_blind_after(bl[s]) for s in sorted(bl)]
            found = sum(bl[s]["scan"]["target_found"] for s in bl)
            unknown = (f"{_mean([g[2] for g in got]):.1f} / {_mean([g[1] for g in got]):.1f} "
                       f"({found} / {len(bl)})")
        best, best_asr = "none", None
        for m in BASELINES:
            rs = [by[m][s] for s in seeds if s in by[m]]
            if len(rs) != len(seeds):
                continue
            drop = _mean([r["before"]["acc"] - r["after"]["acc"] for r in rs])
            asr = _mean([r["after"]["asr"] for r in rs])
            if drop <= ALPHA and (best_asr is None or asr < best_asr):
                best, best_asr = f"{BASELINES[m]} {after(rs)}", asr
        lines.append(f"| {dataset} {attack} | {100 * first['before']['acc']:.1f} / {100 * first['before']['asr']:.1f} "
                     f"| {known} | {paper} | {unknown} | {best} |")
    lines += ["", f"ACC / ASR after the defence, %, means over seeds {','.join(map(str, seeds))} (one few-shot draw "
              f"each; ASR with the real trigger, which the trigger-unknown defence never sees); rows in "
              f"`benchmarks/results/{folder}/` and `benchmarks/results/{blind}/`."]
    return "\n".join(lines)


MACHINES = {"avx512": "Intel Xeon, AVX-512 / AMX, 2 cores", "avx2": "AMD EPYC, AVX2, 2 cores",
            "epyc": "AMD EPYC, AVX-512, 2 cores", "": "the first machine (its rows predate machine tags)"}
# each published folder: (what it holds, the command that makes it, the machine's tag in MACHINES); the searches
# under experiments/ are described from their names (tier, machine tag, variants.py's variant)
FOLDERS = {
    "architectures": ("digits models of ten families, BadNets, SPC 10, seeds 0-2: what the defence costs, dev / test",
                      "python benchmarks/architectures.py run --variant VARIANT", "epyc"),
    "cpu": ("cpu tier: Grad-Prune in the paper's recipe and the six baselines, SPC 2 / 10 / 100",
            "python benchmarks/tiers.py cpu", ""),
    "cpu-avx2": ("cpu tier, both recipes at SPC 10 on another machine's models",
                 "python benchmarks/tiers.py cpu --tag avx2 --spc 10 --method gradprune gradprune-paper", "avx2"),
    "cpu-avx512": ("cpu tier: both recipes and the six baselines, SPC 2 / 10 / 100, seeds 0-2",
                   "python benchmarks/tiers.py cpu --tag avx512", "avx512"),
    "cpu-avx512-blind": ("the trigger unknown to the defence (--blind), clean models too, SPC 2 / 10 / 100",
                         "python benchmarks/tiers.py cpu --tag avx512 --blind", "avx512"),
    "cpu-avx512-heldout": ("both recipes on held-out draws (seeds 3-4)",
                           "python benchmarks/tiers.py cpu --tag avx512-heldout --spc 2 10 --seeds 3 4", "avx512"),
    "cpu-convnext-avx512": ("a narrow timm ConvNeXt on CIFAR-10, both recipes and the baselines",
                            "python benchmarks/tiers.py cpu-convnext --tag avx512", "avx512"),
    "cpu-vit-avx512": ("a small timm ViT on CIFAR-10, both recipes and the baselines",
                       "python benchmarks/tiers.py cpu-vit --tag avx512", "avx512"),
    "cpu-epyc-blind": ("the blind tier's GTSRB SPC 10 cells with the scan's screen, on this machine's models",
                       "python benchmarks/tiers.py cpu --tag epyc --blind --spc 10 --only gtsrb badnet blended lf "
                       "clean", "epyc"),
    "detection": ("the detection benchmark: 70 models, dev / test, rows per scan variant",
                  "python benchmarks/detection.py train|scan|report", "epyc"),
    "multiproc": ("1 against 2 processes (accelerate launch): time, same pruning and numbers",
                  "python benchmarks/multiproc.py --spc 100 --rounds 6 --epochs 3 --repeats 3", "avx512"),
    "paper-cpu": ("paper tier on CPU: timm ResNet-18 (half width) reading 64 px, aiming at the paper's accuracy",
                  "python benchmarks/tiers.py paper-cpu", "avx2"),
    "scale-avx512": ("224-px resnet50 / ViT-B/16 at 10-1000 classes: memory, time per round",
                     "python benchmarks/scale.py --tag avx512", "avx512"),
    "scan-cost-avx512": ("the scan's time at 10 / 100 / 1000 classes (the probe)",
                         "python benchmarks/scan_cost.py --select probe --results "
                         "benchmarks/results/scan-cost-avx512", "avx512"),
    "scan-cost-epyc": ("the scan's time by model and path (screen, probe) at 10 and 43 classes",
                       "python benchmarks/scan_cost.py --results benchmarks/results/scan-cost-epyc", "epyc"),
    "smoke": ("the smoke tier on digits: both recipes and the baselines (the test suite runs it)",
              "python benchmarks/tiers.py smoke", ""),
    "speed": ("a pruning round's time against its forward + backward floor", "python benchmarks/speed.py", ""),
    "train-speed": ("minutes per CIFAR-10 epoch of the paper-cpu tier's model and the candidates it was chosen from",
                    "python benchmarks/train_speed.py --threads 1", "avx2"),
    "streaming-avx512": ("a large test set held against streamed: memory, time",
                         "python benchmarks/streaming.py --images 2000 --tag avx512", "avx512"),
}


EXPERIMENTS = {  # the searches whose names carry no variant
    "architectures-unlearning": "benchmarks/unlearning_cost.py: the default defence replayed with one change, dev",
    "architectures-views": "benchmarks/unlearning_cost.py --out ...: clean views against the default before issue 31",
    "blind-rounds-avx512": "logs of benchmarks/blind_rounds.py: round by round, the pull-back's shares",
    "tune-length-avx512": "logs of benchmarks/tune_length.py: the fine-tuning step budget",
    "cpu-avx512-units": "the ResNet rows rerun with the unit engine (--tag avx512-units): all 36 identical",
}


def _cited(name: str) -> str:
    pages = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             if re.search(r"(?:results/|experiments/|path=|`)" + re.escape(name) + r"(?![\w-])", p.read_text())]
    return ", ".join(f"[{p.name}](../../{p.relative_to(ROOT)})" for p in pages) or "-"


def results_index() -> str:
    """benchmarks/results/README.md's table: one line per folder, what made it, on which machine, what cites it."""
    from variants import VARIANTS
    lines = ["| folder | what | command | machine | cited by |", "|---|---|---|---|---|"]
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name != "experiments"):
        if folder.name not in FOLDERS:
            raise KeyError(f"benchmarks/results/{folder.name}: not in docs_blocks.FOLDERS; say what made it")
        what, command, tag = FOLDERS[folder.name]
        lines.append(f"| [{folder.name}]({folder.name}/) | {what} | `{command}` | {MACHINES[tag]} | "
                     f"{_cited(folder.name)} |")
    lines += ["", "Searches (variants and settings measured against the defaults; `python benchmarks/tiers.py TIER "
              "--tag TAG --variant VARIANT`, `--compare` for the `*-variants.md` tables):", "",
              "| folder | variant | machine | cited by |", "|---|---|---|---|"]
    for path in sorted((RESULTS / "experiments").iterdir()):
        name = path.name.removesuffix(".md")
        variant = max((v for v in VARIANTS if f"-{v}-" in f"{name}-"), key=len, default=None)
        tag = next((t for t in MACHINES if t and f"-{t}" in name), "")
        if variant:
            what = VARIANTS[variant][3]
            cited = _cited(path.name)  # else through its tier's side-by-side table
            if cited == "-":
                table = f"{name[:name.index(f'-{variant}')]}-variants.md"
                cited = f"the column of `{table}` in " + _cited(table) if (path.parent / table).is_file() else "-"
        elif name.endswith("-variants"):
            what, cited = "the variants side by side (`--compare`)", _cited(path.name)
        elif name in EXPERIMENTS:
            what, cited = EXPERIMENTS[name], _cited(path.name)
        else:
            raise KeyError(f"benchmarks/results/experiments/{name}: not in docs_blocks.EXPERIMENTS; say what made it")
        lines.append(f"| [{path.name}](experiments/{path.name}) | {what} | {MACHINES[tag]} | {cited} |")
    return "\n".join(lines)


BLOCKS = {"results-index": results_index, "recipes": recipes, "baselines": baselines, "tier-table": tier_table,
          "results-file": results_file, "blind-rows": blind_rows,
          "json-table": json_table, "detection": detection, "headline": headline, "architectures": architectures}
FILES = ("README.md", "docs/*.md", "benchmarks/results/README.md")


def render(text: str) -> str:
    def one(m: re.Match) -> str:  # a block inside a list item keeps the item's indentation
        indent, keys = m.group(1), dict(kv.split("=", 1) for kv in m.group(4).split())
        body = "\n".join((indent + line).rstrip() for line in BLOCKS[m.group(3)](**keys).rstrip().split("\n"))
        return indent + m.group(2) + body + "\n" + indent + m.group(6)
    return BLOCK.sub(one, text)


def files() -> list[Path]:
    return sorted({p for pattern in FILES for p in ROOT.glob(pattern)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the files out of date")
    args = ap.parse_args(argv)
    stale = []
    for path in files():
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run `python benchmarks/docs_blocks.py`", file=sys.stderr)
        return 1
    print(("rewrote " if stale else "up to date: ") + (", ".join(map(str, stale)) or f"{len(files())} files"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
