"""Switch a retrofitted model's memory branch off for a block of code (to measure what it adds).

    with memory_disabled(model):          # every additive MemoryMLP computes mlp(x) + 0 * memory(x)
        logits = model(ids).logits        # == the base model's logits

Replacement-mode layers have no FFN to fall back to, so there is nothing to switch to:
`memory_disabled` refuses them (check `memory_mode(model)` first). A model without memory layers
passes through unchanged.
"""
from __future__ import annotations

import torch.nn as nn

from slotwise.retrofit import MemoryMLP, memory_disabled  # noqa: F401  (re-exported)


def memory_mlps(model: nn.Module) -> list[MemoryMLP]:
    return [m for m in model.modules() if isinstance(m, MemoryMLP)]


def memory_mode(model: nn.Module) -> str | None:
    """None (no memory layers), "additive", "replace", or "mixed"."""
    modes = {m.mode for m in memory_mlps(model)}
    if not modes:
        return None
    return modes.pop() if len(modes) == 1 else "mixed"
