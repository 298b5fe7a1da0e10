"""Insert memory layers (product-key, or Mixture of Chapters) into a pretrained Hugging Face decoder.

At each configured layer index the decoder layer's feed-forward block is wrapped:

    additive:  mlp(x) + alpha * memory(x)      (beside the FFN; with W2 = 0 the model is unchanged)
    replace:   memory(x)                       (instead of the FFN)

Works for any decoder whose layers expose `.mlp` (Llama, Qwen2, Gemma3, Mistral, ...).
`record_lookups` returns, per memory layer, the slot ids and weights each forward used.
memory.kind picks the layer: product_key (slotwise.memory) or chapters (slotwise.chapters, whose
bank plays the value pool's part: `.values.weight`, shared across layers with shared_values).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from slotwise.chapters import ChapterMemory, chapter_param_counts, install_routing, new_bank
from slotwise.memory import KINDS, MemoryConfig, MemoryOutput, ProductKeyMemory, ValuePool, memory_param_counts
from slotwise.schema import Choice, layer_indices, number

class RetrofitMode(Choice):
    additive = "additive"  # mlp(x) + alpha * memory(x)
    replace = "replace"  # memory(x) in place of the FFN


MODES = RetrofitMode.values()


@dataclass
class RetrofitConfig:
    layers: list[int] = layer_indices(lambda: [8, 15, 22])
    mode: RetrofitMode = RetrofitMode.additive
    alpha: float = number(1.0)  # scale of the memory branch in additive mode
    memory: MemoryConfig = field(default_factory=MemoryConfig)


class MemoryMLP(nn.Module):
    """A decoder layer's FFN with a memory branch beside it (or in its place)."""

    def __init__(self, mlp: nn.Module | None, memory: ProductKeyMemory | ChapterMemory, mode: str, alpha: float):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"retrofit.mode must be one of {MODES}, got {mode!r}")
        self.mlp = mlp if mode == "additive" else None
        self.memory = memory
        self.mode = mode
        self.alpha = alpha

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mlp is not None and self.alpha == 0:  # memory switched off: skip the lookup entirely
            return self.mlp(x, *args, **kwargs)
        mem = self.memory(x).out
        if self.mlp is None:
            return mem
        return self.mlp(x, *args, **kwargs) + self.alpha * mem


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (model.model.layers for Llama/Qwen2/Gemma3)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):  # a data-parallel run's wrapper
        model = model.module
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder `layers` ModuleList found; cannot retrofit")
    return layers


def retrofit(model: nn.Module, cfg: RetrofitConfig) -> nn.Module:
    """Wrap the FFN of each layer in cfg.layers with a memory branch, in place; returns the model.

    New memory parameters are created in the base model's dtype and device.
    """
    layers = decoder_layers(model)
    n = len(layers)
    if not cfg.layers:
        raise ValueError("retrofit.layers is empty: name at least one layer index")
    bad = [i for i in cfg.layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n} layers (indices 0..{n - 1})")
    if len(set(i % n for i in cfg.layers)) != len(cfg.layers):
        raise ValueError(f"retrofit.layers {cfg.layers} names a layer twice")
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    ref = next(model.parameters())
    kind = cfg.memory.kind
    if kind not in KINDS:
        raise ValueError(f"retrofit.insert.memory.kind must be one of {KINDS}, got {kind!r}")
    layer_cls = ChapterMemory if kind == "chapters" else ProductKeyMemory
    shared = None
    if cfg.memory.shared_values:
        shared = (new_bank(cfg.memory, hidden) if kind == "chapters"
                  else ValuePool(cfg.memory.n_keys**2, cfg.memory.v_dim or hidden, cfg.memory.value_init_std))
    for i in cfg.layers:
        layer = layers[i]
        if isinstance(layer.mlp, MemoryMLP):
            raise ValueError(f"layer {i} already has a memory layer")
        memory = layer_cls(hidden, hidden, cfg.memory, values=shared)
        layer.mlp = MemoryMLP(layer.mlp, memory, cfg.mode, cfg.alpha).to(device=ref.device)
        memory.to(dtype=ref.dtype)
    if kind == "chapters":  # decoding with a KV cache carries the routing state on the cache
        install_routing(model.get_decoder() if hasattr(model, "get_decoder") else model,
                        [layers[i].mlp.memory for i in cfg.layers])
    return model


def memory_layers(model: nn.Module) -> dict[int, ProductKeyMemory | ChapterMemory]:
    """{decoder layer index: its memory module} in layer order."""
    return {i: layer.mlp.memory for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, MemoryMLP)}


def memory_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The memory's parameters by role: 'values' (the value pools, each once) and 'other'."""
    seen: set[int] = set()
    values, other = [], []
    for mem in memory_layers(model).values():
        if id(mem.values.weight) not in seen:
            seen.add(id(mem.values.weight))
            values.append(mem.values.weight)
        other += [p for name, p in mem.named_parameters() if not name.startswith("values.")]
    return {"values": values, "other": other}


def parameter_summary(model: nn.Module) -> dict:
    """Counts for the note and the retrofit summary: base, memory (by part and per layer), total."""
    layers = memory_layers(model)
    per_layer = {i: chapter_param_counts(m) if isinstance(m, ChapterMemory) else memory_param_counts(m) for i, m in layers.items()}
    groups = memory_parameters(model)
    memory_total = sum(p.numel() for ps in groups.values() for p in ps)
    total = sum(p.numel() for p in model.parameters())  # deduplicates tied/shared parameters
    return {
        "base_params": total - memory_total,
        "memory_params": memory_total,
        "memory_value_params": sum(p.numel() for p in groups["values"]),
        "total_params": total,
        "per_layer": per_layer,
    }


@contextlib.contextmanager
def record_lookups(model: nn.Module) -> Iterator[dict[int, list[MemoryOutput]]]:
    """Collect what every memory layer looked up during the forwards inside the block.

        with record_lookups(model) as lookups:
            model(input_ids)
        ids = lookups[8][0].ids      # (B, S, H, knn) for layer 8, first forward

    Implemented with forward hooks that read each memory's return value (no state on the layers).
    """
    records: dict[int, list[MemoryOutput]] = {i: [] for i in memory_layers(model)}
    handles = [
        mem.register_forward_hook(lambda _m, _inp, out, i=i: records[i].append(out._replace(out=None)))
        for i, mem in memory_layers(model).items()
    ]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def memory_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as if its additive memory branches were absent (alpha = 0), then restore.

    Replace-mode layers have no FFN to fall back on, so they are refused. A model without memory
    layers passes through unchanged.
    """
    wrapped = [m for m in model.modules() if isinstance(m, MemoryMLP)]
    replace = [w for w in wrapped if w.mode != "additive"]
    if replace:
        raise ValueError(f"memory_disabled: {len(replace)} memory layer(s) replace their FFN; memory off is undefined there")
    saved = [w.alpha for w in wrapped]
    try:
        for w in wrapped:
            w.alpha = 0.0
        yield
    finally:
        for w, a in zip(wrapped, saved):
            w.alpha = a
