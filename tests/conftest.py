"""Shared fixtures: tiny decoder models built in memory from real HF configs (nothing downloads)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trust_remote_code loads copy a checkpoint's modelling code into HF_MODULES_CACHE (read by
# transformers at import): keep the tests' copies out of ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(__import__("tempfile").gettempdir(), f"slotwise-hf-modules-{os.getuid()}"))
# Without a GPU, Triton kernels can only run interpreted; this must be set before anything
# (transformers, via torch) imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from slotwise.memory import MemoryConfig
from slotwise.retrofit import RetrofitConfig

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3TextConfig(**TINY, head_dim=12, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def tiny_retrofit_cfg(**memory) -> RetrofitConfig:
    mem = dict(n_keys=8, heads=2, knn=4, k_dim=16)
    mem.update(memory)
    return RetrofitConfig(layers=[1, 3], mode="additive", alpha=1.0, memory=MemoryConfig(**mem))


# A few QA pairs and a small memory config for tests that stream facts through a retrofitted model.
SAMPLE_QA = [
    {"question": "Which planet is known as the Red Planet", "answers": ["Mars"]},
    {"question": "What is the largest ocean on Earth", "answers": ["Pacific Ocean", "Pacific"]},
    {"question": "Who painted the Mona Lisa", "answers": ["Leonardo da Vinci", "Leonardo"]},
    {"question": "What is the chemical symbol for gold", "answers": ["Au"]},
]
SMALL_MEMORY_CFG = RetrofitConfig(layers=[1], memory=MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=16, out_init_std=0.05))

REPO_DATA = Path(__file__).resolve().parents[1] / "data"  # the repository's own data/ (committed, with licences)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer, read from the embedded GGUF (a few seconds, offline)."""
    from transformers import AutoTokenizer

    from slotwise.models import resolve_source

    path, kwargs = resolve_source("embedded:smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path, **kwargs)


def small_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with a real vocabulary, for tests that need a real tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=g)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, smol_tokenizer) -> Path:
    """The six pipeline stages on a tiny model (tests/_tiny_pipeline.py), run once per session;
    returns the run's root (base/, params.yaml, runs/<stage>/)."""
    from _tiny_pipeline import build_inputs, run_stages

    root = build_inputs(tmp_path_factory.mktemp("tiny") / "run", smol_tokenizer)
    run_stages(root)
    return root


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The fused backward + update ops' backend (tests/test_fused_update.py, tests/continual/test_smf_fused.py);
    the rest of the model runs as usual: the interpreted search is slow."""
    if request.param == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # these tensors live on the CPU (tests/gpu: CUDA)
            pytest.skip("the CPU tests run the Triton kernels interpreted (TRITON_INTERPRET=1)")
        import functools

        from slotwise import kernels

        for name in ("weighted_bag_backward_sgd_", "weighted_bag_backward_adam_"):
            monkeypatch.setattr(kernels, name, functools.partial(getattr(kernels, name), backend="triton"))
    return request.param
