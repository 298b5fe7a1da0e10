"""Markdown tables of a continual run (the testbed's sweep): every run, and the methods at matched acquisition.

    .venv/bin/python scripts/testbed_tables.py runs/testbed/continual > results/testbed-cpu-2026-11-27/tables.md
    .venv/bin/python scripts/testbed_tables.py runs/testbed/.continual.parts --plot frontier.png  # a run cut off

Reads <dir>/summary.json (written by the continual stage); nothing is recomputed except the
held-out LOSS change, log(ppl after) / log(ppl before) - 1, next to the perplexity change the stage
reports, and the matched-acquisition table, computed from the runs the stage's way
(slotwise.continual.frontier) so that a folder written before a change of its levels reads the same.
While the stage still runs, pass its .<name>.parts folder instead: the finished runs' result.json files are read, and their frontier is computed the stage's
way (slotwise.continual.frontier; --plot draws it with the stage's plot_frontier).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def runs_from_parts(parts: Path) -> tuple[dict, dict]:
    runs = {}
    for f in sorted(parts.glob("*/result.json")):
        r = json.loads(f.read_text())["result"]
        end = r["curve"][-1]
        runs[f.parent.name] = {"group": r.get("group") or f.parent.name.split("@")[0], "learned": end["learned"],
                               "n_facts": end.get("facts_seen"), "known_kept": end["known_kept"],
                               "heldout_ppl": end["heldout_ppl"], "steps_per_fact_mean": end.get("steps_per_fact_mean"),
                               "start_ppl": r["curve"][0]["heldout_ppl"], "start_known": r["curve"][0]["known_kept"]}
    return {}, runs


def main(argv: list[str]) -> int:
    d = Path(argv[0])
    plot = Path(argv[argv.index("--plot") + 1]) if "--plot" in argv else None
    if (d / "summary.json").is_file():
        s = json.loads((d / "summary.json").read_text())
        start, runs = s["start"], s["runs"]
    else:  # a run still going (or cut off): its finished runs
        start, runs = runs_from_parts(d)
        known0 = next(iter(runs.values()))["start_known"]
        ppl0 = next(iter(runs.values()))["start_ppl"]
        for r in runs.values():
            r["known_drop"] = 1 - r["known_kept"] / known0
            r["heldout_ppl_rise"] = r["heldout_ppl"] / ppl0 - 1
        if plot is not None:
            from slotwise.continual.plots import plot_frontier

            plot_frontier(runs, plot, n_known=known0)
    from slotwise.continual.frontier import common_levels, matched

    groups = {n: r["group"] for n, r in runs.items()}
    frontier = matched(runs, groups, common_levels(runs, groups))
    ppl0 = start.get("heldout_ppl") or next(iter(runs.values()))["start_ppl"]
    known0 = start.get("known_found") or next(iter(runs.values()))["start_known"]
    print(f"Start: {known0} old facts known (of {start.get('known_screened', '?')} probed, held-out templates); "
          f"held-out ppl {ppl0:.1f}\n")
    print("| group | run | new facts learned (held-out templates) | old facts kept | held-out loss change | held-out ppl change | steps/fact |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        loss = math.log(r["heldout_ppl"]) / math.log(ppl0) - 1
        print(f"| {r['group']} | {name} | {r['learned']}/{r['n_facts']} = {r['learned'] / r['n_facts']:.2f} | "
              f"{r['known_kept']}/{known0} = {r['known_kept'] / known0:.2f} | {pct(loss)} | {pct(r['heldout_ppl'] / ppl0 - 1)} | "
              f"{format(r['steps_per_fact_mean'], '.1f') if r.get('steps_per_fact_mean') else '-'} |")
    levels = sorted({lv for g in frontier.values() for lv in g["at"]}, key=float)
    if levels:  # none when fewer than two groups meet (one method, or ranges apart)
        print("\nOld facts LOST at matched acquisition (each group's frontier interpolated at every run's acquisition "
              "two or more groups reach, slotwise.continual.frontier; '-' = that group never reached the level)\n")
        print("| group | acquisition range | " + " | ".join(f"lost @ {float(lv):.2f} learned" for lv in levels) + " |")
        print("|---|---|" + "---|" * len(levels))
        for g, f in frontier.items():
            lo, hi = f["acquisition_range"] or (None, None)
            cells = [pct(f["at"][lv]["known_drop"]) if f["at"].get(lv) else "-" for lv in levels]
            print(f"| {g} | {lo:.2f}-{hi:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
