"""Typed params of the evaluate stage (the `evaluate:` section of params.yaml).

    evaluate:
      tasks: [nq_open, triviaqa, hellaswag, arc_easy, arc_challenge, piqa, lambada, gsm8k]
      limit: 50              # documents per task (null: all)
      limits: {gsm8k: 20}    # per-task overrides (null: limit)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slotwise.schema import Device, Dtype, Task, at_least, positive, unique


@dataclass
class TaskLimits:
    """Per-task overrides of `limit` (null: use `limit`). A dataclass, not a dict, so that OmegaConf's
    struct mode accepts `evaluate.limits.gsm8k=20` and refuses an unknown task by name."""
    nq_open: Optional[int] = positive(None)
    triviaqa: Optional[int] = positive(None)
    hellaswag: Optional[int] = positive(None)
    arc_easy: Optional[int] = positive(None)
    arc_challenge: Optional[int] = positive(None)
    piqa: Optional[int] = positive(None)
    lambada: Optional[int] = positive(None)
    gsm8k: Optional[int] = positive(None)


@dataclass
class PerplexityParams:
    enabled: bool = True
    seq_len: int = at_least(2, 256, "an integer >= 2")  # fixed token blocks over the concatenated held-out documents
    max_blocks: Optional[int] = positive(64)  # null: every full block
    batch_size: int = positive(8)


@dataclass
class FactsParams:
    enabled: bool = True     # greedy answers to each fact's probe: EM / F1, split by `known`
    limit: Optional[int] = positive(200)  # null: every fact
    max_new_tokens: int = positive(16)


@dataclass
class EvaluateParams:
    tasks: list[Task] = unique(lambda: list(Task), what="names a task twice")
    limit: Optional[int] = positive(50)  # documents per lm-eval task; null: all
    limits: TaskLimits = field(default_factory=TaskLimits)  # per-task overrides of limit
    batch_size: int = positive(8)
    max_new_tokens: int = positive(32)  # generation budget of the generate_until tasks (nq_open, triviaqa)
    device: Device = Device.auto
    dtype: Dtype = Dtype.float32
    gsm8k_max_new_tokens: int = positive(256)  # generation budget of gsm8k's exact-match task (lm-eval's default)
    bootstrap_iters: int = at_least(0, 1000, "an integer >= 0")  # standard errors: closed form for means, bootstrap draws otherwise; 0 = none
    log_samples: bool = False  # also write lm-eval's per-document records (lm_eval_samples/<task>.jsonl)
    seed: int = 0
    perplexity: PerplexityParams = field(default_factory=PerplexityParams)
    facts: FactsParams = field(default_factory=FactsParams)

    def task_limit(self, task: str) -> Optional[int]:
        override = getattr(self.limits, task)
        return self.limit if override is None else override
