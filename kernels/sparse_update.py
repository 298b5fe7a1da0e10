"""Sparse row updates, the Triton kernels (spec: sparse_update_reference).

Row-grad steps (sparse_sgd_, sparse_adam_, sparse_rowwise_adagrad_): one program per given row
reads and writes that row only (the whole row, as two power-of-two slices), so every other row of
the table and of the optimizer state stays bitwise unchanged; the cost grows with the number of
rows touched, not with N.

Fused backward + step (weighted_bag_backward_{sgd,adam,adagrad}_): the weighted bag's backward walk
(_segments.walk) finishes each touched row with the optimizer step instead of writing its gradient,
so row gradients never reach memory; the values row it loads for the grad weights is the row it
steps, and the Adam state is fetched before the run is walked. row_mask limits the step to chosen
rows (SMF's top-t); the grad weights still cover every entry. Optimizer state: Adam's exp_avg and
exp_avg_sq in fp32 or bf16 (half the state bytes; rounded to nearest after each step), or row-wise
Adagrad's one fp32 accumulator per row (FBGEMM's EXACT_ROWWISE_ADAGRAD).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _alloc
from ._row_update import ADAGRAD, ADAM, SGD
from ._segments import _finish_row, _prefetch, row_pieces, sort_runs, walk
from .weighted_bag_triton import prep

OPTIMIZERS = {"sgd": SGD, "adam": ADAM, "adagrad": ADAGRAD}


@triton.jit
def _row_step_kernel(table_ptr, rows_ptr, grads_ptr, ma_ptr, va_ptr, step_ptr, D, stride_t, stride_g, stride_m,
                     lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                     MODE: tl.constexpr, HAS_WD: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    c0 = tl.arange(0, W0)
    c1 = W0 + tl.arange(0, W1)
    cm1 = c1 < D
    src = grads_ptr + i.to(tl.int64) * stride_g
    g0 = tl.load(src + c0).to(tl.float32)
    g1 = tl.load(src + c1, mask=cm1, other=0.0).to(tl.float32)
    p0, p1, m0, m1, v0, v1 = _prefetch(row, row >= 0, c0, c1, cm1, table_ptr, stride_t, ma_ptr, va_ptr, stride_m,
                                       True, MODE)
    _finish_row(row, i, g0, g1, p0, p1, m0, m1, v0, v1, c0, c1, cm1, D, table_ptr, stride_t, table_ptr, rows_ptr, 0,
                ma_ptr, va_ptr, step_ptr, stride_m, lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                MODE, HAS_WD)


def check_state(optimizer: str, table: torch.Tensor, state: tuple) -> None:
    """Clear errors for tables and optimizer state the in-place kernels cannot take."""
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError("sparse updates work in place: the table must be (N, D) with unit column stride")
    N = table.shape[0]
    if optimizer == "adam":
        exp_avg, exp_avg_sq, step = state
        for s in (exp_avg, exp_avg_sq):
            if s.shape != table.shape or s.dtype not in (torch.float32, torch.bfloat16) or s.stride() != exp_avg.stride() \
                    or s.stride(1) != 1 or s.dtype != exp_avg.dtype:
                raise ValueError(f"Adam state must be two fp32 or two bf16 {tuple(table.shape)} tensors with equal strides")
        if step.shape != (N,) or step.dtype != torch.int64:
            raise ValueError(f"Adam step must be an int64 ({N},) tensor")
    elif optimizer == "adagrad":
        (acc,) = state
        if acc.shape != (N,) or acc.dtype != torch.float32:
            raise ValueError(f"row-wise Adagrad state must be an fp32 ({N},) tensor")


def _state_args(optimizer: str, state: tuple, dummy: torch.Tensor) -> tuple:
    if optimizer == "adam":
        return state[0], state[1], state[2]
    if optimizer == "adagrad":
        return state[0], dummy, dummy
    return dummy, dummy, dummy


def _hyper(lr, beta1, beta2, eps, weight_decay) -> tuple:
    return float(lr), float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(eps), float(weight_decay)


def sparse_step_triton(optimizer: str, table: torch.Tensor, state: tuple, rows: torch.Tensor, grads: torch.Tensor,
                       lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                       weight_decay: float = 0.0) -> None:
    """In place: the optimizer step on table[rows] (rows (U,) unique) from grads (U, D); nothing else changes."""
    check_state(optimizer, table, state)
    if grads.shape != (rows.numel(), table.shape[1]):
        raise ValueError(f"grads must be {(rows.numel(), table.shape[1])}, got {tuple(grads.shape)}")
    if not rows.numel():
        return
    rows, grads = rows.contiguous(), grads.contiguous()
    ma, va, step = _state_args(optimizer, state, rows)
    W0, W1 = row_pieces(table.shape[1])
    _row_step_kernel[(rows.numel(),)](
        table, rows, grads, ma, va, step, table.shape[1], table.stride(0), grads.stride(0),
        ma.stride(0) if ma.dim() == 2 else 0, *_hyper(lr, beta1, beta2, eps, weight_decay),
        MODE=int(OPTIMIZERS[optimizer].value), HAS_WD=weight_decay != 0, W0=W0, W1=W1,
        num_warps=4 if W0 >= 1024 else 2 if W0 >= 256 else 1)


def weighted_bag_backward_step_triton(optimizer: str, values: torch.Tensor, state: tuple, ids: torch.Tensor,
                                      weights: torch.Tensor, grad_out: torch.Tensor, lr: float, beta1: float = 0.9,
                                      beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                                      row_mask: torch.Tensor | None = None, return_rows: bool = True,
                                      need_grad_w: bool = True, chunk: int = 64):
    """The weighted bag's backward fused with the optimizer step on the touched rows of `values` (in place).

    -> (grad weights (T, H, knn) fp32, from the values before the step, or None with
    need_grad_w=False; the stepped row ids (U,) ascending, or None with return_rows=False, which
    keeps the whole call free of host syncs).
    """
    check_state(optimizer, values, state)
    values_in = values
    values, ids, weights, grad_out = prep(values, ids, weights, grad_out)
    if values is not values_in:
        raise ValueError("sparse updates work in place: values needs unit column stride")
    if row_mask is not None and (row_mask.shape != (values.shape[0],) or row_mask.dtype != torch.bool):
        raise ValueError(f"row_mask must be a bool ({values.shape[0]},) tensor")
    runs = sort_runs(ids, chunk)
    grad_w = _alloc.empty(ids.shape, torch.float32, values.device) if need_grad_w else None
    ma, va, step = _state_args(optimizer, state, runs.perm)
    walk(runs, OPTIMIZERS[optimizer], values, weights, grad_out, ids[0].numel(), need_grad_w=need_grad_w,
         state=(ma, va, step), row_mask=row_mask, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
         weight_decay=weight_decay, grad_w=grad_w)
    if not return_rows:
        return grad_w, None
    rows = torch.unique_consecutive(runs.sorted_ids).to(torch.int64)
    return grad_w, rows if row_mask is None else rows[row_mask[rows]]

