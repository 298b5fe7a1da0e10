"""lm-eval tasks from the local YAMLs in lm_eval_tasks/, run through HFLM on an in-memory model.

    with rendered_tasks(data_dir / "tasks", max_new_tokens=32) as include_dir:
        scores = run_tasks(model, tokenizer, ["hellaswag", "piqa"], include_dir, limits={"piqa": 5})
    scores["piqa"]    # {"acc": 0.6, "acc_norm": 0.4}

The YAMLs name their data as `__TASKS_DIR__/<task>.jsonl` (dataset_path: json); `rendered_tasks`
writes copies with the real path into a temporary include dir, beside utils.py (which their
`!function utils.*` entries import). Only local files are read: no hub access is needed, and the
hub is switched to offline mode unless the caller set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from slotwise.schema import TASKS  # noqa: E402

TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
log = logging.getLogger("slotwise.evaluate")


def task_file(tasks_dir: str | Path, task: str) -> Path:
    return Path(tasks_dir) / f"{task}.jsonl"


@contextlib.contextmanager
def rendered_tasks(tasks_dir: str | Path, max_new_tokens: int = 32, tasks: list[str] | None = None) -> Iterator[Path]:
    """A temporary lm-eval include dir: the task YAMLs pointing at tasks_dir/<task>.jsonl, and utils.py."""
    tasks_dir = Path(tasks_dir).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="slotwise-lm-eval-"))
    try:
        shutil.copy(TEMPLATES / "utils.py", tmp / "utils.py")
        for task in tasks or TASKS:
            text = (TEMPLATES / f"{task}.yaml").read_text()
            text = text.replace("__TASKS_DIR__", json.dumps(str(tasks_dir))[1:-1])  # escaped for a "..." YAML string
            text = text.replace("__MAX_NEW_TOKENS__", str(int(max_new_tokens)))
            (tmp / f"{task}.yaml").write_text(text)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _metrics(task_result: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} -> {"acc": v}."""
    out = {}
    for key, value in task_result.items():
        name, _, _filter = key.partition(",")
        if _filter and not name.endswith("_stderr") and isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def make_lm(model, tokenizer, batch_size: int = 8):
    """HFLM around an already loaded model (plain or retrofitted: HFLM only calls its forward/generate)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(
    model, tokenizer, tasks: list[str], include_dir: str | Path, limits: dict[str, int | None] | None = None,
    batch_size: int = 8, seed: int = 0, lm=None, progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Run each task through lm_eval.simple_evaluate (one call per task, for per-task limits and
    progress) -> {task: {metric: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from tqdm.auto import tqdm

    lm = lm or make_lm(model, tokenizer, batch_size)
    manager = TaskManager(include_path=str(include_dir), include_defaults=False)
    scores: dict[str, dict[str, float]] = {}
    for task in tqdm(tasks, desc="lm-eval tasks", disable=not progress):
        limit = (limits or {}).get(task)
        log.info("lm-eval %s (limit %s)", task, limit)
        result = lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, limit=limit, batch_size=batch_size,
            bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
        scores[task] = _metrics(result["results"][task])
        n = result.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            scores[task]["n"] = n
    return scores
