"""Sparse memory finetuning on column-sharded value pools: the same rows, the same update, per column.

    smf = ShardedSMF(model, backgrounds, SMFConfig(top_t=500), dist)   # pools already sharded
    out = smf.step(batch)         # the global batch on every rank; each rank runs its rows
    delta = extract_delta_sharded(base, model, dist)                    # on rank 0, None elsewhere

One step, with W ranks:
    forward on this rank's rows              each memory layer reads through the sharded pool
    loss                                     sum over this rank's scored tokens * W / (tokens of
                                             all ranks): the ranks' mean is the global token mean
    counts (N,) per pool                     this rank's tokens, then all-reduced (int64, exact):
                                             every rank scores and selects the same rows R
    backward                                 each rank gets the gradient of its own columns
    update                                   SparseMemoryFinetuner.update: rows R of the local
                                             columns, with the local columns' Adam state

So the selected rows are exactly the single-process rows, and the new rows equal the
single-process ones up to float summation order. The delta gathers the chosen rows' columns on
rank 0; its base and new hashes are those of the unsharded models (dist_checkpoint).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slotwise.continual.delta import PoolDelta, SparseDelta
from slotwise.continual.pools import value_pools
from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner, count_mask
from slotwise.distributed.checkpoint import sharded_state_hash
from slotwise.distributed import Dist
from slotwise.errors import DeltaError
from slotwise.retrofit import record_lookups
from slotwise.distributed.memory import ShardedValuePool, gather_rows


def rank_mean_loss(logits: torch.Tensor, labels: torch.Tensor, d: Dist) -> tuple[torch.Tensor, float]:
    """Shifted causal-LM loss of this rank's rows, scaled so that the mean over ranks is the mean over
    every scored token of the global batch -> (this rank's loss, the global mean as a float)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B_r * (S-1), V)
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    local = torch.stack([total.detach().double(), (shift_labels != -100).sum().double()])  # on the logits' device (NCCL)
    dist.all_reduce(local, group=d.group)
    global_sum, count = local.tolist()
    return total * d.world / max(count, 1.0), global_sum / max(count, 1.0)


class ShardedSMF:
    """SparseMemoryFinetuner on a model whose value pools are ShardedValuePools (shard_value_pools)."""

    def __init__(self, model: nn.Module, backgrounds: dict[int, Background] | None, cfg: SMFConfig, d: Dist):
        self.smf = SparseMemoryFinetuner(model, backgrounds, cfg)  # Adam state: (N, D_r) per pool
        self.model, self.cfg, self.dist = model, cfg, d
        if not all(isinstance(m, ShardedValuePool) for m in _pool_modules(model)):
            raise ValueError("ShardedSMF needs column-sharded value pools (slotwise.distributed.memory.shard_value_pools)")

    def step(self, batch: dict) -> dict:
        d, smf = self.dist, self.smf
        if batch["input_ids"].shape[0] < d.world:
            raise ValueError(f"an SMF batch of {batch['input_ids'].shape[0]} rows cannot be split over {d.world} ranks")
        local = d.shard_batch(batch)
        for pool in smf.pools:
            pool.weight.grad = None
        with record_lookups(self.model) as lookups, smf.reading():
            out = self.model(input_ids=local["input_ids"], attention_mask=local.get("attention_mask"))
        loss, global_loss = rank_mean_loss(out.logits, local["labels"], d)
        counts = smf.pool_counts(lookups, count_mask(local, self.cfg.count_on))
        for c in counts.values():
            dist.all_reduce(c, group=d.group)  # int64: exact, the same on every rank
        chosen = smf.select(counts)
        loss.backward()
        smf.update_rows(chosen)
        by_layer = {pool.layers[0]: chosen[pool.name] for pool in smf.pools}
        return {"loss": global_loss, "n_selected": {k: int(v.numel()) for k, v in by_layer.items()}, "selected": by_layer}


def _pool_modules(model: nn.Module) -> list[nn.Module]:
    from slotwise.retrofit import memory_layers

    return [m.values for m in memory_layers(model).values()]


@torch.no_grad()
def extract_delta_sharded(base: nn.Module, updated: nn.Module, meta: dict | None = None,
                          keep_old: bool = False) -> SparseDelta | None:
    """delta.extract_delta for two column-sharded models (every rank calls it) -> the delta on rank 0
    (None elsewhere), equal to the one extract_delta makes from the same models unsharded."""
    base_pools = {p.name: p for p in value_pools(base)}
    upd_pools = {p.name: p for p in value_pools(updated)}
    if base_pools.keys() != upd_pools.keys():
        raise DeltaError(f"the models have different value pools: {sorted(base_pools)} vs {sorted(upd_pools)}")
    ptrs = {p.weight.data_ptr() for p in (*base_pools.values(), *upd_pools.values())}
    base_sd, upd_sd = base.state_dict(), updated.state_dict()
    for name, t in base_sd.items():
        u = upd_sd[name]
        if t.data_ptr() in ptrs or u.data_ptr() in ptrs:
            continue
        if t.shape != u.shape or t.dtype != u.dtype or not torch.equal(t, u):
            raise DeltaError(f"{name} differs between the models; a sparse delta holds value rows only")
    by_weight = {id(m.weight): m for m in _pool_modules(updated)}
    by_weight_base = {id(m.weight): m for m in _pool_modules(base)}
    pools = {}
    for name, bp in base_pools.items():
        b, u = bp.weight.detach(), upd_pools[name].weight.detach()
        changed = (b.view(torch.uint8) != u.view(torch.uint8)).any(dim=1).to(torch.int32)  # (N,) this rank's columns
        dist.all_reduce(changed, op=dist.ReduceOp.MAX)
        rows = changed.nonzero().squeeze(1).cpu()  # (R,) ascending, the same on every rank
        new = gather_rows(by_weight[id(upd_pools[name].weight)], rows)
        old = gather_rows(by_weight_base[id(bp.weight)], rows) if keep_old else None
        if new is not None:
            pools[name] = PoolDelta(rows, new.cpu(), None if old is None else old.cpu(), b.shape[0])
    base_hash, new_hash = sharded_state_hash(base), sharded_state_hash(updated)
    if dist.get_rank() != 0:
        return None
    return SparseDelta(base_hash, new_hash, pools, dict(meta or {}))
