"""Hugging Face native checkpoints (slotwise.hf): transformers loads exactly what load_checkpoint loads.

Tiny Llama / Qwen2 / Gemma3 decoders built in memory, retrofitted with a memory whose output
projection is not zero (so the memory changes the logits), saved with save_checkpoint and
loaded both ways.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

from conftest import TINY, small_llama, tiny_model, tiny_retrofit_cfg
from slotwise.checkpoint import is_hf_native, load_checkpoint, save_checkpoint
from slotwise.components.export import main as export_main
from slotwise.components._cli import run_cli
from slotwise.continual.delta import apply_delta, extract_delta, save_delta
from slotwise.errors import CheckpointError
from slotwise.hf.portable_memory import add_memory as add_portable_memory
from slotwise.hf.native import retrofit_dict
from slotwise.retrofit import memory_layers, record_lookups, retrofit

CASES = {  # family -> memory settings: each family exercises another part of the memory config
    "llama": dict(out_init_std=0.05),  # tied embeddings
    "qwen2": dict(out_init_std=0.05, shared_values=True, memory_plus=False),  # untied head, one shared pool
    "gemma3": dict(out_init_std=0.05, query_norm=False),
}


def saved(tmp_path, family: str, tokenizer=None, model=None, layers=(1, 3), **memory):
    cfg = tiny_retrofit_cfg(**(memory or CASES[family]))
    cfg.layers = list(layers)
    model = model or tiny_model(family)
    torch.manual_seed(1)
    retrofit(model, cfg)
    return save_checkpoint(model, tokenizer, tmp_path / f"{family}-ckpt", cfg), cfg


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", list(CASES))
def test_hf_load_gives_load_checkpoints_logits_bitwise(tmp_path, family, input_ids):
    ckpt, _ = saved(tmp_path, family)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "slotwise" and config["architectures"] == ["SlotwiseForCausalLM"]
    assert config["text_config"].get("_name_or_path", "") == ""  # no machine's path in a cached output
    assert config["auto_map"] == {"AutoConfig": "configuration_slotwise.SlotwiseConfig",
                                  "AutoModelForCausalLM": "modeling_slotwise.SlotwiseForCausalLM"}
    for f in ("configuration_slotwise.py", "modeling_slotwise.py", "portable_memory.py"):
        assert (ckpt / f).is_file() and f in json.loads((ckpt / "manifest.json").read_text())

    ref, _ = load_checkpoint(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    assert type(hf).__name__ == "SlotwiseForCausalLM" and hf.memory_implementation == "slotwise"
    assert torch.equal(logits(hf, input_ids), logits(ref, input_ids))
    # the memory is really there and really read: switching it off changes the logits
    off = tiny_model(family)
    assert not torch.allclose(logits(off, input_ids), logits(ref, input_ids))
    # slotwise's tools work on the HF-loaded model: the same slots are read
    with record_lookups(hf) as got, record_lookups(ref) as want:
        hf(input_ids), ref(input_ids)
    assert sorted(got) == sorted(want) == [1, 3]
    assert all(torch.equal(got[i][0].ids, want[i][0].ids) for i in got)


def test_plain_load_without_remote_code_fails_loudly(tmp_path):
    ckpt, _ = saved(tmp_path, "llama")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=False)


def test_hf_load_refuses_a_missing_tensor_instead_of_initialising_it(tmp_path):
    ckpt, _ = saved(tmp_path, "llama")
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.mlp.up_proj.weight"]  # the FFN beside a memory layer
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"missing_keys \['model.layers.1.mlp.mlp.up_proj.weight'\]"):
        AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt, verify=False)


@pytest.mark.parametrize("memory", [dict(), dict(memory_plus=False, query_norm=False), dict(shared_values=True)],
                         ids=["default", "plain", "shared"])
@pytest.mark.parametrize("mode,alpha", [("additive", 0.5), ("replace", 1.0)])
def test_portable_memory_twin_equals_slotwise_memory_bitwise(memory, mode, alpha, input_ids):
    cfg = tiny_retrofit_cfg(out_init_std=0.05, **memory)
    cfg.mode, cfg.alpha = mode, alpha
    torch.manual_seed(2)
    ours = retrofit(tiny_model("qwen2"), cfg)
    twin = add_portable_memory(tiny_model("qwen2"), retrofit_dict(cfg))
    missing, unexpected = twin.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(logits(twin, input_ids), logits(ours, input_ids))


def test_checkpoint_loads_in_a_python_without_slotwise(tmp_path, input_ids):
    """The user with only the checkpoint directory, torch and transformers: the portable twin."""
    ckpt, _ = saved(tmp_path, "qwen2")
    torch.save(input_ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        class NoSlotwise:  # as if slotwise were not installed
            def find_spec(self, name, path=None, target=None):
                if name == "slotwise" or name.startswith("slotwise."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, NoSlotwise())
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert m.memory_implementation == "portable", m.memory_implementation
        assert "slotwise" not in sys.modules
        with torch.no_grad():
            torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ref, _ = load_checkpoint(ckpt)
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(ref, input_ids))


def test_pipeline_generates_what_load_checkpoint_generates(tmp_path, smol_tokenizer):
    model = small_llama(len(smol_tokenizer))
    ckpt, _ = saved(tmp_path, "llama", tokenizer=smol_tokenizer, model=model, layers=[1], out_init_std=0.05)
    ref, tok = load_checkpoint(ckpt)
    prompt = "The capital of France is"
    want = tok.decode(ref.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)[0])
    pipe = pipeline("text-generation", model=str(ckpt), trust_remote_code=True)
    got = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert got == want and len(got) > len(prompt)


def test_save_pretrained_of_an_hf_loaded_model_stays_hf_native(tmp_path, input_ids):
    ckpt, _ = saved(tmp_path, "qwen2")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    hf.save_pretrained(tmp_path / "resaved")
    assert is_hf_native(tmp_path / "resaved") and (tmp_path / "resaved" / "modeling_slotwise.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True).eval()
    ours, _ = load_checkpoint(tmp_path / "resaved")
    assert torch.equal(logits(again, input_ids), logits(hf, input_ids))
    assert torch.equal(logits(ours, input_ids), logits(hf, input_ids))


def write_format1(model, cfg, out):
    """A checkpoint as save_checkpoint wrote it before format 2: base config.json, retrofit in slotwise.json."""
    from safetensors.torch import save_model

    from slotwise.atomic import sha256_file

    out.mkdir()
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))
    (out / "slotwise.json").write_text(json.dumps({"format": 1, "retrofit": retrofit_dict(cfg)}))
    (out / "manifest.json").write_text(json.dumps({p.name: sha256_file(p) for p in sorted(out.iterdir())}))
    return out


def test_format1_checkpoint_loads_and_exports_as_hf_native(tmp_path, input_ids):
    cfg = tiny_retrofit_cfg(out_init_std=0.05)
    model = retrofit(tiny_model("llama"), cfg).eval()
    old = write_format1(model, cfg, tmp_path / "old")
    loaded, _ = load_checkpoint(old)
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
    assert not is_hf_native(old)
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, ["--model", str(old), "--out", str(tmp_path / "new")])
    assert exit_.value.code == 0
    assert is_hf_native(tmp_path / "new")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "new", trust_remote_code=True).eval()
    assert torch.equal(logits(hf, input_ids), logits(model, input_ids))


def test_export_merges_a_served_delta(tmp_path, input_ids, capsys):
    ckpt, _ = saved(tmp_path, "llama")
    base, _ = load_checkpoint(ckpt)
    updated, _ = load_checkpoint(ckpt)
    pool = memory_layers(updated)[1].values.weight
    with torch.no_grad():
        pool[[3, 17, 40]] += 0.5  # what an SMF update does: a few value rows change
    delta = extract_delta(base, updated)
    serve = tmp_path / "serve"
    save_delta(delta, serve / "deltas" / "run1")
    (serve / "current").symlink_to(serve / "deltas" / "run1")

    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, ["--model", str(ckpt), "--deltas", str(serve), "--out", str(tmp_path / "merged")])
    assert exit_.value.code == 0
    merged, _ = load_checkpoint(tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    want = logits(apply_delta(base, delta), input_ids)
    assert torch.equal(logits(merged, input_ids), want) and torch.equal(logits(hf, input_ids), want)
    assert not torch.equal(want, logits(load_checkpoint(ckpt)[0], input_ids))  # the delta changed the model
    meta = json.loads((tmp_path / "merged" / "slotwise.json").read_text())
    assert meta["merged_delta"]["new_hash"] == delta.new_hash

    # a delta made on another checkpoint is refused with one line and exit 2, nothing written
    other, _ = saved(tmp_path, "gemma3")
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, ["--model", str(other), "--deltas", str(serve), "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not apply" in err[0]
    assert not (tmp_path / "bad").exists()


def test_export_refuses_to_overwrite_its_input(tmp_path, capsys):
    ckpt, _ = saved(tmp_path, "llama")
    before = (ckpt / "manifest.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, ["--model", str(ckpt), "--out", str(ckpt)])
    assert exit_.value.code == 2 and "input checkpoint" in capsys.readouterr().err
    assert (ckpt / "manifest.json").read_text() == before


def test_config_json_names_no_path_of_the_machine(tmp_path):
    model = tiny_model("llama")
    model.config._name_or_path = str(tmp_path / "where-the-base-model-was-read-from")
    cfg = tiny_retrofit_cfg()
    ckpt = save_checkpoint(retrofit(model, cfg), None, tmp_path / "ckpt", cfg)
    assert "where-the-base-model" not in (ckpt / "config.json").read_text()
