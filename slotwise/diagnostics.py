"""Does the memory matter, is it used, is it specific? The measures a healed retrofit reports.

    matters    held-out perplexity with memory on vs off; the memory branch's output norm
               relative to the FFN's (per layer)
    used       coverage and effective slots over held-out background batches
    specific   median document frequency as a fraction of |B| (held-out batches, not the heal's own)
"""
from __future__ import annotations

import math

import torch

from slotwise.evaluation.perplexity import blocks_nll
from slotwise.retrofit import MemoryMLP, decoder_layers, memory_disabled
from slotwise.slot_stats import collect, summarize


def perplexity(model, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over (B, S) token blocks."""
    total, count = blocks_nll(model, torch.cat(batches), batch_size=len(batches[0]))
    return math.exp(total / count)


@torch.no_grad()
def memory_norm_ratio(model, batches: list[torch.Tensor]) -> dict[int, float]:
    """Per memory layer: mean over tokens of ||alpha * memory(x)|| / ||mlp(x)||."""
    ratios: dict[int, list[float]] = {}
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.mlp, MemoryMLP) and layer.mlp.mlp is not None:
            handles.append(layer.mlp.register_forward_hook(lambda m, inp, out, i=i: captured.setdefault(i, []).append(inp[0])))
    try:
        for b in batches:
            captured.clear()
            model(input_ids=b)
            for i, xs in captured.items():
                wrapped = decoder_layers(model)[i].mlp
                x = xs[0]
                mem = wrapped.alpha * wrapped.memory(x).out
                ffn = wrapped.mlp(x)
                ratios.setdefault(i, []).append((mem.norm(dim=-1) / ffn.norm(dim=-1).clamp_min(1e-9)).mean().item())
    finally:
        for h in handles:
            h.remove()
    return {i: sum(r) / len(r) for i, r in ratios.items()}


def memory_report(model, heldout: list[torch.Tensor], stats_batches: list[torch.Tensor]) -> dict:
    """Everything the heal targets ask for, in one JSON-able dict."""
    model.eval()
    ppl_on = perplexity(model, heldout)
    ppl_off = None
    if all(m.mode == "additive" for m in model.modules() if isinstance(m, MemoryMLP)):  # a replaced FFN has no "off"
        with memory_disabled(model):
            ppl_off = perplexity(model, heldout)
    per_layer, per_pool = collect(model, stats_batches, progress="slot usage (held-out)")
    norms = memory_norm_ratio(model, heldout[:2])
    return {
        "heldout_ppl_memory_on": ppl_on,
        "heldout_ppl_memory_off": ppl_off,
        "memory_off_ppl_increase": None if ppl_off is None else ppl_off / ppl_on - 1,
        "layers": {str(i): {**{k: v for k, v in summarize(s).items() if k != "top_slots"}, "output_norm_ratio": norms.get(i)}
                   for i, s in per_layer.items()},
        "pools": {name: {k: v for k, v in summarize(s).items() if k != "top_slots"} for name, s in per_pool.items()},
    }
