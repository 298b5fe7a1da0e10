"""Typed params of the evaluate stage (the `evaluate:` section of params.yaml).

    evaluate:
      tasks: [nq_open, triviaqa, hellaswag, arc_easy, arc_challenge, piqa, lambada, gsm8k]
      limit: 50              # documents per task (null: all)
      limits: {gsm8k: 20}    # per-task overrides (null: limit)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slotwise.errors import ConfigError

TASKS = ("nq_open", "triviaqa", "hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada", "gsm8k")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TaskLimits:
    """Per-task overrides of `limit` (null: use `limit`). A dataclass, not a dict, so that OmegaConf's
    struct mode accepts `evaluate.limits.gsm8k=20` and refuses an unknown task by name."""
    nq_open: Optional[int] = None
    triviaqa: Optional[int] = None
    hellaswag: Optional[int] = None
    arc_easy: Optional[int] = None
    arc_challenge: Optional[int] = None
    piqa: Optional[int] = None
    lambada: Optional[int] = None
    gsm8k: Optional[int] = None


@dataclass
class PerplexityParams:
    enabled: bool = True
    seq_len: int = 256       # fixed token blocks over the concatenated held-out documents
    max_blocks: Optional[int] = 64  # null: every full block
    batch_size: int = 8


@dataclass
class FactsParams:
    enabled: bool = True     # greedy answers to each fact's probe: EM / F1, split by `known`
    limit: Optional[int] = 200  # null: every fact
    max_new_tokens: int = 16


@dataclass
class EvaluateParams:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    limit: Optional[int] = 50  # documents per lm-eval task; null: all
    limits: TaskLimits = field(default_factory=TaskLimits)  # per-task overrides of limit
    batch_size: int = 8
    max_new_tokens: int = 32  # generation budget of the generate_until tasks (nq_open, triviaqa)
    gsm8k_max_new_tokens: int = 256  # generation budget of gsm8k's exact-match task (lm-eval's default)
    bootstrap_iters: int = 1000  # standard errors: closed form for means, bootstrap draws otherwise; 0 = none
    log_samples: bool = False  # also write lm-eval's per-document records (lm_eval_samples/<task>.jsonl)
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    perplexity: PerplexityParams = field(default_factory=PerplexityParams)
    facts: FactsParams = field(default_factory=FactsParams)

    def task_limit(self, task: str) -> Optional[int]:
        override = getattr(self.limits, task)
        return self.limit if override is None else override


def check_evaluate_params(p: EvaluateParams, where: str = "params") -> None:
    """Value checks the schema cannot express; raises ConfigError with one line naming the key."""
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: key 'evaluate.{key}': {msg}")

    known = ", ".join(TASKS)
    for task in p.tasks:
        if task not in TASKS:
            raise bad("tasks", f"unknown task {task!r} (known tasks: {known})")
    if len(set(p.tasks)) != len(p.tasks):
        raise bad("tasks", f"names a task twice: {p.tasks}")
    for task in TASKS:
        n = getattr(p.limits, task)
        if n is not None and n <= 0:
            raise bad(f"limits.{task}", f"expected a positive integer or null, got {n}")
    for key, value in (("limit", p.limit), ("perplexity.max_blocks", p.perplexity.max_blocks), ("facts.limit", p.facts.limit)):
        if value is not None and value <= 0:
            raise bad(key, f"expected a positive integer or null, got {value}")
    if p.bootstrap_iters < 0:
        raise bad("bootstrap_iters", f"expected an integer >= 0, got {p.bootstrap_iters}")
    for key, value in (("batch_size", p.batch_size), ("max_new_tokens", p.max_new_tokens),
                       ("gsm8k_max_new_tokens", p.gsm8k_max_new_tokens),
                       ("perplexity.batch_size", p.perplexity.batch_size), ("facts.max_new_tokens", p.facts.max_new_tokens)):
        if value <= 0:
            raise bad(key, f"expected a positive integer, got {value}")
    if p.perplexity.seq_len < 2:
        raise bad("perplexity.seq_len", f"expected an integer >= 2, got {p.perplexity.seq_len}")
    if p.device not in DEVICES:
        raise bad("device", f"expected one of {DEVICES}, got {p.device!r}")
    if p.dtype not in DTYPES:
        raise bad("dtype", f"expected one of {DTYPES}, got {p.dtype!r}")
