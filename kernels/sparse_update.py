"""Sparse row updates, the Triton kernels (spec: sparse_update_reference).

Every program owns one row of `rows` (unique ids) and reads and writes that row only, so all
other rows of the table, and of the Adam state, stay bitwise unchanged; the cost grows with the
number of rows touched, not with N.

The fused variants take the weighted-bag backward's inputs instead of row gradients: each
program sums its row's gradient from the sorted segment of (token, weight) pairs
(weighted_bag._segment_grad) one D-block at a time and applies the step at once, so the row
gradients never round-trip through memory.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .weighted_bag import _blocks, _grad_weights, _prep, _segment_grad, sort_segments


@triton.jit
def _row_grad(grads_ptr, u, stride_g, g_ptr, w_ptr, perm_ptr, seg_ptr, HK, D, d, d_mask,
              FUSED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of the u-th touched row on columns d: stored (grads[u]) or fused (segment sum)."""
    if FUSED:
        start = tl.load(seg_ptr + u)
        end = tl.load(seg_ptr + u + 1)
        return _segment_grad(g_ptr, w_ptr, perm_ptr, start, end, HK, D, d, d_mask, BLOCK_S, BLOCK_D)
    else:
        return tl.load(grads_ptr + u.to(tl.int64) * stride_g + d, mask=d_mask, other=0.0).to(tl.float32)


@triton.jit
def _sgd_kernel(table_ptr, rows_ptr, grads_ptr, g_ptr, w_ptr, perm_ptr, seg_ptr,
                lr, D, HK, stride_t, stride_g,
                FUSED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    row = tl.load(rows_ptr + u).to(tl.int64)
    g = _row_grad(grads_ptr, u, stride_g, g_ptr, w_ptr, perm_ptr, seg_ptr, HK, D, d, d_mask, FUSED, BLOCK_S, BLOCK_D)
    p_ptrs = table_ptr + row * stride_t + d
    p = tl.load(p_ptrs, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(p_ptrs, (p - lr * g).to(table_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _adam_kernel(table_ptr, m_ptr, v_ptr, step_ptr, rows_ptr, grads_ptr, g_ptr, w_ptr, perm_ptr, seg_ptr,
                 lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, D, HK, stride_t, stride_m, stride_g,
                 HAS_WD: tl.constexpr, FUSED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per row and a loop over D, so the row's step counter is read and bumped once
    u = tl.program_id(0)
    row = tl.load(rows_ptr + u).to(tl.int64)
    t = tl.load(step_ptr + row) + 1
    tl.store(step_ptr + row, t)
    tf = t.to(tl.float32)
    bc1 = 1.0 - tl.exp2(tf * log2_beta1)  # 1 - beta1**t, per row (lazy state)
    bc2 = 1.0 - tl.exp2(tf * log2_beta2)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        g = _row_grad(grads_ptr, u, stride_g, g_ptr, w_ptr, perm_ptr, seg_ptr, HK, D, d, d_mask, FUSED, BLOCK_S, BLOCK_D)
        p_ptrs = table_ptr + row * stride_t + d
        p = tl.load(p_ptrs, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_WD:
            g += weight_decay * p
        m = tl.load(m_ptr + row * stride_m + d, mask=d_mask, other=0.0) * beta1 + (1.0 - beta1) * g
        v = tl.load(v_ptr + row * stride_m + d, mask=d_mask, other=0.0) * beta2 + (1.0 - beta2) * g * g
        tl.store(m_ptr + row * stride_m + d, m, mask=d_mask)
        tl.store(v_ptr + row * stride_m + d, v, mask=d_mask)
        p = p - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
        tl.store(p_ptrs, p.to(table_ptr.dtype.element_ty), mask=d_mask)


def _check_table(table: torch.Tensor, *state: torch.Tensor) -> None:
    for t in (table, *state):
        if t.stride(-1) != 1:
            raise ValueError("sparse updates work in place: table and state need unit column stride")
    for s in state:
        if s.dtype != torch.float32 or s.shape != table.shape or s.stride(0) != state[0].stride(0):
            raise ValueError(f"Adam state must be fp32 {tuple(table.shape)} with matching strides")


def _launch_sgd(table, rows, lr, grads=None, fused=None):
    D = table.shape[1]
    BLOCK_S, BLOCK_D = _blocks(D)
    g_out, w, perm, seg, HK = fused if fused is not None else (rows, rows, rows, rows, 1)
    grads = grads if grads is not None else rows  # an unused pointer argument
    _sgd_kernel[(rows.numel(), triton.cdiv(D, BLOCK_D))](
        table, rows, grads, g_out, w, perm, seg, float(lr), D, HK, table.stride(0),
        grads.stride(0) if grads.dim() == 2 else 0,
        FUSED=fused is not None, BLOCK_S=min(BLOCK_S, 16), BLOCK_D=BLOCK_D, num_warps=4)


def _launch_adam(table, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay, grads=None, fused=None):
    D = table.shape[1]
    BLOCK_S, BLOCK_D = _blocks(D)
    g_out, w, perm, seg, HK = fused if fused is not None else (rows, rows, rows, rows, 1)
    grads = grads if grads is not None else rows
    _adam_kernel[(rows.numel(),)](
        table, exp_avg, exp_avg_sq, step, rows, grads, g_out, w, perm, seg,
        float(lr), float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(eps), float(weight_decay),
        D, HK, table.stride(0), exp_avg.stride(0), grads.stride(0) if grads.dim() == 2 else 0,
        HAS_WD=weight_decay != 0, FUSED=fused is not None, BLOCK_S=min(BLOCK_S, 16), BLOCK_D=BLOCK_D, num_warps=4)


def sparse_sgd_triton(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
    """In place: table[rows] -= lr * grads; rows (U,) unique, grads (U, D)."""
    _check_table(table)
    if rows.numel():
        _launch_sgd(table, rows.contiguous(), lr, grads=grads.contiguous())


def sparse_adam_triton(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0) -> None:
    """In place Adam with lazy per-row state on rows (U,) unique; see sparse_adam_reference."""
    _check_table(table, exp_avg, exp_avg_sq)
    if rows.numel():
        _launch_adam(table, exp_avg, exp_avg_sq, step, rows.contiguous(), lr, beta1, beta2, eps, weight_decay,
                     grads=grads.contiguous())


def _fused_prep(values, ids, weights, grad_out):
    """grad weights (read values before they change) and the sorted segments for the row sums."""
    values, ids, weights = _prep(values, ids, weights)
    grad_out = grad_out.contiguous()
    grad_w = _grad_weights(values, ids, weights, grad_out)
    uniq, perm, seg = sort_segments(ids)
    return grad_w, uniq, (grad_out, weights, perm, seg, ids[0].numel())


def weighted_bag_backward_sgd_triton(values, ids, weights, grad_out, lr) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of weighted_bag fused with an SGD step on the touched rows of `values` (in place).

    Returns (grad weights (T, H, knn) fp32, computed from the values before the step; unique row ids (U,)).
    """
    _check_table(values)
    grad_w, uniq, fused = _fused_prep(values, ids, weights, grad_out)
    if uniq.numel():
        _launch_sgd(values, uniq, lr, fused=fused)
    return grad_w, uniq


def weighted_bag_backward_adam_triton(values, exp_avg, exp_avg_sq, step, ids, weights, grad_out, lr, beta1=0.9,
                                      beta2=0.999, eps=1e-8, weight_decay=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of weighted_bag fused with a lazy Adam step on the touched rows of `values` (in place).

    Returns (grad weights (T, H, knn) fp32, computed from the values before the step; unique row ids (U,)).
    """
    _check_table(values, exp_avg, exp_avg_sq)
    grad_w, uniq, fused = _fused_prep(values, ids, weights, grad_out)
    if uniq.numel():
        _launch_adam(values, exp_avg, exp_avg_sq, step, uniq, lr, beta1, beta2, eps, weight_decay, fused=fused)
    return grad_w, uniq
