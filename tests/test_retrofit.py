import json

import pytest
import torch

from conftest import tiny_model, tiny_retrofit_cfg
from slotwise.checkpoint import CheckpointError, load_checkpoint, model_hash, save_checkpoint
from slotwise.retrofit import MemoryMLP, memory_layers, memory_parameters, parameter_summary, record_lookups, retrofit

FAMILIES = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_additive_retrofit_with_zero_output_projection_is_exact(family, input_ids):
    model = tiny_model(family)
    with torch.no_grad():
        before = model(input_ids).logits
        retrofit(model, tiny_retrofit_cfg())
        after = model(input_ids).logits
    assert set(memory_layers(model)) == {1, 3}
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_nonzero_memory_changes_the_logits(family, input_ids):
    model = tiny_model(family)
    with torch.no_grad():
        before = model(input_ids).logits
        retrofit(model, tiny_retrofit_cfg(out_init_std=0.5))
        after = model(input_ids).logits
    assert (before - after).abs().max() > 1e-3


def test_replace_mode_drops_the_mlp(input_ids):
    model = tiny_model("qwen2")
    cfg = tiny_retrofit_cfg()
    cfg.mode = "replace"
    retrofit(model, cfg)
    wrapped = model.model.layers[1].mlp
    assert isinstance(wrapped, MemoryMLP) and wrapped.mlp is None
    assert not any("layers.1.mlp.mlp" in n for n, _ in model.named_parameters())
    assert model(input_ids).logits.shape == (2, 11, 101)


def test_record_lookups_returns_ids_per_layer(input_ids):
    model = tiny_model("llama")
    retrofit(model, tiny_retrofit_cfg())
    with torch.no_grad(), record_lookups(model) as lookups:
        model(input_ids)
    assert sorted(lookups) == [1, 3]
    for records in lookups.values():
        assert len(records) == 1
        assert records[0].ids.shape == (2, 11, 2, 4)
        assert records[0].ids.max() < 64
    # hooks are removed on exit: a later forward records nothing
    model(input_ids)
    assert all(len(r) == 1 for r in lookups.values())


def test_shared_values_are_one_pool_across_layers():
    model = retrofit(tiny_model("llama"), tiny_retrofit_cfg(shared_values=True))
    mems = list(memory_layers(model).values())
    assert mems[0].values.weight is mems[1].values.weight
    assert len(memory_parameters(model)["values"]) == 1
    s = parameter_summary(model)
    assert s["memory_value_params"] == 64 * 48


def test_bad_layer_indices_are_refused():
    with pytest.raises(ValueError, match=r"do not exist: the model has 4 layers \(indices 0..3\)"):
        retrofit(tiny_model("llama"), tiny_retrofit_cfg().__class__(layers=[7]))
    with pytest.raises(ValueError, match="twice"):
        retrofit(tiny_model("llama"), tiny_retrofit_cfg().__class__(layers=[1, -3]))


@pytest.mark.parametrize("family,shared", [("llama", False), ("qwen2", True), ("gemma3", False)])
def test_save_load_round_trip_gives_identical_logits(family, shared, tmp_path, input_ids):
    model = retrofit(tiny_model(family), tiny_retrofit_cfg(out_init_std=0.1, shared_values=shared))
    with torch.no_grad():
        expected = model(input_ids).logits
    save_checkpoint(model, None, tmp_path / "ckpt", tiny_retrofit_cfg(out_init_std=0.1, shared_values=shared))
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(input_ids).logits
    assert torch.equal(expected, got)
    mems = list(memory_layers(loaded).values())
    assert (mems[0].values.weight is mems[1].values.weight) == shared
    assert len(model_hash(tmp_path / "ckpt")) == 64


def test_truncated_checkpoint_is_refused(tmp_path):
    model = retrofit(tiny_model("llama"), tiny_retrofit_cfg())
    ckpt = save_checkpoint(model, None, tmp_path / "ckpt", tiny_retrofit_cfg())
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(ckpt)


def test_save_is_atomic_and_replaces_the_previous_checkpoint(tmp_path):
    model = retrofit(tiny_model("llama"), tiny_retrofit_cfg())
    out = tmp_path / "ckpt"
    save_checkpoint(model, None, out, tiny_retrofit_cfg(), extra_files={"note.txt": "one"})
    save_checkpoint(model, None, out, tiny_retrofit_cfg(), extra_files={"note.txt": "two"})
    assert (out / "note.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.safetensors" in manifest and "slotwise.json" in manifest


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import slotwise.checkpoint as ck

    model = retrofit(tiny_model("llama"), tiny_retrofit_cfg())
    out = save_checkpoint(model, None, tmp_path / "ckpt", tiny_retrofit_cfg())
    before = (out / "manifest.json").read_text()

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, None, out, tiny_retrofit_cfg())
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
