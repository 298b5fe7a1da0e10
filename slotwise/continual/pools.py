"""The value pools of a retrofitted model: the only tensors SMF and sparse deltas touch.

A pool is one (N, v_dim) table; several memory layers may share one. Each pool is named by its
parameter name in `model.named_parameters()` (the first layer that holds it, when shared), which
is stable across save/load of the same retrofit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slotwise.retrofit import memory_layers


@dataclass(frozen=True)
class Pool:
    name: str  # parameter name, e.g. "model.layers.1.mlp.memory.values.weight"
    weight: nn.Parameter  # (N, v_dim)
    layers: tuple[int, ...]  # decoder layer indices reading this pool, ascending


def value_pools(model: nn.Module) -> list[Pool]:
    """Every distinct value pool of the model's memory layers, in layer order."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_id: dict[int, list[int]] = {}
    weights: dict[int, nn.Parameter] = {}
    for i, mem in memory_layers(model).items():
        w = mem.values.weight
        by_id.setdefault(id(w), []).append(i)
        weights[id(w)] = w
    if not by_id:
        raise ValueError(f"{type(model).__name__} has no memory layers (retrofit it first)")
    return [Pool(names[k], weights[k], tuple(layers)) for k, layers in by_id.items()]
