"""The params vocabulary (slotwise.schema): choices, field constraints, the one validator, and the one
SMF schema shared by the continual stage, the nightly update and the library."""
import json
from pathlib import Path

import pytest

from slotwise.config import ConfigError, load_params
from slotwise.continual.selection import Score
from slotwise.continual.smf import SMFConfig
from slotwise.continual.updaters import METHODS, build_params
from slotwise.memory import MemoryConfig
from slotwise.schema import Device, Task, resolve_device

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("override,match", [
    ("train.device=gpu", "key 'train.device': expected one of (auto, cpu, cuda), got 'gpu'"),
    ("slot_stats.dtype=float8", "key 'slot_stats.dtype': expected one of (float32, bfloat16, float16), got 'float8'"),
    ("continual.final_tasks=[piqa,mmlu]", "key 'continual.final_tasks': unknown task 'mmlu' (known tasks: nq_open,"),
    ("nightly.eval.tasks=[mmlu]", "key 'nightly.eval.tasks': unknown task 'mmlu'"),
    ("train.mode=rl", "key 'train.mode': expected one of (heal, sft, pretrain), got 'rl'"),
    ("nightly.smf.topt=3", "unknown key 'nightly.smf.topt' (expected one of: "),
    ("nightly.smf.score=bm25", "key 'nightly.smf.score': expected one of (tfidf, kl, tf, random), got 'bm25'"),
    ("nightly.steps_per_fact=0", "key 'nightly.steps_per_fact': expected a positive integer, got 0"),
    ("nightly.max_facts=0", "key 'nightly.max_facts': expected a positive integer or null, got 0"),
    ("retrofit.insert.memory.knn=200", "key 'retrofit.insert.memory.knn': must not exceed n_keys (128), got 200"),
    ("continual.methods=[{name: a, method: lora, params: {top_t: 3}}]",
     "key 'continual.methods[0].params' (a, method lora): unknown key 'top_t' (expected one of: "),
    ("continual.methods=[{name: a, method: grit, params: {r: 4, r_min: 5}}]",
     "key 'continual.methods[0].params.r_min': must be in [1, r=4], got 5"),
    ("continual.methods=[{name: a, method: smf},{name: a, method: full}]", "key 'continual.methods': method names must be unique"),
    # ranges (issue 11 item 6): NaN / inf refused where they would train to NaN or let the gate pass anything
    ("continual.methods=[{name: a, method: smf, params: {lr: .nan}}]", "key 'continual.methods[0].params.lr': expected a finite number > 0, got nan"),
    ("continual.methods=[{name: a, method: lora, params: {lr: .inf}}]", "key 'continual.methods[0].params.lr': expected a finite number > 0, got inf"),
    ("train.pretrain.memory_layers=[6]", "key 'train.pretrain.memory_layers': expected layer indices in 0..5 (num_layers = 6), got [6]"),
    ("train.loop.optim.betas=[0.9,1.0]", "key 'train.loop.optim.betas': expected two numbers in [0, 1), got [0.9, 1.0]"),
    ("train.loop.optim.min_lr_ratio=2", "key 'train.loop.optim.min_lr_ratio': expected a number in [0, 1], got 2.0"),
    ("nightly.smf.max_df_fraction=0", "key 'nightly.smf.max_df_fraction': expected a number in (0, 1] or null, got 0.0"),
    ("continual.ppl_seq_len=1", "key 'continual.ppl_seq_len': expected an integer >= 2 (a next-token loss needs two tokens), got 1"),
    ("retrofit.insert.alpha=nan", "key 'retrofit.insert.alpha': expected a finite number, got nan"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_the_expectation(override, match):
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, [override])
    assert match in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_continual_methods_are_a_tagged_union_of_the_method_schemas():
    p = load_params(PARAMS, ["continual.methods=[{name: s, method: smf, params: {top_t: 7}}, {name: g, method: grit, params: {r: 4}}]"])
    smf, grit = p.continual.methods
    assert isinstance(smf.params, SMFConfig) and smf.params.top_t == 7 and smf.params.score == "tfidf"
    assert isinstance(grit.params, METHODS["grit"]) and grit.params.r == 4
    # the nightly update's SMF is the same schema, with its own values
    assert isinstance(p.nightly.smf, SMFConfig) and p.nightly.smf.lr == 0.002 and p.nightly.steps_per_fact == 3


def test_library_configs_built_in_python_are_checked_by_the_same_rules():
    assert SMFConfig(score="kl").score is Score.kl  # a plain string becomes the member
    with pytest.raises(ValueError, match=r"key 'smf.top_t': expected a positive integer, got 0"):
        SMFConfig(top_t=0)
    with pytest.raises(ValueError, match=r"key 'memory.knn': must not exceed n_keys \(8\), got 9"):
        MemoryConfig(n_keys=8, knn=9)
    with pytest.raises(ValueError, match=r"key 'smf.lr': expected a finite number > 0, got inf"):
        SMFConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"smf params: key 'count_on': expected one of \(answer, all, subject\), got 'some'"):
        build_params("smf", {"count_on": "some"})
    assert build_params("smf", {"top_t": 3}) == SMFConfig(top_t=3)


def test_choices_behave_as_their_strings():
    assert Device.cpu == "cpu" and f"{Task.piqa}.jsonl" == "piqa.jsonl" and str(Task.piqa) == "piqa"
    assert json.dumps({"tasks": [Task.piqa], Task.lambada: 1}) == '{"tasks": ["piqa"], "lambada": 1}'
    assert {"piqa": 1}[Task.piqa] == 1
    assert resolve_device(Device.cpu).type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match=r"key 'x.device': expected one of \(auto, cpu, cuda\), got 'tpu'"):
        resolve_device("tpu", "x.device")
