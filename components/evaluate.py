"""Stage `evaluate`: lm-eval tasks from local YAML, held-out perplexity (memory on and off), fact acquisition.

    python -m slotwise.components.evaluate --params params.yaml --model runs/retrofit --data runs/data --out runs/evaluate
    slotwise evaluate --model embedded:smollm2-135m-instruct --data runs/data --out runs/evaluate evaluate.limit=10

--model is a slotwise checkpoint directory (retrofitted or not) or any base model source
(embedded:..., a local HF directory, a .gguf file, a hub id). --data is the data stage's output:
tasks/<task>.jsonl for each task in evaluate.tasks, background/heldout.jsonl, facts.jsonl, and
retention.jsonl when the data stage wrote one (the testbed's old population: metrics "retention").

Writes, atomically, into --out:
    metrics.json            the headline numbers, for `dvc metrics show`: one score per task, held-out
                            perplexity with memory on / off, fact EM
    results.json            everything measured: {task: {metric: value, metric_stderr: value, n}, "perplexity": {...},
                            "facts": {...}, "retention": {...}} (gsm8k: NLL and lm-eval's exact match, strict and flexible)
    lm_eval_results.json    lm-eval's own results JSON for the tasks (configs, versions, n-shot, n-samples;
                            times and machine details left out)
    lm_eval_samples/        lm-eval's per-document records, <lm-eval task>.jsonl (evaluate.log_samples: true)
    plots/scores.{csv,json} one row per (task, metric) score in [0, 1], for `dvc plots`
    plots/scores.png        bar chart of those scores
    facts_predictions.jsonl each probe's greedy answer with its EM / F1 (retention probes: "set": "retention")
    summary.json            model source and hash, memory mode, dtype (device and timings: in the log)
    params.resolved.yaml
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path

import torch

from slotwise.atomic import staged_dir
from slotwise.checkpoint import CheckpointError, MANIFEST, RETROFIT_FILE, is_hf_native, load_checkpoint, model_hash
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import ConfigError, load_params, write_resolved
from slotwise.errors import DataError
from slotwise.evaluation.facts import fact_acquisition
from slotwise.evaluation.memory_switch import memory_disabled, memory_mode
from slotwise.evaluation.params import EvaluateParams
from slotwise.evaluation.perplexity import heldout_perplexity, token_blocks
from slotwise.evaluation.plots import score_rows, write_scores
from slotwise.evaluation.tasks import TaskRun, evaluate_tasks, task_file
from slotwise.facts import check_record
from slotwise.models import load_base_model
from slotwise.schema import resolve_device
from slotwise.sources import open_regular, read_jsonl

log = logging.getLogger("slotwise.evaluate")
HELDOUT = Path("background") / "heldout.jsonl"
FACTS = Path("facts.jsonl")
RETENTION = Path("retention.jsonl")


def required_files(p: EvaluateParams, data_dir: Path) -> list[Path]:
    files = [task_file(data_dir / "tasks", t) for t in p.tasks]
    if p.perplexity.enabled:
        files.append(data_dir / HELDOUT)
    if p.facts.enabled:
        files.append(data_dir / FACTS)
    return files


def drop_skipped_tasks(p: EvaluateParams, data_dir: Path) -> EvaluateParams:
    """Tasks the data stage could not source (listed under "skipped" in its manifest) are left out
    with a warning (e.g. a task no configured source has)."""
    manifest = data_dir / "manifest.json"
    try:
        skipped = json.loads(manifest.read_bytes()).get("skipped", {}) if manifest.is_file() else {}
        assert isinstance(skipped, dict)
    except (ValueError, AttributeError, AssertionError):
        raise DataError(f"{manifest}: not a data stage manifest (expected a JSON object with 'skipped': {{task: reason}})") from None
    for task in [t for t in p.tasks if t in skipped]:
        log.warning("skipping task %s: the data stage had no source for it (%s)", task, skipped[task])
    return dataclasses.replace(p, tasks=[t for t in p.tasks if t not in skipped])


def check_data(p: EvaluateParams, data_dir: Path) -> None:
    for path in required_files(p, data_dir):
        if not path.exists():
            raise FileNotFoundError(f"{path}: data file not found (expected the data stage's output under {data_dir})")
        open_regular(path).close()  # a folder or a FIFO in its place: one line, not a traceback (or a hang) later


def load_model(source: str, dtype: torch.dtype, device: torch.device):
    """A slotwise checkpoint directory or a base model source -> (model, tokenizer, model hash or None)."""
    path = Path(source)
    if path.is_dir() and ((path / RETROFIT_FILE).is_file() or is_hf_native(path)):  # save_checkpoint's, or a SlotwiseForCausalLM's save_pretrained
        model, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
        digest = model_hash(path) if (path / MANIFEST).is_file() else None
    else:
        model, tokenizer = load_base_model(source, dtype=dtype)
        model.to(device)
        digest = None
    if tokenizer is None:
        raise CheckpointError(f"{source}: no tokenizer saved with the model")
    return model.eval(), tokenizer, digest


def perplexity_metrics(model, tokenizer, p: EvaluateParams, data_dir: Path) -> dict:
    pp = p.perplexity
    texts = (row["text"] for _, row in read_jsonl(data_dir / HELDOUT, ("text",)))
    blocks = token_blocks(tokenizer, texts, pp.seq_len, pp.max_blocks)
    if len(blocks) == 0:
        raise ConfigError(f"key 'evaluate.perplexity.seq_len': {data_dir / HELDOUT} has fewer than {pp.seq_len} tokens (one block)")
    on = heldout_perplexity(model, tokenizer, None, pp.seq_len, batch_size=pp.batch_size, progress="perplexity", blocks=blocks)
    off = None
    if memory_mode(model) == "additive":
        with memory_disabled(model):
            off = heldout_perplexity(model, tokenizer, None, pp.seq_len, batch_size=pp.batch_size, progress="perplexity (memory off)", blocks=blocks)
    return {"heldout": on["perplexity"], "heldout_memory_off": off and off["perplexity"],
            "nll": on["nll"], "nll_memory_off": off and off["nll"], "tokens": on["tokens"], "blocks": on["blocks"]}


def run_lm_eval(model, tokenizer, p: EvaluateParams, data_dir: Path) -> TaskRun:
    budgets = {"nq_open": p.max_new_tokens, "triviaqa": p.max_new_tokens, "gsm8k": p.gsm8k_max_new_tokens}
    return evaluate_tasks(model, tokenizer, p.tasks, data_dir / "tasks", {t: p.task_limit(t) for t in p.tasks},
                          batch_size=p.batch_size, seed=p.seed, max_gen_toks=budgets, bootstrap_iters=p.bootstrap_iters,
                          log_samples=p.log_samples, progress=True)


def evaluate(model, tokenizer, p: EvaluateParams, data_dir: str | Path) -> tuple[dict, list[dict], TaskRun]:
    """Everything the stage measures -> (metrics, per-fact prediction rows, the lm-eval run). Reads only data_dir."""
    data_dir = Path(data_dir)
    check_data(p, data_dir)
    metrics: dict = {}
    run = TaskRun(scores={})
    if p.tasks:
        run = run_lm_eval(model, tokenizer, p, data_dir)
        metrics.update(run.scores)
    if p.perplexity.enabled:
        metrics["perplexity"] = perplexity_metrics(model, tokenizer, p, data_dir)
    fact_rows: list[dict] = []
    if p.facts.enabled:
        facts = read_facts(data_dir / FACTS, p.facts.limit)
        metrics["facts"], fact_rows = fact_acquisition(model, tokenizer, facts, p.facts.max_new_tokens, p.batch_size, progress="facts")
        if (data_dir / RETENTION).is_file():  # the testbed's old population (what pretraining taught)
            old = read_facts(data_dir / RETENTION, p.facts.limit)
            metrics["retention"], rows = fact_acquisition(model, tokenizer, old, p.facts.max_new_tokens, p.batch_size, progress="retention")
            fact_rows += [{**r, "set": "retention"} for r in rows]
    return metrics, fact_rows, run


def write_lm_eval(run: TaskRun, out: Path) -> None:
    """lm-eval's results JSON (and per-document samples, when logged) into out, as lm-eval serialises them."""
    from lm_eval.utils import handle_non_serializable

    if run.results:
        text = json.dumps(run.results, indent=2, default=handle_non_serializable)
        # lm-eval writes a function it cannot show the source of as "<function f at 0x7f...>": drop
        # the address, so the same run gives the same bytes.
        (out / "lm_eval_results.json").write_text(re.sub(r" at 0x[0-9a-f]+>", ">", text) + "\n")
    for name, records in run.samples.items():
        (out / "lm_eval_samples").mkdir(exist_ok=True)
        (out / "lm_eval_samples" / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in records))


def read_facts(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` facts of a facts.jsonl, each checked (answers, probe); DataError names file:line."""
    facts = []
    for line, rec in read_jsonl(path, ("answers", "probe")):
        check_record(rec, f"{path}:{line}", ("answers", "probe"))
        facts.append(rec)
        if limit is not None and len(facts) >= limit:
            break
    return facts


def _finite(obj):
    """NaN / inf -> null, so results.json stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


HEADLINE_ORDER = ("acc_norm", "acc", "exact_match", "nll_per_char")  # a task's headline: its first present metric


def headline_metrics(results: dict) -> dict:
    """results.json -> the few numbers `dvc metrics show` lists: {task: {metric: value}} with one
    metric per task, heldout_ppl {memory_on, memory_off}, facts {exact_match}."""
    out: dict = {}
    for task, values in results.items():
        if task in ("perplexity", "facts") or not isinstance(values, dict):
            continue
        metric = next((m for m in HEADLINE_ORDER if values.get(m) is not None), None)
        if metric is not None:
            out[task] = {metric: values[metric]}
    if "perplexity" in results:
        out["heldout_ppl"] = {"memory_on": results["perplexity"]["heldout"], "memory_off": results["perplexity"]["heldout_memory_off"]}
    if "facts" in results:
        out["facts"] = {"exact_match": results["facts"]["exact_match"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise evaluate", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or base model source (embedded:..., HF dir, .gguf, hub id)")
    parser.add_argument("--data", default="runs/data", help="the data stage's output directory")
    parser.add_argument("--out", default="runs/evaluate", help="output directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    p: EvaluateParams = params.evaluate
    data_dir = Path(args.data)
    p = drop_skipped_tasks(p, data_dir)
    check_data(p, data_dir)  # before the (slow) model load
    if p.facts.enabled:  # a malformed fact: one line now, not after the model load
        for path in (data_dir / FACTS, data_dir / RETENTION):
            if path.exists():
                read_facts(path, p.facts.limit)
    device = resolve_device(p.device, "evaluate.device")
    torch.manual_seed(p.seed)

    t0 = time.perf_counter()
    model, tokenizer, digest = load_model(args.model, getattr(torch, p.dtype), device)
    t_load = time.perf_counter() - t0
    metrics, fact_rows, run = evaluate(model, tokenizer, p, data_dir)
    metrics = _finite(metrics)
    summary = {"model": args.model, "model_sha256": digest, "memory_mode": memory_mode(model), "data": str(data_dir),
               "dtype": p.dtype}
    log.info("device %s: model loaded in %.1f s, evaluated in %.1f s", device, t_load, time.perf_counter() - t0 - t_load)

    with staged_dir(args.out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(headline_metrics(metrics), indent=2) + "\n")
        (tmp / "results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "facts_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fact_rows))
        write_lm_eval(run, tmp)
        write_scores(score_rows(metrics), tmp / "plots")
        write_resolved(params, tmp)
    log.info("wrote %s (%s)", args.out, "; ".join(f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float))
                                               for t, m in metrics.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
