"""Weighted embedding bag, the Triton kernels (spec: weighted_bag_reference).

Forward: one program per (token, D-block) gathers the token's H*knn value rows a tile of
BLOCK_K rows at a time and accumulates weight * row in fp32; any D (masked blocks).

Backward, two ways to get the value-row gradients:
  * sorted segments (deterministic): the flat ids are sorted once (stable), each unique row
    owns one contiguous segment of (token, weight) pairs and one program sums them in a fixed
    order. Writes sparse (unique ids, row grads) or scatters into a dense buffer; no atomics.
  * atomics (dense only): one program per (token, k-block) adds weight * grad_out[t] into the
    dense fp32 buffer with tl.atomic_add, fused with the grad-weights dot products.
Grad weights: grad_w[t, h, k] = values[ids[t, h, k]] . grad_out[t], one program per (token, k-block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_K rows, BLOCK_D columns) per tile: ~4K elements, wide along D for coalescing."""
    block_d = min(triton.next_power_of_2(D), 512)
    return max(4096 // block_d, 4), block_d


# ----------------------------------------------------------------------------- forward


@triton.jit
def _bag_fwd_kernel(values_ptr, ids_ptr, w_ptr, out_ptr, D, HK, stride_v,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(0, HK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < HK
        row = tl.load(ids_ptr + t * HK + k, mask=k_mask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * HK + k, mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + row[:, None] * stride_v + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + t.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def weighted_bag_forward_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D) in values' dtype."""
    T = ids.shape[0]
    HK = ids[0].numel()
    D = values.shape[1]
    values, ids, weights = _prep(values, ids, weights)
    out = _alloc.empty((T, D), values.dtype, values.device)
    BLOCK_K, BLOCK_D = _blocks(D)
    _bag_fwd_kernel[(T, triton.cdiv(D, BLOCK_D))](values, ids, weights, out, D, HK, values.stride(0),
                                                  BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4)
    return out


def _prep(values, ids, weights):
    if values.stride(1) != 1:
        values = values.contiguous()
    return values, ids.contiguous(), weights.contiguous()


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bag_bwd_tokens_kernel(values_ptr, ids_ptr, w_ptr, g_ptr, gw_ptr, dense_ptr, D, HK, stride_v, stride_dense,
                           ATOMIC_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_w for BLOCK_K of token t's slots; with ATOMIC_ROWS also dense[row] += w * grad_out[t]."""
    t = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < HK
    row = tl.load(ids_ptr + t * HK + k, mask=k_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + t * HK + k, mask=k_mask, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        m2 = k_mask[:, None] & d_mask[None, :]
        g = tl.load(g_ptr + t.to(tl.int64) * D + d, mask=d_mask, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + row[:, None] * stride_v + d[None, :], mask=m2, other=0.0).to(tl.float32)
        gw += tl.sum(v * g[None, :], axis=1)
        if ATOMIC_ROWS:
            tl.atomic_add(dense_ptr + row[:, None] * stride_dense + d[None, :], w[:, None] * g[None, :], mask=m2)
    tl.store(gw_ptr + t * HK + k, gw, mask=k_mask)


@triton.jit
def _segment_grad(g_ptr, w_ptr, perm_ptr, start, end, HK, D, d, d_mask, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum over the sorted segment [start, end) of weight * grad_out[token] on columns d -> (BLOCK_D,) fp32.

    Shared with the fused backward + optimizer kernels (sparse_update.py).
    """
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < end
        pos = tl.load(perm_ptr + s, mask=s_mask, other=0)  # flat (t, h, k) position
        w = tl.load(w_ptr + pos, mask=s_mask, other=0.0).to(tl.float32)
        tok = pos // HK
        g = tl.load(g_ptr + tok[:, None] * D + d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32) * w[:, None], axis=0)
    return acc


@triton.jit
def _bag_bwd_rows_kernel(g_ptr, w_ptr, perm_ptr, seg_ptr, uniq_ptr, out_ptr, D, HK, stride_out,
                         DENSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row grad of unique row u on one D-block; DENSE: out[uniq[u]] += grad, else out[u] = grad."""
    u = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = _segment_grad(g_ptr, w_ptr, perm_ptr, start, end, HK, D, d, d_mask, BLOCK_S, BLOCK_D)
    if DENSE:
        dst = out_ptr + tl.load(uniq_ptr + u).to(tl.int64) * stride_out + d
        acc += tl.load(dst, mask=d_mask, other=0.0)  # one program per row: no race
    else:
        dst = out_ptr + u.to(tl.int64) * stride_out + d
    tl.store(dst, acc, mask=d_mask)


def sort_segments(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat ids -> unique row ids (U,), perm (M,) flat positions grouped by row, segment starts (U + 1,)."""
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)  # stable: a fixed summation order per row
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    seg = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=seg[1:])
    return uniq, perm, seg


def _grad_weights(values, ids, weights, grad_out, dense=None):
    T, HK, D = ids.shape[0], ids[0].numel(), values.shape[1]
    grad_w = _alloc.empty(ids.shape, torch.float32, values.device)
    BLOCK_K, BLOCK_D = _blocks(D)
    BLOCK_K = min(BLOCK_K, max(triton.next_power_of_2(HK), 1))
    _bag_bwd_tokens_kernel[(T, triton.cdiv(HK, BLOCK_K))](
        values, ids, weights, grad_out, grad_w, dense if dense is not None else grad_w, D, HK, values.stride(0),
        dense.stride(0) if dense is not None else 0, ATOMIC_ROWS=dense is not None,
        BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4)
    return grad_w


def _segment_rows(grad_out, weights, perm, seg, uniq, out, D, HK, dense: bool):
    BLOCK_S, BLOCK_D = _blocks(D)
    _bag_bwd_rows_kernel[(uniq.numel(), triton.cdiv(D, BLOCK_D))](
        grad_out, weights, perm, seg, uniq, out, D, HK, out.stride(0),
        DENSE=dense, BLOCK_S=min(BLOCK_S, 16), BLOCK_D=BLOCK_D, num_warps=4)


def weighted_bag_backward_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                 grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse, deterministic backward -> (unique row ids (U,), row grads (U, D) fp32, grad weights (T, H, knn) fp32).

    Same contract as weighted_bag_reference.weighted_bag_backward_reference.
    """
    values, ids, weights = _prep(values, ids, weights)
    grad_out = grad_out.contiguous()
    HK, D = ids[0].numel(), values.shape[1]
    uniq, perm, seg = sort_segments(ids)
    rows = _alloc.empty((uniq.numel(), D), torch.float32, values.device)
    _segment_rows(grad_out, weights, perm, seg, uniq, rows, D, HK, dense=False)
    return uniq, rows, _grad_weights(values, ids, weights, grad_out)


def weighted_bag_backward_dense_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                       grad_out: torch.Tensor, out: torch.Tensor | None = None,
                                       deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward into a dense fp32 buffer -> (grad values (N, D) fp32, grad weights (T, H, knn) fp32).

    out: an (N, D) fp32 buffer to accumulate into (a new zeroed one when None).
    deterministic: sorted segments (bitwise reproducible) instead of atomic adds.
    """
    values, ids, weights = _prep(values, ids, weights)
    grad_out = grad_out.contiguous()
    HK, D = ids[0].numel(), values.shape[1]
    if out is None:
        out = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    if out.dtype != torch.float32 or out.shape != values.shape or out.stride(1) != 1:
        raise ValueError(f"out must be an fp32 {tuple(values.shape)} buffer with unit column stride")
    if not deterministic:
        return out, _grad_weights(values, ids, weights, grad_out, dense=out)
    uniq, perm, seg = sort_segments(ids)
    _segment_rows(grad_out, weights, perm, seg, uniq, out, D, HK, dense=True)
    return out, _grad_weights(values, ids, weights, grad_out)


# ----------------------------------------------------------------------------- autograd


class _WeightedBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, ids, weights, sparse_grad: bool, deterministic: bool):
        ctx.save_for_backward(values, ids, weights)
        ctx.sparse_grad, ctx.deterministic = sparse_grad, deterministic
        return weighted_bag_forward_triton(values, ids, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, ids, weights = ctx.saved_tensors
        need_values, _, need_weights = ctx.needs_input_grad[:3]
        grad_values = grad_w = None
        if need_values and ctx.sparse_grad:
            uniq, rows, grad_w = weighted_bag_backward_triton(values, ids, weights, grad_out)
            # sorted unique indices: already coalesced, so the optimizer needs no extra pass
            grad_values = torch.sparse_coo_tensor(uniq.unsqueeze(0), rows.to(values.dtype), values.shape,
                                                  is_coalesced=True, check_invariants=False)
        elif need_values:
            dense, grad_w = weighted_bag_backward_dense_triton(values, ids, weights, grad_out,
                                                               deterministic=ctx.deterministic)
            grad_values = dense.to(values.dtype)
        elif need_weights:
            grad_w = _grad_weights(*_prep(values, ids, weights), grad_out.contiguous())
        if need_weights:
            grad_w = grad_w.to(weights.dtype)
        else:
            grad_w = None
        return grad_values, None, grad_w, None, None


def weighted_bag_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        sparse_grad: bool = False, deterministic: bool = False) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D); differentiable in values and weights.

    sparse_grad: values.grad is a coalesced sparse COO tensor of the touched rows (sorted-segment
    kernel, deterministic) instead of a dense (N, D) tensor. deterministic: for the dense gradient,
    use sorted segments instead of atomic adds.
    """
    return _WeightedBag.apply(values, ids, weights, sparse_grad, deterministic)
