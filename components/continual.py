"""Stage `continual`: stream new facts through SMF and the baselines; measure learning and forgetting.

    python -m slotwise.components.continual --params params.yaml --model runs/train --data runs/data \\
        --stats runs/slot_stats --out runs/continual
    slotwise continual ... continual.n_facts=100 continual.methods='[{name: smf, method: smf, params: {top_t: 1000}}]'

Every method starts from the same model and sees the same facts in the same order. A method
with a `sweep` (e.g. `sweep: {lr: [1e-5, 3e-5]}`) runs once per value; its runs are the points of
its learning-vs-forgetting frontier, and methods are compared at matched acquisition (see
slotwise.continual.frontier). Writes, atomically, into --out:

    curves.json         acquisition and retention over the stream, per run
    metrics.json        per run: facts learned, known_drop, heldout_ppl_rise (for `dvc metrics show`)
    summary.json        the start point and every final number per run (steps per fact, F1, tasks, ...)
    frontier.json       each method's retention interpolated at every run's acquisition that two or more methods reach
    plots/curves.png, plots/frontier.png
    live/               (--live) the curves in dvclive's layout: <run>/<metric> against facts seen
    deltas/<run>/       an SMF update as a sparse delta: row ids + rows
    adapters/<run>/     a LoRA or GRIT update as a peft adapter (save_pretrained: load it with
                        `PeftModel.from_pretrained(base, adapters/<run>)` on the --model checkpoint)
    params.resolved.yaml

Each method's result is kept in .<out>.parts/ as soon as it finishes, so a killed run restarts at
the first unfinished method (same params, model and facts). No wall times in the outputs (the log
has them): they are cached by DVC and must be the same bytes on every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from slotwise.atomic import staged_dir
from slotwise.checkpoint import load_checkpoint, model_hash
from slotwise.components._cli import component_parser, run_cli
from slotwise.components._live import LIVE_DIR, curve_point_logger, live_logger
from slotwise.config import ConfigError, load_params, to_yaml
from slotwise.continual.delta import delta_nbytes, extract_delta, save_delta
from slotwise.continual.experiment import (ContinualParams, MethodRun, measure, relative_drop, run_stream, screen_answered,
                                           screen_known, stream_order)
from slotwise.continual.frontier import common_levels, expand_sweeps, matched
from slotwise.continual.selection import load_backgrounds
from slotwise.continual.updaters import make_updater
from slotwise.evaluation.perplexity import token_blocks
from slotwise.facts import check_record
from slotwise.retrofit import memory_layers
from slotwise.schema import resolve_device
from slotwise.sources import read_jsonl

log = logging.getLogger("slotwise.continual")


def run_method(run: MethodRun, args, p: ContinualParams, facts, known, ppl_blocks, backgrounds, device,
               on_point=None) -> tuple[dict, object]:
    model, tokenizer = load_checkpoint(args.model)
    base = None
    if run.method == "smf":
        if not memory_layers(model):
            raise ConfigError(f"continual method {run.name}: smf needs a model with memory layers ({args.model} has none)")
        base, _ = load_checkpoint(args.model)  # kept to extract the sparse delta
    model.to(device)
    torch.manual_seed(p.seed)
    try:
        updater = make_updater(run.method, model, run.params, backgrounds=backgrounds)
    except ValueError as exc:
        raise ConfigError(f"continual.methods[{run.name}]: {exc}") from None
    rows_per_fact: list[int] = []
    curve = run_stream(updater, lambda: updater.model, tokenizer, facts, known, ppl_blocks, p, device, run.name, rows_per_fact, run,
                       on_point=on_point)
    result = {"method": run.method, "group": run.group or run.name, "params": dataclasses.asdict(run.params), "curve": curve}
    delta = None
    if base is not None:
        delta = extract_delta(base, model.cpu(), meta={"method": run.name, "base_checkpoint_hash": model_hash(args.model)})
        result["delta_rows"] = delta.n_rows
        result["delta_bytes"] = delta.nbytes
        # One fact's update as its own delta (row ids + new rows): the "< 1% of the checkpoint".
        new = next(iter(delta.pools.values())).new if delta.pools else torch.empty(0, 0)
        per_fact = [delta_nbytes(r, new.shape[1], new.element_size()) for r in rows_per_fact]
        ckpt = checkpoint_bytes(args.model)
        result["delta_per_fact"] = {"rows_mean": sum(rows_per_fact) / max(len(rows_per_fact), 1),
                                    "bytes_mean": sum(per_fact) / max(len(per_fact), 1), "bytes_max": max(per_fact, default=0),
                                    "checkpoint_bytes": ckpt, "fraction_max": max(per_fact, default=0) / ckpt if ckpt else None,
                                    "cumulative_fraction": delta.nbytes / ckpt if ckpt else None}
    return result, (updater, tokenizer, delta)


def checkpoint_bytes(model_dir: str) -> int:
    """Size on disk of a checkpoint directory (all its files)."""
    return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file())


def final_tasks(model, tokenizer, data_dir: Path, p: ContinualParams, device) -> dict:
    if not p.final_tasks:
        return {}
    from slotwise.evaluation.tasks import run_tasks

    present = [t for t in p.final_tasks if (data_dir / "tasks" / f"{t}.jsonl").is_file()]
    return run_tasks(model.to(device), tokenizer, present, data_dir / "tasks", {t: p.final_task_limit for t in present},
                     batch_size=p.batch_size // 2 or 1, seed=p.seed)


HEADLINE = ("learned", "known_drop", "heldout_ppl_rise")


def headline_metrics(summary: dict) -> dict:
    """Per run: facts learned, the relative drop of known facts answered and the relative rise of
    held-out perplexity: what `dvc metrics show` lists (summary.json has the rest)."""
    return {name: {k: s[k] for k in HEADLINE} for name, s in summary.items()}


def summarize(results: dict, start: dict) -> dict:
    """Per method: final acquisition and the relative drop of every retention probe."""
    out = {}
    for name, r in results.items():
        end = r["curve"][-1]
        s = {"group": r.get("group", name), "learned": end["learned"], "n_facts": end["facts_seen"],
             "steps_per_fact_mean": end.get("steps_per_fact_mean"), "acquisition_em": end["acquisition_em"],
             "acquisition_f1": end["acquisition_f1"], "known_kept": end["known_kept"],
             "known_drop": relative_drop(start["known_em"], end["known_em"]),
             "heldout_ppl": end["heldout_ppl"], "heldout_ppl_rise": relative_drop(start["heldout_ppl"], end["heldout_ppl"], higher_is_better=False)}
        for task, metrics in r.get("final_tasks", {}).items():
            key = "acc_norm" if "acc_norm" in metrics else "acc"
            if key in metrics and task in start.get("final_tasks", {}):
                s[f"{task}_{key}"] = metrics[key]
                s[f"{task}_drop"] = relative_drop(start["final_tasks"][task][key], metrics[key])
        out[name] = s
    return out


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise continual", __doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/train", help="starting checkpoint (healed retrofit)")
    parser.add_argument("--data", default="runs/data")
    parser.add_argument("--stats", default="runs/slot_stats", help="slot_stats output (needed by tfidf / kl)")
    parser.add_argument("--out", default="runs/continual")
    parser.add_argument("--live", action="store_true", help="log the curves with dvclive into <out>/live (dvc.yaml does)")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    p: ContinualParams = params.continual
    device = resolve_device(p.device, "continual.device")
    data = Path(args.data)
    random.seed(p.seed)

    need = ("id", "answers", "paraphrases", "probe") + (("statement",) if p.include_statement else ())
    all_facts = []
    for line, rec in read_jsonl(data / "facts.jsonl", need):
        check_record(rec, f"{data / 'facts.jsonl'}:{line}", need)
        all_facts.append(rec)
    facts = [f for f in all_facts if not (p.only_unknown and f.get("known"))][: p.n_facts]
    if len(facts) < p.n_facts:
        log.warning("only %d facts available (asked for %d)", len(facts), p.n_facts)
    facts = stream_order(facts, p.order_seed)  # continual.order_seed: the same facts in another order
    runs = expand_sweeps(p.methods)
    needs_table = any(m.method == "smf" and m.params.needs_background for m in runs)
    backgrounds = load_backgrounds(args.stats, args.model) if needs_table else None

    start_model, tokenizer = load_checkpoint(args.model)
    start_model.to(device)
    if (data / "retention.jsonl").is_file():  # the testbed's old population, probed with held-out templates
        qa = [{"probe": r["probe"], "answers": r["answers"]} for _, r in read_jsonl(data / "retention.jsonl", ("probe", "answers"))][: p.known_screen]
        known = screen_answered(start_model, tokenizer, qa, p.batch_size)
    else:
        qa = [r for _, r in read_jsonl(data / "tasks/triviaqa.jsonl", ("question", "answers"))][: p.known_screen]
        known = screen_known(start_model, tokenizer, qa, p.batch_size)
    heldout = [r["text"] for _, r in read_jsonl(data / "background/heldout.jsonl", ("text",))]
    ppl_blocks = token_blocks(tokenizer, heldout, p.ppl_seq_len, p.ppl_blocks)
    start = measure(start_model, tokenizer, [], known, ppl_blocks, p.batch_size)
    start["final_tasks"] = final_tasks(start_model, tokenizer, data, p, device)
    start["known_screened"], start["known_found"] = len(qa), len(known)
    log.info("start: %d/%d screened questions known, held-out ppl %.2f", len(known), len(qa), start["heldout_ppl"])
    del start_model

    # Each finished method is kept in a sibling folder until the stage publishes: a killed run
    # (a time limit, a preempted GPU) restarts at the first method it had not finished.
    # Why a cache beside DVC's: DVC reruns a stage whole and cannot resume inside one, and a GPU run of
    # all methods takes hours; it is keyed by everything the result depends on and removed on success.
    parts = Path(args.out).with_name(f".{Path(args.out).name}.parts")
    common = {"continual": {k: v for k, v in dataclasses.asdict(p).items() if k != "methods"},
              "model": model_hash(args.model), "facts": [f["id"] for f in facts]}
    with staged_dir(args.out) as tmp, live_logger(tmp / LIVE_DIR if args.live else None) as live:
        results = {}
        for run in runs:
            on_point = curve_point_logger(live, run.name)
            key = hashlib.sha256(json.dumps({**common, "run": dataclasses.asdict(run)}, sort_keys=True, default=str).encode()).hexdigest()
            done = parts / run.name
            kept = json.loads((done / "result.json").read_text()) if (done / "result.json").is_file() else {}
            t0 = time.perf_counter()
            if kept.get("key") == key:
                result = kept["result"]
                log.info("%s: finished in an earlier run (%s), reused", run.name, done)
                for point in result["curve"] if on_point else []:
                    on_point(point)
            else:
                result, (updater, tok, delta) = run_method(run, args, p, facts, known, ppl_blocks, backgrounds, device, on_point)
                result["final_tasks"] = final_tasks(updater.model, tok, data, p, device)
                with staged_dir(done) as part:
                    if delta is not None and p.save_deltas:
                        save_delta(delta, part / "delta")
                    if hasattr(updater, "save_adapter") and p.save_deltas:  # lora, grit
                        updater.save_adapter(part / "adapter", base_model=args.model)
                    (part / "result.json").write_text(json.dumps({"key": key, "result": result}))
                del updater
            if (done / "delta").is_dir():
                shutil.copytree(done / "delta", tmp / "deltas" / run.name)
            if (done / "adapter").is_dir():
                shutil.copytree(done / "adapter", tmp / "adapters" / run.name)
            results[run.name] = result
            log.info("%s: learned %d/%d, known kept %d/%d, held-out ppl %.2f (%.0f s)", run.name,
                     result["curve"][-1]["learned"], len(facts), result["curve"][-1]["known_kept"], len(known),
                     result["curve"][-1]["heldout_ppl"], time.perf_counter() - t0)  # wall time: in the log only
        summary = summarize(results, start)
        groups = {name: s["group"] for name, s in summary.items()}
        frontier = matched(summary, groups, common_levels(summary, groups))
        (tmp / "curves.json").write_text(json.dumps({"start": start, "methods": results}, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(headline_metrics(summary), indent=2))
        (tmp / "summary.json").write_text(json.dumps({"start": {k: v for k, v in start.items() if k != "final_tasks"},
                                                      "runs": summary}, indent=2))
        (tmp / "frontier.json").write_text(json.dumps(frontier, indent=2))
        from slotwise.continual.plots import plot_curves, plot_frontier

        plot_curves(results, tmp / "plots" / "curves.png")
        plot_frontier(summary, tmp / "plots" / "frontier.png", n_known=len(known))
        (tmp / "params.resolved.yaml").write_text(to_yaml(params))
    shutil.rmtree(parts, ignore_errors=True)
    for name, s in summary.items():
        log.info("%-12s learned %s/%s  known_drop %s  ppl_rise %s", name, s["learned"], s["n_facts"], s["known_drop"], s["heldout_ppl_rise"])
    return 0


if __name__ == "__main__":
    run_cli(main)
