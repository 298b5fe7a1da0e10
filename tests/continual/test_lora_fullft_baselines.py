"""Full finetuning and LoRA baselines on a tiny retrofitted decoder."""
import pytest
import torch
from _continual_helpers import fact_batch, retrofitted, snapshot

from conftest import tiny_model
from slotwise.continual.baselines import FullFinetuner, FullFTConfig, LoraFinetuner, LoraParams, lora_target_modules


def _losses(updater, steps=5):
    batch = fact_batch()
    return [updater.step(batch)["loss"] for _ in range(steps)]


def test_full_finetuning_learns_and_can_freeze_embeddings():
    model = retrofitted()
    before = snapshot(model)
    losses = _losses(FullFinetuner(model, FullFTConfig(lr=3e-3, train_embeddings=False)))
    assert losses[-1] < losses[0] - 1e-2, losses
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, before["model.embed_tokens.weight"])  # tied llama: the LM head too
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_lora_targets_skip_the_memory(family):
    model = retrofitted(family)
    names = lora_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False)
    assert len(names) == 4 * 7  # 4 layers x 7 projections; the wrapped MLP of layers 1, 3 included
    assert "model.layers.1.mlp.mlp.gate_proj" in names
    assert not any(".memory." in n for n in names)
    with_mem = lora_target_modules(model, ["q_proj"], True)
    assert "model.layers.1.mlp.memory.gate" in with_mem and "model.layers.3.mlp.memory.out_proj" in with_mem


def test_lora_trains_only_adapters_on_a_retrofitted_model():
    model = retrofitted("qwen2")
    base = snapshot(model)
    up = LoraFinetuner(model, LoraParams(r=4, alpha=8, lr=1e-2))
    losses = _losses(up)
    assert losses[-1] < losses[0] - 1e-2, losses
    trainable = [n for n, p in up.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".memory." in n for n in trainable)
    # every original weight unchanged (peft keeps them as base_layer)
    for n, p in up.model.named_parameters():
        if "lora_" in n:
            continue
        key = n.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base[key]), key


def test_lora_on_a_plain_model():
    up = LoraFinetuner(tiny_model("llama"), LoraParams(r=2, lr=1e-2))
    losses = _losses(up, 3)
    assert losses[-1] < losses[0]


def test_full_finetuning_of_a_sparse_gradient_memory_uses_dense_value_grads():
    # The GPU profile builds its 1M-slot pool with sparse value gradients (for SparseAdam while
    # healing); AdamW refuses sparse gradients, so full FT must switch the memory to dense ones.
    model = retrofitted(sparse_grad=True)
    before = snapshot(model)
    losses = _losses(FullFinetuner(model, FullFTConfig(lr=3e-3)))
    assert losses[-1] < losses[0] - 1e-2, losses
    name = next(k for k in before if k.endswith("values.weight"))
    assert not torch.equal(model.state_dict()[name], before[name])


def test_lora_adapter_saved_with_save_pretrained_reloads_exactly(tmp_path):
    from peft import PeftModel

    from conftest import tiny_retrofit_cfg
    from slotwise.retrofit import retrofit

    up = LoraFinetuner(retrofitted("qwen2"), LoraParams(r=4, alpha=8, lr=1e-2))
    _losses(up, steps=3)
    path = up.save_adapter(tmp_path / "adapter", base_model="runs/train")
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = __import__("json").loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "runs/train" and config["r"] == 4
    fresh = retrofitted("qwen2")  # the same start model, built again
    loaded = PeftModel.from_pretrained(fresh, path).eval()
    batch = fact_batch()
    with torch.no_grad():
        want = up.model.eval()(input_ids=batch["input_ids"]).logits
        got = loaded(input_ids=batch["input_ids"]).logits
        plain = retrofitted("qwen2")(input_ids=batch["input_ids"]).logits
    assert torch.equal(got, want) and not torch.allclose(got, plain)
