"""Several continual runs (each its own model) on one frontier: the plot, and the methods at matched acquisition.

    .venv/bin/python scripts/frontier_compare.py runs/testbed_retrofit/frontier.png \
        "retrofit:runs/testbed_retrofit/continual/summary.json" "dense twin:runs/testbed_retrofit/continual_dense/summary.json"

Each argument after the plot's path is LABEL:SUMMARY[:GROUP,...] (a continual stage's summary.json; only
the named groups if given). Retention is each model's own share of ITS known old facts, so models that
start from different numbers of known facts share one axis. The plot is the stage's plot_frontier; the
table (markdown, on stdout) is the stage's frontier.matched at every run's acquisition two groups reach.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from slotwise.continual.frontier import common_levels, matched
from slotwise.continual.plots import plot_frontier


def combined(specs: list[str]) -> dict:
    runs = {}
    for spec in specs:
        label, path, *keep = spec.split(":")
        groups = set(keep[0].split(",")) if keep else None
        for name, r in json.loads(Path(path).read_text())["runs"].items():
            if groups is None or r["group"] in groups:
                runs[f"{label}/{name}"] = {**r, "group": f"{label}: {r['group']}"}
    return runs


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str]) -> int:
    out, runs = Path(argv[0]), combined(argv[1:])
    plot_frontier(runs, out)
    groups = {n: r["group"] for n, r in runs.items()}
    levels = common_levels(runs, groups)
    table = matched(runs, groups, levels)
    print("| group | acquisition range | " + " | ".join(f"lost @ {lv:.3f} learned" for lv in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    for g, f in table.items():
        lo, hi = f["acquisition_range"]
        print(f"| {g} | {lo:.2f}-{hi:.2f} | " + " | ".join(pct(f["at"][f"{lv:g}"]["known_drop"]) for lv in levels) + " |")
    print(f"\n(old facts lost, each group's efficient runs interpolated; plot: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
