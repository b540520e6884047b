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


BLOCKS = {"recipes": recipes, "baselines": baselines, "tier-table": tier_table, "results-file": results_file,
          "json-table": json_table, "detection": detection, "headline": headline}
FILES = ("README.md", "docs/*.md")


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
