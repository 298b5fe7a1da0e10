"""Print what the last pipeline run produced: a short table per stage, read from the stage outputs.

    python -m slotwise.components.report [--runs runs]      # `make repro` runs it after `dvc repro`

What each stage produced (one line each); the heal's held-out perplexity with the memory on and
off and its slot usage; the slot table of slot_stats; the continual table (per run: facts learned,
known facts kept, held-out perplexity, the size of one fact's sparse delta) and the methods
compared at matched acquisition; the evaluate scores; where the plots are. A stage not run yet is
said so; nothing is computed here, only read (summary.json, metrics.json, curves.json, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.table import Table

STAGES = ("data", "retrofit", "train", "slot_stats", "continual", "evaluate")
NONE = "-"


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def num(x, digits: int = 2) -> str:
    return NONE if x is None else f"{x:,.{digits}f}"


def pct(x, digits: int = 1) -> str:
    return NONE if x is None else f"{100 * x:.{digits}f}%"


def signed_pct(x) -> str:
    return NONE if x is None else f"{100 * x:+.1f}%"


def table(title: str, *columns: str, caption: str | None = None, text: int = 1) -> Table:
    """A compact table: the first `text` columns left-aligned (names), the rest right-aligned (numbers)."""
    t = Table(title=title, title_justify="left", title_style="bold", caption=caption, caption_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < text else "right")
    return t


# ---------------------------------------------------------------- what each stage produced


def produced(runs: Path) -> Table:
    t = table(f"what the pipeline produced ({runs}/)", "stage", "produced", text=2)
    for stage in STAGES:
        line = LINES[stage](runs / stage) if (runs / stage).is_dir() else "not run yet"
        t.add_row(stage, line)
    return t


def data_line(d: Path) -> str:
    m = read(d / "manifest.json")
    if m is None:
        return "no manifest.json"
    ds = m["datasets"]
    facts = ds.get("facts", {})
    known = facts.get("known")
    bg = "/".join(str(ds.get(f"background/{s}", {}).get("count", 0)) for s in ("train", "stats", "heldout"))
    tasks = ", ".join(f"{k.removeprefix('tasks/')} {v['count']}" for k, v in ds.items() if k.startswith("tasks/"))
    skipped = f"; skipped: {', '.join(m['skipped'])}" if m.get("skipped") else ""
    return (f"{facts.get('count', 0)} facts from {facts.get('from', '?')}"
            + (f" ({known} known to the base model)" if known is not None else "")
            + f"; background train/stats/held-out {bg} documents; tasks: {tasks or 'none'}{skipped}")


def retrofit_line(d: Path) -> str:
    s = read(d / "summary.json")
    if s is None:
        return "no summary.json"
    return (f"{s['base_model']} ({s['architecture']}) + memory at layers {s['layers']}, {s['n_slots_per_layer']:,} slots each: "
            f"{s['memory_params']:,} new parameters beside {s['base_params']:,}; max |logit diff| to the base {s['check_max_abs_logit_diff']:.3g}")


def train_line(d: Path) -> str:
    s = read(d / "summary.json")
    if s is None:
        return "no summary.json"
    stop = f", stopped early at {s['stopped_early_at']}" if s.get("stopped_early_at") else ""
    off = s.get("memory", {}).get("heldout_ppl_memory_off")
    return (f"{s['mode']}: {s['step']} steps (best at {s['best_step']}{stop}); held-out perplexity "
            f"{num(s['initial_eval_ppl'])} -> {num(s['best_eval_ppl'])}" + (f" (memory off: {num(off)})" if off is not None else ""))


def slot_stats_line(d: Path) -> str:
    s = read(d / "summary.json")
    if s is None:
        return "no summary.json"
    docs = next(iter(s["tables"].values()))["n_batches"] if s["tables"] else 0
    return (f"slot-frequency table ({', '.join(s['tables'])}) over {docs} background documents "
            f"({s['n_tokens']:,} tokens; a document is one {s['params']['doc_unit']})")


def continual_line(d: Path) -> str:
    s = read(d / "summary.json")
    if s is None:
        return "no summary.json"
    start, runs = s["start"], s["runs"]
    n_facts = max((r["n_facts"] for r in runs.values()), default=0)
    return (f"{len(runs)} runs on {n_facts} new facts; retention on {start['known_found']} known facts "
            f"(of {start['known_screened']} screened) and held-out perplexity (start {num(start['heldout_ppl'])})")


def evaluate_line(d: Path) -> str:
    r = read(d / "results.json")
    if r is None:
        return "no results.json"
    tasks = [k for k in r if k not in ("perplexity", "facts")]
    extra = [x for x, on in (("held-out perplexity", "perplexity" in r), (f"{r.get('facts', {}).get('n', 0)} fact probes", "facts" in r)) if on]
    return f"lm-eval tasks: {', '.join(tasks) or 'none'}" + "".join(f"; {x}" for x in extra)


LINES = {"data": data_line, "retrofit": retrofit_line, "train": train_line, "slot_stats": slot_stats_line,
         "continual": continual_line, "evaluate": evaluate_line}


# ---------------------------------------------------------------- per-stage tables


def usage_row(name: str, s: dict) -> list[str]:
    return [name, f"{s['n_slots']:,}", pct(s["coverage"]), pct(s["effective_slots"]), pct(s.get("read_df_fraction")),
            pct(s["median_df_fraction"])]


USAGE_COLUMNS = ("slots", "coverage", "effective slots", "read df", "median df")
USAGE_NOTE = ("coverage: slots read at least once; effective slots: exp(access entropy) / slots; read df: the "
              "access-weighted share of documents that read a slot (low = specific, what SMF needs)")


def heal_table(runs: Path) -> Table | None:
    s = read(runs / "train" / "summary.json")
    mem = (s or {}).get("memory")
    if not mem:
        return None
    on, off = mem["heldout_ppl_memory_on"], mem["heldout_ppl_memory_off"]
    # off is null where the memory replaces an FFN (no model is left without it: testbed pretraining, mode replace)
    without = "no model without it (the memory replaces an FFN)" if off is None else f"{num(off)} without ({signed_pct(off / on - 1)})"
    t = table(f"train ({s['mode']}): memory on / off and slot usage on held-out text", "layer", *USAGE_COLUMNS,
              caption=f"held-out perplexity {num(on)} with the memory, {without}. {USAGE_NOTE}")
    for layer, u in mem["layers"].items():
        t.add_row(f"layer {layer}", *usage_row(layer, u)[1:])
    return t


def slot_stats_table(runs: Path) -> Table | None:
    s = read(runs / "slot_stats" / "summary.json")
    if not s:
        return None
    t = table(f"slot_stats: slot usage over {next(iter(s['tables'].values()))['n_batches'] if s['tables'] else 0} background documents",
              "table", *USAGE_COLUMNS)
    for name, u in s["tables"].items():
        t.add_row(*usage_row(f"{name} (layers {', '.join(map(str, u['layers']))})", u))
    return t


def continual_tables(runs: Path) -> list[Table]:
    s = read(runs / "continual" / "summary.json")
    if not s:
        return []
    curves = (read(runs / "continual" / "curves.json") or {}).get("methods", {})
    start = s["start"]
    t = table(f"continual: {max((r['n_facts'] for r in s['runs'].values()), default=0)} new facts, one at a time",
              "run", "group", "learned", "known kept", "held-out ppl", "delta per fact", text=2,
              caption=(f"known kept: of the {start['known_found']} screened questions the start model answered; "
                       f"held-out ppl at the start {num(start['heldout_ppl'])}; delta per fact: mean rows, and the largest "
                       f"one fact's sparse delta as a share of the checkpoint (SMF only)"))
    for name, r in s["runs"].items():
        d = curves.get(name, {}).get("delta_per_fact")
        delta = f"{d['rows_mean']:,.0f} rows, max {d['bytes_max'] / 1e6:.2f} MB = {pct(d['fraction_max'], 2)}" if d else NONE
        t.add_row(name, r.get("group", name), f"{r['learned']} / {r['n_facts']}", f"{r['known_kept']} / {start['known_found']}",
                  f"{num(r['heldout_ppl'])} ({signed_pct(r['heldout_ppl_rise'])})", delta)
    out = [t]
    frontier = read(runs / "continual" / "frontier.json")
    levels = list(next(iter(frontier.values()))["at"]) if frontier else []
    if levels:
        f = table("continual: methods at matched acquisition", "method", "acquisition range",
                  *[f"at {100 * float(lv):.0f}%" for lv in levels],
                  caption="known-fact drop / held-out perplexity rise, interpolated on each method's runs "
                          "(frontier.json); - where a method never reached that acquisition")
        for group, g in frontier.items():
            lo, hi = g["acquisition_range"] or (None, None)
            f.add_row(group, f"{pct(lo, 0)} - {pct(hi, 0)}",
                      *[f"{pct(g['at'][lv]['known_drop'], 0)} / {signed_pct(g['at'][lv]['heldout_ppl_rise'])}" for lv in levels])
        out.append(f)
    return out


SCORES = ("acc_norm", "acc", "exact_match", "f1", "nll_per_char")


def evaluate_table(runs: Path) -> Table | None:
    r = read(runs / "evaluate" / "results.json")
    if not r:
        return None
    caption = []
    if "perplexity" in r:
        p = r["perplexity"]
        caption.append(f"held-out perplexity {num(p['heldout'])}" + (f", memory off {num(p['heldout_memory_off'])}" if p.get("heldout_memory_off") else ""))
    if "facts" in r:
        caption.append(f"fact probes: EM {pct(r['facts']['exact_match'])}, F1 {pct(r['facts']['f1'])} (n={r['facts']['n']})")
    t = table("evaluate: lm-eval tasks", "task", "metric", "score", "n", caption="; ".join(caption) or None, text=2)
    for task, m in r.items():
        if task in ("perplexity", "facts"):
            continue
        for metric in (k for k in SCORES if m.get(k) is not None):
            score = num(m[metric], 3) if metric == "nll_per_char" else pct(m[metric])
            t.add_row(task, metric, score, str(m.get("n", NONE)))
    return t


def plots_table(runs: Path) -> Table | None:
    pngs = sorted(runs.glob("*/plots/*.png"))
    if not pngs:
        return None
    t = table("plots", "file", caption="these and the dvclive curves in one page: .venv/bin/dvc plots show "
                                        "(writes dvc_plots/index.html)")
    for p in pngs:
        t.add_row(str(p))
    return t


def report(runs: Path) -> Group:
    parts = [produced(runs), heal_table(runs), slot_stats_table(runs), *continual_tables(runs), evaluate_table(runs), plots_table(runs)]
    shown = [p for p in parts if p is not None]
    return Group(*[x for p in shown for x in (p, "")][:-1])  # a blank line between tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slotwise report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the folder of stage outputs (default: runs)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not any((runs / s).is_dir() for s in STAGES):
        print(f"no stage outputs under {runs}/ yet (run: make repro)")
        return 1
    Console(width=None if sys.stdout.isatty() else 120).print(report(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
