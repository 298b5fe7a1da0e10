"""Bytes each rank sends per memory read (forward + backward), for three ways to spread a value pool.

    from slotwise.distributed.exchange_bytes import Scale, column_sharded, row_sharded, replicated
    paper = Scale(world=8, tokens=8192, heads=4, knn=32, dim=1024, n_slots=1 << 20)
    sum(column_sharded(paper).values()) / 1e6      # MB per rank and memory read

Scale.tokens is per rank. A rank sends, with ring all-gather / reduce-scatter and pairwise
all-to-all (what NCCL does; gloo's reduce-scatter is an all-reduce, twice the ring's bytes, so
backend="gloo" models what tests/distributed measures on gloo):

column (this project, slotwise.distributed.memory; D_r = this rank's columns):
    counts      all-gather of each rank's token count              (W-1) * 8
    ids         all-gather, int32                                  (W-1) T H knn 4
    weights     all-gather, in the value dtype                     (W-1) T H knn w
    outputs     all-to-all: T tokens of each other rank, D_r cols  (W-1) T D_r v
    out grads   all-to-all: own T tokens, the others' columns      T (D - D_r) v
    w grads     reduce-scatter of per-column partial sums          (W-1) T H knn w   (gloo: twice)
    (training adds the balancing loss's all-gather of H * 2 * n_keys means: kilobytes)
row (each rank owns N/W rows, all D columns):
    lookups     all-to-all of (id, weight) to the row owner        (W-1)/W T H knn (4 + w)
    partials    pooled partial sums back, one D-row per (token, owner) that it reads from;
                with H * knn reads per token over W owners nearly every pair occurs:
                                                                   (W-1) T D v * (1 - (1 - 1/W)^(H knn))
    out grads   the same rows of output gradient to each owner     as partials
    w grads     back to the token's rank                           (W-1)/W T H knn w
replicated (data parallel, the pool on every rank):
    dense       ring all-reduce of the (N, D) value gradient        2 (W-1)/W N D g
    sparse      all-gather of the rows a rank touched (ids + rows)  (W-1) U (8 + D g),
                U = N (1 - exp(-T H knn / N)) distinct rows of T H knn uniform reads
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from slotwise.distributed.memory import column_range


@dataclass(frozen=True)
class Scale:
    world: int  # W ranks
    tokens: int  # T tokens per rank and step
    heads: int  # H
    knn: int  # slots read per head and token
    dim: int  # D, the value width
    n_slots: int  # N
    value_bytes: int = 2  # v: pooled outputs and their gradients (bf16)
    weight_bytes: int = 2  # w: softmax weights and their gradients (cast to the value dtype)
    grad_bytes: int = 4  # g: a dense value gradient (fp32 master weights)

    @property
    def reads(self) -> int:
        return self.tokens * self.heads * self.knn


def column_sharded(s: Scale, rank: int = 0, backend: str = "ring") -> dict[str, float]:
    """Bytes rank `rank` sends per memory read (forward + backward), by collective."""
    W, T = s.world, s.tokens
    a, b = column_range(s.dim, W, rank)
    d_r = b - a
    rs = 2 if backend == "gloo" else 1
    return {
        "counts": (W - 1) * 8,
        "ids": (W - 1) * s.reads * 4,
        "weights": (W - 1) * s.reads * s.weight_bytes,
        "outputs": (W - 1) * T * d_r * s.value_bytes,
        "output_grads": T * (s.dim - d_r) * s.value_bytes,
        "weight_grads": rs * (W - 1) * s.reads * s.weight_bytes,
    }


def row_sharded(s: Scale) -> dict[str, float]:
    W, T = s.world, s.tokens
    hit = 1 - (1 - 1 / W) ** (s.heads * s.knn)  # P(a token reads at least one row of a given owner)
    partials = (W - 1) * T * s.dim * s.value_bytes * hit
    return {
        "lookups": (W - 1) / W * s.reads * (4 + s.weight_bytes),
        "partials": partials,
        "output_grads": partials,
        "weight_grads": (W - 1) / W * s.reads * s.weight_bytes,
    }


def replicated(s: Scale, sparse: bool = False) -> dict[str, float]:
    W = s.world
    if not sparse:
        return {"value_grad_allreduce": 2 * (W - 1) / W * s.n_slots * s.dim * s.grad_bytes}
    touched = s.n_slots * (1 - math.exp(-s.reads / s.n_slots))
    return {"touched_rows_allgather": (W - 1) * touched * (8 + s.dim * s.grad_bytes)}
