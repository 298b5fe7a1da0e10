"""The baselines SMF is compared with: full finetuning and LoRA (Lin et al. 2025, table 1).

    full   AdamW on every parameter (or every one but the input embeddings; with tied embeddings
           that also freezes the LM head, which is the same tensor)
    lora   W x + (alpha / r) * B A x on the decoder's attention and MLP projections (q, k, v, o,
           gate, up, down; peft), A (r, d_in), B (d_out, r), B = 0 at the start; AdamW on A, B

Each updater owns its model (LoRA wraps it in a peft model: use `updater.model` afterwards) and
has one method, `.step(batch) -> {"loss": float, ...}`, on a batch of input_ids, attention_mask and
labels (-100 = no loss). LoRA (and GRIT) adapters are saved the peft way, `updater.save_adapter(dir)`:
adapter_config.json + adapter_model.safetensors, loaded back with
`PeftModel.from_pretrained(base_model, dir)` on the model they were trained from. They leave train/eval mode to the caller (the tiny test models and
SmolLM2 have no dropout). On a retrofitted model, LoRA never adapts the memory's own Linear
layers (query, gate, out_proj) unless include_memory=True.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from slotwise.chapters import ChapterMemory
from slotwise.memory import ProductKeyMemory
from slotwise.schema import number

LossFn = Callable[[nn.Module, dict], torch.Tensor]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEMORY_LINEARS = ("query", "gate", "out_proj")  # ProductKeyMemory's nn.Linear children (ChapterMemory: query, out_proj)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The HF causal LM loss (mean over label tokens != -100, shifted by one)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss


@dataclass
class FullFTConfig:
    lr: float = number(1e-5, low=0, open_low=True)  # the prototypes: 1e-5 / 3e-6 / 1e-6
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    train_embeddings: bool = True  # False: freeze the input embeddings (and a tied LM head)
    max_grad_norm: float | None = None


def full_ft_parameters(model: nn.Module, train_embeddings: bool) -> list[nn.Parameter]:
    """The parameters full finetuning trains; sets requires_grad on every parameter accordingly."""
    frozen = set() if train_embeddings else {id(p) for p in model.get_input_embeddings().parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            params.append(p)
    return params


def dense_step(model, batch: dict, loss_fn: LossFn, params: list, opt: torch.optim.Optimizer, max_grad_norm: float | None) -> dict:
    """One ordinary optimizer step (full FT and LoRA): loss, backward, optional clipping, step."""
    loss = loss_fn(model, batch)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item()}


def dense_value_grads(model: nn.Module) -> None:
    """Memory layers built for sparse value gradients (SparseAdam) go dense: AdamW takes no sparse grads."""
    for m in model.modules():
        if isinstance(m, (ProductKeyMemory, ChapterMemory)) and m.cfg.sparse_grad:
            m.cfg = dataclasses.replace(m.cfg, sparse_grad=False)


class FullFinetuner:
    def __init__(self, model: nn.Module, cfg: FullFTConfig, loss_fn: LossFn = causal_lm_loss):
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        dense_value_grads(model)
        self.params = full_ft_parameters(model, cfg.train_embeddings)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)

    def step(self, batch: dict) -> dict:
        return dense_step(self.model, batch, self.loss_fn, self.params, self.opt, self.cfg.max_grad_norm)


@dataclass
class LoraParams:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = number(2e-4, low=0, open_low=True)  # the prototypes: 2e-4 / 5e-5
    weight_decay: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    include_memory: bool = False  # also adapt the memory's query / gate / out_proj
    max_grad_norm: float | None = None


def lora_target_modules(model: nn.Module, targets: list[str], include_memory: bool) -> list[str]:
    """Full names of the nn.Linear modules to adapt: last name in targets, outside the memory
    layers (plus the memory's own Linear layers when include_memory)."""
    mem_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, (ProductKeyMemory, ChapterMemory))]
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_memory = any(name.startswith(p) for p in mem_prefixes)
        if (leaf in targets and not in_memory) or (include_memory and in_memory and leaf in MEMORY_LINEARS):
            names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in {type(model).__name__}")
    return names


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap model (in place: its Linear layers are replaced) in a peft LoRA model; only A, B train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    return get_peft_model(model, cfg)


def save_adapter(peft_model, path: str | Path, base_model: str | None = None) -> Path:
    """peft's save_pretrained: the adapter weights and config (not the base model) into `path`;
    base_model (e.g. the checkpoint directory) is recorded as the config's base_model_name_or_path."""
    if base_model is not None:
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = str(base_model)
    # LoRA never trains the embeddings; "auto" would read the base's config.json to compare vocabularies
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    return Path(path)


class LoraFinetuner:
    def __init__(self, model: nn.Module, cfg: LoraParams, loss_fn: LossFn = causal_lm_loss):
        self.cfg, self.loss_fn = cfg, loss_fn
        self.target_modules = lora_target_modules(model, cfg.targets, cfg.include_memory)
        self.model = add_lora(model, cfg.r, cfg.alpha, cfg.dropout, self.target_modules)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, batch: dict) -> dict:
        return dense_step(self.model, batch, self.loss_fn, self.params, self.opt, self.cfg.max_grad_norm)

    def save_adapter(self, path: str | Path, base_model: str | None = None) -> Path:
        return save_adapter(self.model, path, base_model)
