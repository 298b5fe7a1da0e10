"""One entry point for every continual update method: make_updater(method, model, params).

    up = make_updater("smf", model, {"top_t": 500, "score": "kl", "lr": 1e-3}, backgrounds=tables)
    up = make_updater("full", model, {"lr": 1e-5, "train_embeddings": False})
    up = make_updater("lora", model, {"r": 16, "lr": 2e-4})
    up = make_updater("grit", model, {"r": 16, "reproject_every": 50, "energy": 0.9})
    for batch in stream:
        metrics = up.step(batch)        # {"loss": float, ...method-specific}
    up.model                            # the model being updated (peft-wrapped for lora / grit)

params: the method's typed parameters (SMFConfig, FullFTConfig, LoraParams, GritParams) as a
dict; an unknown key is an error naming the expected ones. The updater changes `model` in place.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch.nn as nn

from slotwise.continual.baselines import FullFinetuner, FullFTConfig, LoraFinetuner, LoraParams, LossFn, causal_lm_loss
from slotwise.continual.grit import GritParams, GritUpdater
from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner

METHODS = {"smf": SMFConfig, "full": FullFTConfig, "lora": LoraParams, "grit": GritParams}


class Updater(Protocol):
    model: nn.Module

    def step(self, batch: dict) -> dict: ...


def build_params(method: str, params: dict | None):
    """The method's params dataclass from a dict; unknown keys -> ValueError naming the known ones."""
    if method not in METHODS:
        raise ValueError(f"continual method must be one of {sorted(METHODS)}, got {method!r}")
    cls = METHODS[method]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params or {}) - set(known))
    if unknown:
        raise ValueError(f"{method} params: unknown key(s) {unknown} (expected one of: {', '.join(known)})")
    return cls(**(params or {}))


def make_updater(method: str, model: nn.Module, params: dict | None = None, *,
                 backgrounds: dict[int, Background] | None = None, loss_fn: LossFn = causal_lm_loss) -> Updater:
    """backgrounds: SMF's slot-frequency tables, keyed by each value pool's first layer index."""
    cfg = build_params(method, params)
    if method == "smf":
        if loss_fn is not causal_lm_loss:
            raise ValueError("smf uses the causal LM loss (its slot counts follow the labels)")
        return SparseMemoryFinetuner(model, backgrounds, cfg)
    if method == "full":
        return FullFinetuner(model, cfg, loss_fn)
    if method == "lora":
        return LoraFinetuner(model, cfg, loss_fn)
    return GritUpdater(model, cfg, loss_fn)
