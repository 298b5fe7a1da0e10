"""lm-eval tasks `slotwise_<task>` from the YAMLs in lm_eval_tasks/, run through HFLM on an in-memory model.

    scores = run_tasks(model, tokenizer, ["hellaswag", "piqa"], "runs/data/tasks", limits={"piqa": 5})
    scores["piqa"]    # {"acc": 0.6, "acc_norm": 0.4}
    run = evaluate_tasks(model, tokenizer, ["arc_easy", "gsm8k"], "runs/data/tasks", bootstrap_iters=1000)
    run.scores["arc_easy"]   # {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ..., "n": 50}
    run.results              # lm-eval's own results JSON (every task), run.samples with log_samples=True

The YAMLs are complete: the same files work from lm-eval's own command line,

    lm_eval --model hf --model_args pretrained=runs/train,trust_remote_code=True \\
        --include_path slotwise/evaluation/lm_eval_tasks --tasks slotwise_arc_easy --limit 50

Each task reads <data_dir>/<task>.jsonl (the data stage's normalised file; utils.local_jsonl);
data_dir is task metadata, `runs/data/tasks` (relative to the working directory) unless
`--metadata '{"data_dir": "..."}'` says otherwise; here it is always passed. The names are
namespaced (`slotwise_`, and the tag `slotwise` for all of them) so an include path never shadows
lm-eval's built-in tasks. gsm8k is scored twice: `slotwise_gsm8k_nll` (NLL of the reference
solution) and `slotwise_gsm8k` (lm-eval's generate-and-extract exact match). Only local files are
read: the hub is switched to offline mode unless the caller set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from slotwise.schema import TASKS  # noqa: E402

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
PREFIX = "slotwise_"
# Keys of lm-eval's results JSON that hold times or describe the machine: left out, so the file
# is the same bytes for the same model, data and params.
UNSTABLE_KEYS = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash",
                 "pretty_env_info", "transformers_version", "lm_eval_version", "model_source", "model_name_sanitized")
log = logging.getLogger("slotwise.evaluate")


def task_file(tasks_dir: str | Path, task: str) -> Path:
    return Path(tasks_dir) / f"{task}.jsonl"


def lm_eval_names(task: str) -> list[str]:
    """A task of params.yaml (the data stage's file name) -> the lm-eval task(s) scoring it."""
    return [f"{PREFIX}gsm8k_nll", f"{PREFIX}gsm8k"] if task == "gsm8k" else [PREFIX + task]


@dataclass
class TaskRun:
    scores: dict[str, dict[str, float]]  # {task: {metric: value, metric_stderr: value, n: documents}}
    results: dict = field(default_factory=dict)  # lm-eval's results JSON, every call merged (UNSTABLE_KEYS left out)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # {lm-eval task: one record per document}


def _metric_key(key: str) -> str | None:
    """lm-eval's "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr", "exact_match,strict-match" ->
    "exact_match_strict_match"; None for what is not a metric ("alias")."""
    name, sep, filt = key.partition(",")
    if not sep:
        return None
    if filt == "none":
        return name
    stderr = name.endswith("_stderr")
    base = name[: -len("_stderr")] if stderr else name
    return f"{base}_{filt.replace('-', '_')}" + ("_stderr" if stderr else "")


def _metrics(task_result: dict) -> dict[str, float]:
    """One task's entry of lm-eval's results -> {metric: value}; standard errors kept as <metric>_stderr
    (lm-eval writes "N/A" where it computed none: left out)."""
    out = {}
    for key, value in task_result.items():
        name = _metric_key(key)
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def make_lm(model, tokenizer, batch_size: int = 8):
    """HFLM around an already loaded model (plain or retrofitted: HFLM only calls its forward/generate)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _replace_str(obj, old: str, new: str):
    """obj with every string equal to old replaced by new: the results JSON records the tasks folder as
    it was given (runs/data/tasks), not the machine's absolute path, so the same run gives the same bytes."""
    if isinstance(obj, dict):
        return {k: _replace_str(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_str(v, old, new) for v in obj]
    return new if isinstance(obj, str) and obj == old else obj


def _merge_results(merged: dict, result: dict, limit: int | None) -> None:
    for key, value in result.items():
        if key in UNSTABLE_KEYS or key == "samples":
            continue
        if key == "config":
            config = {k: v for k, v in value.items() if k != "limit"}
            merged.setdefault("config", config)
        elif isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged.setdefault(key, value)
    merged.setdefault("limits", {}).update({name: limit for name in result.get("results", {})})


def evaluate_tasks(
    model, tokenizer, tasks: list[str], tasks_dir: str | Path, limits: dict[str, int | None] | None = None, *,
    batch_size: int = 8, seed: int = 0, max_gen_toks: dict[str, int] | None = None, bootstrap_iters: int = 0,
    log_samples: bool = False, lm=None, progress: bool = False,
) -> TaskRun:
    """Every task's lm-eval task(s) through lm_eval.simple_evaluate, one call per task (per-task limits
    and generation budgets) -> TaskRun. Scores of a task's several lm-eval tasks (gsm8k) are merged.

    max_gen_toks: {task: tokens} for its generate_until tasks (lm-eval's gen_kwargs); others keep the YAML's.
    bootstrap_iters: 0 = no standard errors; > 0: closed-form for means, that many bootstrap draws otherwise.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from tqdm.auto import tqdm

    lm = lm or make_lm(model, tokenizer, batch_size)
    resolved = str(Path(tasks_dir).resolve())
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": resolved})
    run = TaskRun(scores={})
    for task in tqdm(tasks, desc="lm-eval tasks", disable=not progress):
        limit = (limits or {}).get(task)
        gen = {"max_gen_toks": int(max_gen_toks[task])} if max_gen_toks and task in max_gen_toks else None
        scores: dict[str, float] = {}
        for name in lm_eval_names(task):
            log.info("lm-eval %s (limit %s)", name, limit)
            result = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=manager, limit=limit, batch_size=batch_size,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, gen_kwargs=gen, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
            scores.update(_metrics(result["results"][name]))
            n = result.get("n-samples", {}).get(name, {}).get("effective")
            if n is not None:
                scores["n"] = n
            _merge_results(run.results, _replace_str(result, resolved, str(tasks_dir)), limit)
            if log_samples:
                run.samples[name] = result.get("samples", {}).get(name, [])
        run.scores[task] = scores
    return run


def run_tasks(model, tokenizer, tasks: list[str], tasks_dir: str | Path, limits: dict[str, int | None] | None = None,
              batch_size: int = 8, seed: int = 0, lm=None, progress: bool = False) -> dict[str, dict[str, float]]:
    """The scores only: {task: {metric: value, "n": documents}} (no standard errors)."""
    return evaluate_tasks(model, tokenizer, tasks, tasks_dir, limits, batch_size=batch_size, seed=seed, lm=lm,
                          progress=progress).scores
