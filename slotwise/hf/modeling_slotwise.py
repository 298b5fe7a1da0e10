"""SlotwiseForCausalLM: a base Hugging Face decoder with slotwise memory layers, loadable by transformers.

Saved beside the weights of every retrofitted slotwise checkpoint (with configuration_slotwise.py
and portable_memory.py; config.json's auto_map names them), so that

    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    pipe = pipeline("text-generation", model=ckpt, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=<ckpt>,trust_remote_code=True ...

give the logits slotwise.checkpoint.load_checkpoint gives. The wrapper builds the base decoder
from config.text_config, inserts the memory layers config.retrofit names, and holds the base's
own children (`model`, `lm_head`) under their own names: parameter names, and so the safetensors
file, are those of the retrofitted base model. forward and generate are the base model's.

Which memory code runs:
  * slotwise installed: slotwise's own retrofit() (every memory kind, Triton kernels on CUDA,
    record_lookups / SMF / training work on the loaded model);
  * otherwise: portable_memory.py, a torch-only inference twin of the product-key memory with
    the same logits (other memory kinds then refuse to load, naming what is missing).
Weights are loaded strictly: a missing or unexpected tensor is an error, never a random init.
"""
from __future__ import annotations

import torch.nn as nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_slotwise import SlotwiseConfig
from .portable_memory import add_memory as add_portable_memory


def add_memory(base: nn.Module, retrofit: dict) -> str:
    """Insert the memory layers into base, in place -> which implementation did it."""
    try:
        from slotwise.hf.native import add_memory as add_native_memory
    except ImportError:  # slotwise not installed: the torch-only twin
        add_portable_memory(base, retrofit)
        return "portable"
    add_native_memory(base, retrofit)
    return "slotwise"


def shared_parameter_names(module: nn.Module) -> dict[str, str]:
    """{alias: first name} for every parameter reachable under several names (a tied LM head, a
    value pool shared by several memory layers); the checkpoint holds each such tensor once."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


class SlotwiseForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SlotwiseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: SlotwiseConfig, base: nn.Module | None = None):
        """base: an already retrofitted model to wrap (no copy); None builds one from the config."""
        super().__init__(config)
        if base is None:
            base = AutoModelForCausalLM.from_config(config.text_config)
            self.memory_implementation = add_memory(base, config.retrofit)
        else:
            self.memory_implementation = "given"
        # The base model is held outside the module tree; its children are registered here under
        # their own names, so parameters (and the checkpoint's tensor names) are the base's.
        object.__setattr__(self, "_base", base)
        for name, child in base.named_children():
            self.add_module(name, child)
        # Tensors the checkpoint holds once: the base's tied weights (untied while from_pretrained
        # builds the model, so named by the base's own mapping) and shared value pools (one module).
        self._aliases = {**shared_parameter_names(base), **base.get_expanded_tied_weights_keys(all_submodels=True)}
        self._tied_weights_keys = dict(self._aliases)  # what save_pretrained stores once
        self.post_init()

    # -- loading: ties by identity, no re-initialisation, strict -----------------------------------
    def _init_weights(self, module):
        """Nothing to do: the base model initialised its weights, retrofit its memory's, and
        from_pretrained overwrites every one of them (it refuses to leave one missing)."""

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        keys = super().get_expanded_tied_weights_keys(all_submodels)
        if not all_submodels:
            keys.update(self._aliases)
        return keys

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise OSError(f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')}: the weights do not match "
                          f"the slotwise model: " + "; ".join(f"{k} {v[:3]}" for k, v in bad.items()))
        return (model, info) if want_info else model

    # -- the base model's behaviour -------------------------------------------------------------
    @property
    def base_model_with_memory(self) -> nn.Module:
        """The retrofitted base decoder (e.g. a LlamaForCausalLM); shares every parameter with self."""
        return self._base

    def get_input_embeddings(self):
        return self._base.get_input_embeddings()

    def get_output_embeddings(self):
        return self._base.get_output_embeddings()

    def get_decoder(self):
        return self._base.get_decoder()

    def train(self, mode: bool = True):
        super().train(mode)
        self._base.training = mode
        return self

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self._base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                          use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self._base.prepare_inputs_for_generation(*args, **kwargs)

    def generate(self, *args, generation_config=None, **kwargs):
        return self._base.generate(*args, generation_config=generation_config or self.generation_config, **kwargs)


SlotwiseForCausalLM.register_for_auto_class("AutoModelForCausalLM")
