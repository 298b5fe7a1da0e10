"""The memory a SlotwiseForCausalLM gets when slotwise is installed: slotwise's own retrofit().

modeling_slotwise.add_memory imports this module (and falls back to portable_memory.py when it
cannot), so the loaded model has slotwise's MemoryMLP layers: every memory kind, the Triton
kernels on CUDA, and record_lookups / SMF / training work on it.
"""
from __future__ import annotations

import torch.nn as nn
from omegaconf import OmegaConf

from slotwise.retrofit import RetrofitConfig, retrofit


def retrofit_config_from_dict(d: dict) -> RetrofitConfig:
    """A RetrofitConfig from its dict form (config.json's `retrofit`); an unknown key is an error."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RetrofitConfig), d))


def retrofit_dict(cfg: RetrofitConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def add_memory(model: nn.Module, retrofit_cfg: dict) -> nn.Module:
    return retrofit(model, retrofit_config_from_dict(retrofit_cfg))
