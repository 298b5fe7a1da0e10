"""Optimizer groups, built by a function from the model's parts (nothing discovered from tags).

    values    memory value pools: SparseAdam when the memory has sparse gradients (a ~1M-row
              pool would make a dense Adam step touch every row; fused with the pool's backward
              when fused_update selects it, slotwise.fused_update), else Adam
    memory    keys, query projection and norm, gate (W1), output projection (W2): AdamW
    base      the pretrained model's own weights, only when trainable == "all": AdamW
Each group has its own learning rate; all share one warmup + cosine schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from slotwise import kernels
from slotwise.fused_update import FusedSparseAdam
from slotwise.retrofit import memory_layers, memory_parameters
from slotwise.schema import Choice, FusedUpdate, at_least, constrained, number


class Schedule(Choice):
    cosine = "cosine"  # warmup, then cosine decay to min_lr_ratio
    constant = "constant"  # warmup, then constant



@dataclass
class OptimParams:
    lr_values: float = number(2e-3, low=0, open_low=True)
    lr_memory: float = number(1e-3, low=0, open_low=True)
    lr_base: float = number(1e-5, low=0, open_low=True)
    weight_decay: float = number(0.0, low=0)
    betas: list[float] = constrained(rule=lambda v, _: None if len(v) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in v)
                                     else f"expected two numbers in [0, 1), got {list(v)}", default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = at_least(0, 10, "an integer >= 0")
    schedule: Schedule = Schedule.cosine
    min_lr_ratio: float = number(0.1, low=0, high=1)
    grad_clip: float = number(1.0, low=0)  # on the dense parameters; 0 disables
    # sparse value pools (memory.sparse_grad): SparseAdam fused with the pool's backward, one step per
    # pool after loss.backward() (auto: on CUDA; the CPU reference is no faster there)
    fused_update: FusedUpdate = FusedUpdate.auto


def trainable_groups(model, trainable: str) -> dict[str, list[torch.nn.Parameter]]:
    """{"values": [...], "memory": [...], "base": [...]}; sets requires_grad accordingly."""
    mem = memory_parameters(model) if memory_layers(model) else {"values": [], "other": []}
    mem_ids = {id(p) for ps in mem.values() for p in ps}
    base = [p for p in model.parameters() if id(p) not in mem_ids]
    if trainable not in ("memory", "all"):
        raise ValueError(f"train.trainable must be 'memory' or 'all', got {trainable!r}")
    if trainable == "memory" and not mem_ids:
        raise ValueError("train.trainable=memory but the model has no memory layers")
    for p in base:
        p.requires_grad_(trainable == "all")
    for ps in mem.values():
        for q in ps:
            q.requires_grad_(True)
    return {"values": mem["values"], "memory": mem["other"], "base": base if trainable == "all" else []}


def build_optimizers(model, groups: dict[str, list[torch.nn.Parameter]], p: OptimParams,
                     sinks: dict[int, kernels.DeferredBagGrads] | None = None) -> dict[str, torch.optim.Optimizer]:
    """sinks: the pools' recorders when the sparse pools take the fused path (fused_update.pool_sinks)."""
    betas = tuple(p.betas)
    sparse = any(m.cfg.sparse_grad for m in memory_layers(model).values())
    opts: dict[str, torch.optim.Optimizer] = {}
    if groups["values"]:
        if sparse and sinks is not None:
            opts["values"] = FusedSparseAdam(groups["values"], sinks, lr=p.lr_values, betas=betas)
        elif sparse:
            opts["values"] = torch.optim.SparseAdam(groups["values"], lr=p.lr_values, betas=betas)
        else:
            opts["values"] = torch.optim.Adam(groups["values"], lr=p.lr_values, betas=betas)
    if groups["memory"]:
        opts["memory"] = torch.optim.AdamW(groups["memory"], lr=p.lr_memory, betas=betas, weight_decay=p.weight_decay)
    if groups["base"]:
        opts["base"] = torch.optim.AdamW(groups["base"], lr=p.lr_base, betas=betas, weight_decay=p.weight_decay)
    return opts


def lr_factor(step: int, max_steps: int, p: OptimParams) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio (or constant)."""
    if p.warmup_steps and step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    if p.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - p.warmup_steps) / max(1, max_steps - p.warmup_steps))
    return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(opts: dict[str, torch.optim.Optimizer], max_steps: int, p: OptimParams):
    return {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, max_steps, p)) for k, o in opts.items()}
