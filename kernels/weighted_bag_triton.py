"""Weighted embedding bag, the Triton kernels (spec: weighted_bag_reference).

Forward: one program per token over the whole row. The row is two power-of-two slices
(576 = 512 + 64, _segments.row_pieces), so no lane computes a column past D by more than one
slice's rounding; the token's H*knn ids and weights are read once; each step gathers BLOCK_K rows
into a 2-D fp32 accumulator that is reduced once at the end (no cross-warp sum per step), and the
loop is software-pipelined (tl.range num_stages), so several steps' gathers are in flight.

Backward (_segments.walk): the flat ids are sorted once on the device; each run of equal ids is
walked by one program that loads the values row once, takes the grad weights from the same
grad_out loads, and writes the row's gradient sparse (unique ids, rows) or into a dense fp32 buffer;
long runs are split across programs with a fixed-order combine. Deterministic, no atomics.
Grad weights alone (values frozen): a per-token kernel shaped like the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _alloc
from ._row_update import DENSE, SPARSE
from ._segments import row_pieces, run_index, sort_runs, walk


def forward_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_K rows per step, num_warps, num_stages) for rows of width D; fit to ~64 registers a thread."""
    w0, _ = row_pieces(D)
    num_warps = 1 if w0 <= 128 else 2 if w0 <= 256 else 4
    return (8 if w0 <= 512 else 4), num_warps, 3


@triton.jit
def _bag_fwd_kernel(values_ptr, ids_ptr, w_ptr, out_ptr, D, stride_v,
                    HK: tl.constexpr, BLOCK_K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                    NUM_STAGES: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c0 = tl.arange(0, W0)
    c1 = W0 + tl.arange(0, W1)
    cm1 = c1 < D
    acc0 = tl.zeros([BLOCK_K, W0], tl.float32)
    acc1 = tl.zeros([BLOCK_K, W1], tl.float32)
    for k0 in tl.range(0, HK, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < HK
        row = tl.load(ids_ptr + t * HK + k, mask=km, other=0).to(tl.int64)
        wt = tl.load(w_ptr + t * HK + k, mask=km, other=0.0).to(tl.float32)
        src = values_ptr + row[:, None] * stride_v
        acc0 += wt[:, None] * tl.load(src + c0[None, :], mask=km[:, None], other=0.0).to(tl.float32)
        acc1 += wt[:, None] * tl.load(src + c1[None, :], mask=km[:, None] & cm1[None, :], other=0.0).to(tl.float32)
    dst = out_ptr + t * D
    tl.store(dst + c0, tl.sum(acc0, 0).to(out_ptr.dtype.element_ty))
    tl.store(dst + c1, tl.sum(acc1, 0).to(out_ptr.dtype.element_ty), mask=cm1)


@triton.jit
def _bag_grad_w_kernel(values_ptr, ids_ptr, g_ptr, gw_ptr, D, stride_v,
                       HK: tl.constexpr, BLOCK_K: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                       NUM_STAGES: tl.constexpr):
    """grad_w[t, k] = values[ids[t, k]] . grad_out[t] for one token (values need no gradient)."""
    t = tl.program_id(0).to(tl.int64)
    c0 = tl.arange(0, W0)
    c1 = W0 + tl.arange(0, W1)
    cm1 = c1 < D
    g0 = tl.load(g_ptr + t * D + c0).to(tl.float32)
    g1 = tl.load(g_ptr + t * D + c1, mask=cm1, other=0.0).to(tl.float32)
    for k0 in tl.range(0, HK, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < HK
        row = tl.load(ids_ptr + t * HK + k, mask=km, other=0).to(tl.int64)
        src = values_ptr + row[:, None] * stride_v
        v0 = tl.load(src + c0[None, :], mask=km[:, None], other=0.0).to(tl.float32)
        v1 = tl.load(src + c1[None, :], mask=km[:, None] & cm1[None, :], other=0.0).to(tl.float32)
        tl.store(gw_ptr + t * HK + k, tl.sum(v0 * g0[None, :], 1) + tl.sum(v1 * g1[None, :], 1), mask=km)


def prep(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor | None = None):
    """Checked, contiguous inputs: values (N, D) with unit column stride, ids / weights (T, H, knn)."""
    if values.dim() != 2 or ids.shape != weights.shape or ids.dim() < 2:
        raise ValueError(f"weighted_bag wants values (N, D) and ids, weights (T, ...) of one shape; got "
                         f"{tuple(values.shape)}, {tuple(ids.shape)}, {tuple(weights.shape)}")
    if values.shape[0] >= 2**31:
        raise ValueError(f"values has {values.shape[0]} rows: row ids must fit in int32")
    if values.stride(1) != 1:
        values = values.contiguous()
    if grad_out is not None:
        if grad_out.shape != (ids.shape[0], values.shape[1]):
            raise ValueError(f"grad_out must be {(ids.shape[0], values.shape[1])}, got {tuple(grad_out.shape)}")
        grad_out = grad_out.contiguous()
    return values, ids.contiguous(), weights.contiguous(), grad_out


def _launch_per_token(kernel, values, ids, a, b):
    T, HK, D = ids.shape[0], ids[0].numel(), values.shape[1]
    W0, W1 = row_pieces(D)
    block_k, num_warps, num_stages = forward_config(D)
    block_k = min(block_k, triton.next_power_of_2(HK))
    kernel[(T,)](values, ids, a, b, D, values.stride(0), HK=HK, BLOCK_K=block_k, W0=W0, W1=W1,
                 NUM_STAGES=num_stages, num_warps=num_warps)


def weighted_bag_forward_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D) in out_dtype (default: values')."""
    values, ids, weights, _ = prep(values, ids, weights)
    out = _alloc.empty((ids.shape[0], values.shape[1]), out_dtype or values.dtype, values.device)
    if out.numel():
        _launch_per_token(_bag_fwd_kernel, values, ids, weights, out)
    return out


def weighted_bag_grad_weights_triton(values: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """-> grad weights (T, H, knn) fp32 = values[ids] . grad_out[t]."""
    values, ids, _, grad_out = prep(values, ids, ids, grad_out)
    grad_w = _alloc.empty(ids.shape, torch.float32, values.device)
    if grad_w.numel():
        _launch_per_token(_bag_grad_w_kernel, values, ids, grad_out, grad_w)
    return grad_w


def weighted_bag_backward_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                 grad_out: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse, deterministic backward -> (unique row ids (U,), row grads (U, D) fp32, grad weights (T, H, knn) fp32).

    Same contract as weighted_bag_reference.weighted_bag_backward_reference. One host sync (for U).
    """
    values, ids, weights, grad_out = prep(values, ids, weights, grad_out)
    runs = sort_runs(ids, chunk)
    u, U = run_index(runs)
    uniq = _alloc.empty((U,), torch.int64, values.device)
    rows = _alloc.empty((U, values.shape[1]), torch.float32, values.device)
    grad_w = _alloc.empty(ids.shape, torch.float32, values.device)
    walk(runs, SPARSE, values, weights, grad_out, ids[0].numel(), need_grad_w=True, out=rows, uniq=uniq,
         run_idx=u, grad_w=grad_w)
    return uniq, rows, grad_w


def weighted_bag_backward_dense_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                       grad_out: torch.Tensor, out: torch.Tensor | None = None,
                                       need_grad_w: bool = True, chunk: int = 64):
    """Backward into a dense fp32 buffer -> (grad values (N, D) fp32, grad weights (T, H, knn) fp32 or None).

    out: an (N, D) fp32 buffer to accumulate into (a new zeroed one when None). No host sync.
    """
    values, ids, weights, grad_out = prep(values, ids, weights, grad_out)
    if out is None:
        out = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    if out.dtype != torch.float32 or out.shape != values.shape or out.stride(1) != 1:
        raise ValueError(f"out must be an fp32 {tuple(values.shape)} buffer with unit column stride")
    grad_w = _alloc.empty(ids.shape, torch.float32, values.device) if need_grad_w else None
    walk(sort_runs(ids, chunk), DENSE, values, weights, grad_out, ids[0].numel(), need_grad_w=need_grad_w,
         out=out, grad_w=grad_w)
    return out, grad_w


class _WeightedBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, ids, weights, sparse_grad: bool):
        ctx.save_for_backward(values, ids, weights)
        ctx.sparse_grad = sparse_grad
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
            dense, grad_w = weighted_bag_backward_dense_triton(values, ids, weights, grad_out, need_grad_w=need_weights)
            grad_values = dense.to(values.dtype)
        elif need_weights:
            grad_w = weighted_bag_grad_weights_triton(values, ids, grad_out)
        return grad_values, None, grad_w.to(weights.dtype) if need_weights else None, None


def weighted_bag_triton(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        sparse_grad: bool = False) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D); differentiable in values and weights.

    sparse_grad: values.grad is a coalesced sparse COO tensor of the touched rows instead of a dense
    (N, D) tensor. Every backward is deterministic (bitwise repeatable).
    """
    return _WeightedBag.apply(values, ids, weights, sparse_grad)
