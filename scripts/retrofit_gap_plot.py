"""One frontier plot for the testbed's retrofit gap: several continual runs (each its own model) side by side.

    .venv/bin/python scripts/retrofit_gap_plot.py results/testbed-cpu-2026-11-27/retrofit_gap/frontier.png \
        "dense twin:results/.../dense_continual_summary.json" "retrofit:results/.../replace_continual_summary.json" ...

Each argument after the output is LABEL:SUMMARY[:GROUP,...] (a continual stage's summary.json; only the
named groups if given). Retention is each model's own share of its known old facts, so models that
start from different numbers of known facts share one axis; drawn with the stage's plot_frontier.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from slotwise.continual.plots import plot_frontier


def main(argv: list[str]) -> int:
    out, specs = Path(argv[0]), argv[1:]
    runs = {}
    for spec in specs:
        label, path, *keep = spec.split(":")
        groups = set(keep[0].split(",")) if keep else None
        for name, r in json.loads(Path(path).read_text())["runs"].items():
            if groups is None or r["group"] in groups:
                runs[f"{label}/{name}"] = {**r, "group": f"{label}: {r['group']}"}
    plot_frontier(runs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
