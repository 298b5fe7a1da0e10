"""Hugging Face native slotwise checkpoints: a config class and a model class transformers can load.

    write_hf_config(model, retrofit_cfg, out_dir)   # config.json (model_type "slotwise", auto_map,
                                                     # architectures) + the modelling code beside it
    AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)   # -> SlotwiseForCausalLM

configuration_slotwise.py, modeling_slotwise.py and portable_memory.py are the files copied into
every checkpoint: they import only torch, transformers and each other (relative imports), and
use slotwise when it is installed (see modeling_slotwise). native.py is slotwise's side.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.nn as nn
from transformers.dynamic_module_utils import get_relative_import_files

from slotwise.hf import modeling_slotwise
from slotwise.hf.configuration_slotwise import SlotwiseConfig
from slotwise.hf.modeling_slotwise import SlotwiseForCausalLM
from slotwise.hf.native import retrofit_config_from_dict, retrofit_dict

MODEL_TYPE = SlotwiseConfig.model_type


def code_files() -> list[Path]:
    """The modelling file and every file it imports relatively (transformers' own rule)."""
    main = Path(modeling_slotwise.__file__)
    return [main, *sorted(Path(f) for f in get_relative_import_files(main))]


def slotwise_config(model: nn.Module, retrofit: dict) -> SlotwiseConfig:
    """The SlotwiseConfig of a retrofitted base model (its config becomes text_config)."""
    base = model.config
    text = base.to_dict()
    text.pop("_name_or_path", None)  # where the base model was read from: a machine's path, not its config
    return SlotwiseConfig(text_config=text, retrofit=retrofit, dtype=base.dtype,
                          architectures=[SlotwiseForCausalLM.__name__])


def write_hf_config(model: nn.Module, retrofit: dict, out_dir: str | Path) -> SlotwiseConfig:
    """config.json with auto_map and architectures, and the modelling code, into out_dir."""
    config = slotwise_config(model, retrofit)
    config.auto_map = {"AutoModelForCausalLM": f"{modeling_slotwise.__name__.rsplit('.', 1)[-1]}.{SlotwiseForCausalLM.__name__}"}
    config.save_pretrained(out_dir)  # registered for AutoConfig: adds it to auto_map, copies its file
    for f in code_files():
        shutil.copyfile(f, Path(out_dir) / f.name)
    return config


__all__ = ["SlotwiseConfig", "SlotwiseForCausalLM", "MODEL_TYPE", "code_files", "slotwise_config", "write_hf_config",
           "retrofit_config_from_dict", "retrofit_dict"]
