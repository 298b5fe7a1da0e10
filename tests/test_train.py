"""The train stage: resumes to the same weights, trains what it says, heals/SFTs/pretrains."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_DATA, small_llama, tiny_retrofit_cfg
from slotwise.checkpoint import load_checkpoint, save_checkpoint
from slotwise.components import train as train_component
from slotwise.retrofit import retrofit
from slotwise.sources import _local

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """background/{train,heldout,stats}.jsonl from real WikiText-2 articles."""
    docs = [d["text"][:3000] for d in _local(REPO_DATA, "wikitext2")]
    root = tmp_path_factory.mktemp("data")
    (root / "background").mkdir()
    for name, part in (("heldout", docs[:3]), ("stats", docs[3:6]), ("train", docs[6:30])):
        (root / "background" / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return root


@pytest.fixture(scope="module")
def retrofit_dir(tmp_path_factory, smol_tokenizer):
    model = retrofit(small_llama(len(smol_tokenizer)), tiny_retrofit_cfg(out_init_std=0.05).__class__(
        layers=[1], memory=tiny_retrofit_cfg(out_init_std=0.05).memory))
    out = tmp_path_factory.mktemp("ckpt") / "retrofit"
    save_checkpoint(model, smol_tokenizer, out, tiny_retrofit_cfg(out_init_std=0.05).__class__(
        layers=[1], memory=tiny_retrofit_cfg(out_init_std=0.05).memory))
    return out


def _params(tmp_path: Path, steps: int, extra: str = "") -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(f"""
data: {{sources: [local], local_dir: {REPO_DATA}}}
train:
  seq_len: 32
  batch_size: 2
  eval_batches: 2
  report_batches: 2
  loop: {{max_steps: {steps}, eval_every: 5, save_every: 3, early_stop_patience: null, optim: {{warmup_steps: 2}}}}
{extra}""")
    return p


def _args(params, model, data, out, *over):
    return ["--params", str(params), "--model", str(model), "--data", str(data), "--out", str(out), *over]


def test_heal_trains_only_the_memory(tmp_path, retrofit_dir, data_dir):
    params = _params(tmp_path, 6)
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "out")) == 0
    before = load_file(retrofit_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.memory." in k for k in changed), changed
    assert any("values" in k for k in changed)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["step"] == 6 and "memory" in summary
    layer = summary["memory"]["layers"]["1"]
    assert 0 < layer["coverage"] <= 1 and 0 < layer["effective_slots"] <= 1
    assert summary["memory"]["heldout_ppl_memory_off"] > 1


def test_time_budget_stops_the_heal_and_keeps_the_best_weights(tmp_path, retrofit_dir, data_dir):
    # max_minutes 0: the budget is spent after the first step; the run stops there, cleanly.
    params = _params(tmp_path, 50)
    out = tmp_path / "out"
    assert train_component.main(_args(params, retrofit_dir, data_dir, out, "train.loop.max_minutes=0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_at_time_budget"] == 1 and len([h for h in summary_history(out) if "lm_loss" in h]) == 1
    assert "eval_loss" in summary_history(out)[-1]  # the step it stopped at was evaluated


def summary_history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def test_a_state_from_other_params_is_not_resumed(tmp_path, retrofit_dir, data_dir):
    # dvc keeps train_state between runs (persist: true); after a params change the old, finished
    # state must not be resumed (it would hand back the old model).
    params = _params(tmp_path, 6)
    state = tmp_path / "state"
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "a", "--state", str(state))) == 0
    new = "train.loop.optim.lr_values=0.05"
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "b", "--state", str(state), new)) == 0
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "ref", "--state", str(tmp_path / "s2"), new)) == 0
    a, b, ref = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b", "ref"))
    assert all(torch.equal(b[k], ref[k]) for k in ref)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_the_same_weights(tmp_path, retrofit_dir, data_dir):
    steps = 200
    params = _params(tmp_path, steps)
    # Uninterrupted reference run.
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "ref", "--state", str(tmp_path / "ref_state"), "--live")) == 0
    # A run killed (SIGKILL) as soon as it has written its first state, then restarted.
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "slotwise.components.train", *_args(params, retrofit_dir, data_dir, tmp_path / "out", "--state", str(state))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (state / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists(), "the run finished before it could be killed"
    killed_at = json.loads((state / "state.json").read_text())["record"]["step"]
    assert 0 < killed_at < steps
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "out", "--state", str(state), "--live")) == 0
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # dvclive's logs (--live) of the resumed run hold the whole history too: the same bytes as the reference's
    live = {d: {p.relative_to(tmp_path / d): p.read_bytes() for p in (tmp_path / d / "live").rglob("*") if p.is_file()}
            for d in ("ref", "out")}
    assert live["ref"] == live["out"]
    loss = (tmp_path / "ref" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 1 + steps
    history = summary_history(tmp_path / "ref")
    assert [float(line.split("\t")[1]) for line in loss[1:]] == [h["lm_loss"] for h in history if "lm_loss" in h]


class _Payload:
    """Unpickling this runs open(marker, "w"): what a crafted trainer.pt could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_the_state_directory_never_runs(tmp_path, retrofit_dir, data_dir, capsys):
    """A crafted trainer.pt runs no code: an old-format state (no state.json) is not opened at all, and
    one beside a state.json of this very run is read without unpickling objects and refused (exit 2)."""
    from slotwise.components._cli import run_cli

    params, state = _params(tmp_path, 3), tmp_path / "state"
    marker = tmp_path / "pwned"
    state.mkdir()
    torch.save({"optimizers": _Payload(marker), "record": {"step": 1}}, state / "trainer.pt")
    args = _args(params, retrofit_dir, data_dir, tmp_path / "out", "--state", str(state))
    assert train_component.main(args) == 0  # not this run's state: started over
    assert not marker.exists()
    torch.save({"optimizers": _Payload(marker), "schedulers": {}, "torch_rng": torch.get_rng_state()}, state / "trainer.pt")
    with pytest.raises(SystemExit) as exc:  # state.json (written by the run above) matches this run
        run_cli(train_component.main, args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trainer.pt: not a loadable training state" in err and "Traceback" not in err
    assert not marker.exists()


def test_sft_puts_the_loss_on_answers_only(smol_tokenizer):
    from slotwise.text_blocks import pad_examples, prompt_answer_examples

    ex = prompt_answer_examples([("Question: 2+2?\nAnswer: ", "4"), ("Question: capital of Italy?\nAnswer: ", "Rome")], smol_tokenizer, 64)
    batch = pad_examples(ex, smol_tokenizer.eos_token_id)
    for row, (prompt, answer) in enumerate([("Question: 2+2?\nAnswer: ", "4"), ("Question: capital of Italy?\nAnswer: ", "Rome")]):
        targets = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert targets == smol_tokenizer(answer, add_special_tokens=False)["input_ids"] + [smol_tokenizer.eos_token_id]
        assert batch["attention_mask"][row].sum() == len(ex[row][0])


def test_sft_mode_trains_on_gsm8k(tmp_path, retrofit_dir, data_dir):
    params = _params(tmp_path, 3, f"  mode: sft\n  sft_data: {REPO_DATA}/sft/gsm8k.train.jsonl\n  sft_max_examples: 20\n  seq_len: 64\n")
    params.write_text(params.read_text().replace("  seq_len: 32\n", "", 1))
    assert train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mode"] == "sft"


@pytest.mark.parametrize("variant,mode", [("memory", "additive"), ("dense", "additive"), ("memory", "replace"), ("dense", "replace")])
def test_pretrain_memory_vs_iso_flop_dense(tmp_path, data_dir, variant, mode):
    from slotwise.config import load_params

    extra = (f"  mode: pretrain\n  pretrain: {{variant: {variant}, memory_mode: {mode}, hidden_size: 32, num_layers: 2, num_heads: 4, "
             "num_kv_heads: 2, intermediate_size: 64, memory_layers: [1]}\n")
    extra += "retrofit:\n  insert:\n    memory: {n_keys: 8, heads: 2, knn: 4, k_dim: 16}\n"
    params = _params(tmp_path, 3, extra)
    assert train_component.main(_args(params, "embedded:smollm2-135m-instruct", data_dir, tmp_path / "out")) == 0
    model, _ = load_checkpoint(tmp_path / "out")
    p = load_params(params)
    mem_flops = train_component.memory_flops_per_token(32, p.retrofit.insert.memory)
    # worked out: query 32*2*16 + sub-keys 2*8*16 + candidates 2*16 + values 2*4*32 + gate 32*32 + out 32*32
    assert mem_flops == 1024 + 256 + 32 + 256 + 1024 + 1024  # = 3616
    ffn = 3 * 32 * 64  # one FFN of width 64: 6144 multiply-adds per token
    if variant == "dense":
        # the dense twin's two FFNs cost what the memory model's layers cost:
        #   additive: 2 FFNs + the memory = 2*6144 + 3616 = 15904 -> width 15904 / (3*32*2) = 82.8 -> 83
        #   replace:  1 FFN + the memory  =   6144 + 3616 =  9760 -> width  9760 / 192         = 50.8 -> 51
        assert model.config.intermediate_size == {"additive": 83, "replace": 51}[mode]
        assert 3 * 32 * 2 * model.config.intermediate_size == pytest.approx({"additive": 2 * ffn, "replace": ffn}[mode] + mem_flops, abs=96)
        assert train_component.iso_flop_intermediate(p.train.pretrain, p.retrofit.insert.memory) == model.config.intermediate_size
    else:
        wrapped = model.model.layers[1].mlp
        assert model.config.intermediate_size == 64 and len(wrapped.memory.keys) == 2 and wrapped.mode == mode
        assert (wrapped.mlp is None) == (mode == "replace")
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        off = summary["memory"]["heldout_ppl_memory_off"]
        assert (off is None) == (mode == "replace")  # a replaced FFN has no "memory off"


def test_heal_distils_the_replaced_ffn_into_the_memory(tmp_path, data_dir, smol_tokenizer):
    """mode: replace + train.loop.distil_weight: the memory is regressed onto the base model's FFN output."""
    from slotwise.memory import MemoryConfig
    from slotwise.retrofit import RetrofitConfig
    from slotwise.training import ffn_distillation, lm_loss

    base = small_llama(len(smol_tokenizer))
    base.save_pretrained(tmp_path / "base")
    smol_tokenizer.save_pretrained(tmp_path / "base")
    cfg = RetrofitConfig(layers=[1], mode="replace", memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16))
    model = retrofit(small_llama(len(smol_tokenizer)), cfg)  # same seed: the same weights as base
    save_checkpoint(model, smol_tokenizer, tmp_path / "retrofit", cfg)
    teacher = {1: base.model.layers[1].mlp}
    # W2 = 0: the memory outputs zeros, so the relative error to the FFN is exactly 1 at the start.
    batch = {"input_ids": torch.randint(0, 1000, (2, 9)), "labels": torch.randint(0, 1000, (2, 9))}
    plain, _ = lm_loss(model, batch, 0.0)
    loss, stats = lm_loss(model, batch, 0.0, teacher, distil_weight=2.0)
    assert stats["distil"] == pytest.approx(1.0) and (loss - plain).item() == pytest.approx(2.0, rel=1e-5)
    # The gradient reaches the memory (W2 first: its output is what is compared), never the teacher.
    with ffn_distillation(model, teacher) as losses:
        model(batch["input_ids"])
    losses[0].backward()
    assert model.model.layers[1].mlp.memory.out_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    with ffn_distillation(model, None) as losses:
        model(batch["input_ids"])
    assert losses == []
    # Through the stage: the teacher is retrofit.base_model's FFN; every step logs its distillation loss.
    params = _params(tmp_path, 4, f"retrofit: {{base_model: {tmp_path / 'base'}}}\n")
    params.write_text(params.read_text().replace("early_stop_patience: null,", "early_stop_patience: null, distil_weight: 1.0,"))
    assert train_component.main(_args(params, tmp_path / "retrofit", data_dir, tmp_path / "out", "--state", str(tmp_path / "st"))) == 0
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    distil = [h["distil"] for h in history if "distil" in h]
    assert len(distil) == 4 and distil[0] == pytest.approx(1.0, abs=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["memory"]["heldout_ppl_memory_off"] is None  # a replaced FFN has no "memory off"


def test_distillation_teaches_the_ffns_of_the_base_the_checkpoint_records(tmp_path, data_dir, smol_tokenizer):
    """The teacher is the base model the retrofit recorded (slotwise.json), not this run's retrofit.base_model;
    a recorded base of another width is refused in one line."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slotwise.config import ConfigError
    from slotwise.memory import MemoryConfig
    from slotwise.retrofit import RetrofitConfig

    base = small_llama(len(smol_tokenizer))
    base.save_pretrained(tmp_path / "base")
    smol_tokenizer.save_pretrained(tmp_path / "base")
    wide = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, vocab_size=len(smol_tokenizer)))
    wide.save_pretrained(tmp_path / "wide")
    smol_tokenizer.save_pretrained(tmp_path / "wide")
    cfg = RetrofitConfig(layers=[1], mode="replace", memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16))
    save_checkpoint(retrofit(small_llama(len(smol_tokenizer)), cfg), smol_tokenizer, tmp_path / "retrofit", cfg,
                    extra={"base_model": str(tmp_path / "base")})
    params = _params(tmp_path, 2, f"retrofit: {{base_model: {tmp_path / 'wide'}}}\n")  # not the recorded base
    params.write_text(params.read_text().replace("early_stop_patience: null,", "early_stop_patience: null, distil_weight: 1.0,"))
    assert train_component.main(_args(params, tmp_path / "retrofit", data_dir, tmp_path / "out", "--state", str(tmp_path / "st"))) == 0
    distil = [h["distil"] for h in json.loads((tmp_path / "out" / "history.json").read_text()) if "distil" in h]
    assert len(distil) == 2 and distil[0] == pytest.approx(1.0, abs=1e-6)  # W2 = 0 against the recorded base's FFN
    save_checkpoint(retrofit(small_llama(len(smol_tokenizer)), cfg), smol_tokenizer, tmp_path / "retrofit_wide", cfg,
                    extra={"base_model": str(tmp_path / "wide")})
    with pytest.raises(ConfigError, match="width 48"):
        train_component.main(_args(params, tmp_path / "retrofit_wide", data_dir, tmp_path / "out2", "--state", str(tmp_path / "st2")))
    assert not (tmp_path / "out2").exists()
    # A recorded local path that does not resolve here (relative to another folder): this run's base is used.
    save_checkpoint(retrofit(small_llama(len(smol_tokenizer)), cfg), smol_tokenizer, tmp_path / "retrofit_moved", cfg,
                    extra={"base_model": "elsewhere/base"})
    params.write_text(params.read_text().replace(str(tmp_path / "wide"), str(tmp_path / "base")))
    assert train_component.main(_args(params, tmp_path / "retrofit_moved", data_dir, tmp_path / "out3", "--state", str(tmp_path / "st3"))) == 0


def test_distillation_needs_a_replace_retrofit(tmp_path, retrofit_dir, data_dir):
    from slotwise.config import ConfigError

    params = _params(tmp_path, 2, "")
    params.write_text(params.read_text().replace("early_stop_patience: null,", "early_stop_patience: null, distil_weight: 1.0,"))
    with pytest.raises(ConfigError, match="distil_weight"):
        train_component.main(_args(params, retrofit_dir, data_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
