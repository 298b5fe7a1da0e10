"""One entry point for every continual update method: make_updater(method, model, params).

    up = make_updater("smf", model, SMFConfig(top_t=500, score="kl", lr=1e-3), backgrounds=tables)
    up = make_updater("full", model, {"lr": 1e-5, "train_embeddings": False})
    up = make_updater("lora", model, {"r": 16, "lr": 2e-4})
    up = make_updater("grit", model, {"r": 16, "reproject_every": 50, "energy": 0.9})
    for batch in stream:
        metrics = up.step(batch)        # {"loss": float, ...method-specific}
    up.model                            # the model being updated (peft-wrapped for lora / grit)

params: the method's typed schema (METHODS: SMFConfig, FullFTConfig, LoraParams, GritParams), or a
dict merged onto it (OmegaConf struct mode: an unknown key or a wrong type is an error naming it).
The same schemas type `continual.methods[i].params` and `nightly.smf` in params.yaml
(slotwise.config). The updater changes `model` in place.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from slotwise.continual.baselines import FullFinetuner, FullFTConfig, LoraFinetuner, LoraParams, LossFn, causal_lm_loss
from slotwise.continual.grit import GritParams, GritUpdater
from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner
from slotwise.schema import Choice, omegaconf_error


class Method(Choice):
    smf = "smf"  # sparse memory finetuning
    full = "full"  # full finetuning
    lora = "lora"
    grit = "grit"  # curvature-aware LoRA


METHODS = {Method.smf: SMFConfig, Method.full: FullFTConfig, Method.lora: LoraParams, Method.grit: GritParams}


class Updater(Protocol):
    model: nn.Module

    def step(self, batch: dict) -> dict: ...


def method_schema(method: str) -> DictConfig:
    """The OmegaConf structured schema (struct mode) of a method's params."""
    if method not in METHODS:
        raise ValueError(f"continual method must be one of {Method.values()}, got {method!r}")
    schema = OmegaConf.structured(METHODS[method])
    OmegaConf.set_struct(schema, True)
    return schema


def build_params(method: str, params: Any = None):
    """The method's typed params: an instance of its schema as it is, a dict (or None) merged onto it."""
    schema = method_schema(method)
    if isinstance(params, METHODS[method]):
        return params
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, params or {}))
    except ConfigKeyError as exc:
        raise ValueError(f"{method} params: unknown key(s) [{exc.key!r}] (expected one of: {', '.join(schema.keys())})") from None
    except OmegaConfBaseException as exc:
        raise ValueError(f"{method} params: {omegaconf_error(exc, schema)}") from None


def make_updater(method: str, model: nn.Module, params: Any = None, *,
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
