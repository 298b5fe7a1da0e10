"""The value pool sharded by column over the ranks of a process group (Memory Layers at Scale's Shard(1)).

Every rank holds all N rows but only its columns [c0, c1) of the (N, D) table; the split follows
torch.chunk (the DTensor Shard(1) layout: ceil(D / W) columns per rank, the last ranks fewer), so
a pool is a DTensor shard as is when checkpoints are written (dist_checkpoint). Each rank keeps
its own tokens (data parallel); a read of T_r tokens on rank r:

    ids, weights (T_r, H, knn)          from the product-key top-k on the rank's own tokens
    all-gather ids (int32), weights     -> (T, H, knn), T = sum_r T_r, in rank order
    local weighted bag                  values[:, c0:c1] -> (T, D_r) for every token
    all-to-all                          rank r sends rows of rank s to s -> (T_r, D), columns in rank order

Backward (autograd of the same collectives): the output gradients go back by all-to-all, the
weighted bag's backward writes the value gradient of the rank's own columns (it never leaves the
rank), and the weight gradients' per-column partial sums are reduce-scattered to the token's rank.

Gradient convention: as with DDP, each rank's loss is its own tokens' loss and the trainer averages
over ranks; the value gradient of the columns sums over the losses of all ranks, so it is scaled by
1 / W here. Per step and pool read, rank r sends (ring all-gather, pairwise all-to-all):
(W-1) T_r H knn (4 + w) bytes for ids and weights (w: the value dtype's size), the same
(W-1) T_r H knn w for the weight gradients, and sum_{s != r} T_s D_r w bytes of outputs and the
same of output gradients. docs/distributed.md works this out at the paper's scale.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from slotwise import kernels
from slotwise.memory import ValuePool
from slotwise.retrofit import memory_layers


def column_range(dim: int, world: int, rank: int) -> tuple[int, int]:
    """Columns [start, stop) of rank `rank` when `dim` columns are split over `world` ranks (torch.chunk)."""
    size = -(-dim // world)
    start = min(rank * size, dim)
    return start, min(start + size, dim)


def column_widths(dim: int, world: int) -> list[int]:
    widths = [b - a for a, b in (column_range(dim, world, r) for r in range(world))]
    if min(widths) == 0:
        raise ValueError(f"a value pool of width {dim} cannot be split by column over {world} ranks "
                         f"(torch.chunk leaves rank {widths.index(0)} no columns); use fewer ranks")
    return widths


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (dense or sparse)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _ScaledSink:
    """A DeferredBagGrads that records grad_out * scale (the deferred twin of _ScaleGrad: only the values'
    gradient is scaled, the weights' gradient the bag hands back is not)."""

    def __init__(self, sink: kernels.DeferredBagGrads, scale: float):
        self.sink, self.scale = sink, scale

    def add(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.sink.add(ids, weights, grad_out * self.scale)


class ShardedValuePool(nn.Module):
    """This rank's columns of an (N, D) value pool: weight (N, D_r); reads need every rank (collectives)."""

    def __init__(self, local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.dim = dim
        self.widths = column_widths(dim, self.world)
        self.col_start, self.col_stop = column_range(dim, self.world, self.rank)
        if local.shape[1] != self.col_stop - self.col_start:
            raise ValueError(f"rank {self.rank} holds columns [{self.col_start}, {self.col_stop}) of {dim}, "
                             f"got a local shard of width {local.shape[1]}")
        self.weight = nn.Parameter(local)

    @classmethod
    def from_pool(cls, pool: ValuePool, group: dist.ProcessGroup | None = None) -> "ShardedValuePool":
        """Keep this rank's columns of a full pool (every rank holds the same pool, e.g. the same checkpoint)."""
        g = group if group is not None else dist.group.WORLD
        a, b = column_range(pool.weight.shape[1], dist.get_world_size(g), dist.get_rank(g))
        local = pool.weight.detach()[:, a:b].clone().contiguous()
        sharded = cls(local, pool.weight.shape[1], g)
        sharded.weight.requires_grad_(pool.weight.requires_grad)
        return sharded

    def __deepcopy__(self, memo) -> "ShardedValuePool":
        """A copy of the shard in the same process group (a process group itself is not copyable)."""
        new = ShardedValuePool(self.weight.detach().clone(), self.dim, self.group)
        new.weight.requires_grad_(self.weight.requires_grad)
        memo[id(self)] = new
        return new

    @property
    def n_slots(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"n_slots={self.n_slots}, dim={self.dim}, columns=[{self.col_start}, {self.col_stop}), world={self.world}"

    def _token_counts(self, n: int) -> list[int]:
        t = torch.tensor([n], dtype=torch.int64, device=self.weight.device)
        return funcol.all_gather_single(t, 0, self.group).tolist()

    def bag(self, ids: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = False,
            defer: kernels.DeferredBagGrads | None = None) -> torch.Tensor:
        """ids, weights (T_r, H, knn) of this rank's tokens -> (T_r, D): the same as ValuePool.bag on the full pool.
        defer: record (every rank's ids and weights, the output gradient of this rank's columns, scaled
        by 1 / W as the gradient would be) there for a fused step on this rank's columns."""
        T = ids.shape[0]
        sizes = self._token_counts(T)  # T_s of every rank
        tmax = max(sizes)
        w = weights.to(self.weight.dtype)
        ids32 = ids.to(torch.int32)
        if T < tmax:  # all-gather wants equal shapes: pad, and drop the padding after
            ids32 = torch.cat([ids32, ids32.new_zeros(tmax - T, *ids.shape[1:])])
            w = torch.cat([w, w.new_zeros(tmax - T, *w.shape[1:])])
        ids_all = funcol.all_gather_single(ids32.contiguous(), 0, self.group)  # (W * tmax, H, knn) int32
        w_all = funcol.all_gather_single_autograd(w.contiguous(), 0, self.group)  # backward: reduce-scatter
        if min(sizes) < tmax:
            keep = torch.cat([torch.arange(s * tmax, s * tmax + n, device=ids.device) for s, n in enumerate(sizes)])
            ids_all, w_all = ids_all[keep], w_all[keep]  # (T_all, H, knn)
        if defer is not None:
            sink = _ScaledSink(defer, 1.0 / self.world) if self.world > 1 else defer
            y_cols = kernels.weighted_bag(self.weight, ids_all.long(), w_all, defer=sink)  # (T_all, D_r)
        else:
            values = _ScaleGrad.apply(self.weight, 1.0 / self.world) if self.world > 1 else self.weight
            y_cols = kernels.weighted_bag(values, ids_all.long(), w_all, sparse_grad=sparse_grad)  # (T_all, D_r)
        width = self.col_stop - self.col_start
        recv = funcol.all_to_all_single_autograd(
            y_cols.reshape(-1), [T * d for d in self.widths], [n * width for n in sizes], self.group)
        parts = recv.split([T * d for d in self.widths])
        return torch.cat([p.view(T, d) for p, d in zip(parts, self.widths)], dim=1)  # (T_r, D)

    def token_mean(self, mean: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """This rank's mean over n_tokens tokens -> the mean over every rank's tokens (differentiable;
        the same value on every rank)."""
        flat = torch.cat([(mean * n_tokens).reshape(-1), mean.new_tensor([float(n_tokens)])])
        total = funcol.all_gather_single_autograd(flat.unsqueeze(0), 0, self.group).sum(0)  # (numel + 1,)
        return (total[:-1] / total[-1]).view_as(mean)


def sharded_pools(model: nn.Module) -> list[ShardedValuePool]:
    """The distinct sharded pools of the model's memory layers, in layer order."""
    out, seen = [], set()
    for mem in memory_layers(model).values():
        if isinstance(mem.values, ShardedValuePool) and id(mem.values) not in seen:
            seen.add(id(mem.values))
            out.append(mem.values)
    return out


def shard_value_pools(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[ShardedValuePool]:
    """In place: every memory layer's value pool becomes this rank's columns of it (a pool shared by
    several layers stays shared). Every rank must hold the same full pools when this is called."""
    by_id: dict[int, ShardedValuePool] = {}
    for mem in memory_layers(model).values():
        if isinstance(mem.values, ShardedValuePool):
            continue
        key = id(mem.values)
        if key not in by_id:
            by_id[key] = ShardedValuePool.from_pool(mem.values, group)
        mem.values = by_id[key]
    return sharded_pools(model)


@torch.no_grad()
def gather_rows(pool: ShardedValuePool, rows: torch.Tensor, dst: int = 0,
                block_rows: int = 1 << 16) -> torch.Tensor | None:
    """The full-width rows `rows` (R,) of a sharded pool -> (R, D) on rank dst, None elsewhere.

    Every rank passes the same rows; blocks of block_rows rows bound the memory on dst."""
    wmax = max(pool.widths)
    width = pool.col_stop - pool.col_start
    is_dst = pool.rank == dst
    out = pool.weight.new_empty(rows.numel(), pool.dim) if is_dst else None
    for i in range(0, rows.numel(), block_rows):
        blk = rows[i:i + block_rows].to(pool.weight.device)
        local = pool.weight.new_zeros(blk.numel(), wmax)
        local[:, :width] = pool.weight[blk]
        parts = [torch.empty_like(local) for _ in range(pool.world)] if is_dst else None
        dist.gather(local, parts, group=pool.group, group_dst=dst)
        if is_dst:
            out[i:i + blk.numel()] = torch.cat([p[:, :d] for p, d in zip(parts, pool.widths)], dim=1)
    return out


def unshard_value_pools(model: nn.Module, dst: int = 0) -> None:
    """In place on rank dst: every sharded pool becomes a full ValuePool again, gathered from all ranks
    (a shared pool stays shared). The other ranks only send and keep their shards."""
    full: dict[int, ValuePool] = {}
    for pool in sharded_pools(model):
        weight = gather_rows(pool, torch.arange(pool.n_slots), dst)
        if weight is not None:
            vp = ValuePool(1, 1)
            vp.weight = nn.Parameter(weight, requires_grad=pool.weight.requires_grad)
            full[id(pool)] = vp
    for mem in memory_layers(model).values():
        if id(mem.values) in full:
            mem.values = full[id(mem.values)]
