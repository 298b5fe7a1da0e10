"""Sparse row updates, the PyTorch reference: read and write only the given rows.

Everything sparse memory finetuning promises rests on this: rows not in `rows` stay bitwise
unchanged, and so does their optimizer state. Arithmetic in fp32 whatever the table's or the
state's dtype; results are rounded to those dtypes when stored.
"""
from __future__ import annotations

import torch


def sparse_sgd_reference(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
    """table (N, D) in place; rows (U,) unique int64; grads (U, D)."""
    table[rows] = (table[rows].float() - lr * grads.float()).to(table.dtype)


def sparse_adam_reference(
    table: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """Adam with lazy per-row state (like torch.optim.SparseAdam): rows (U,) unique.

    exp_avg, exp_avg_sq (N, D) fp32 or bf16; step (N,) int64 counts each row's own updates, so the
    bias correction of a row depends only on how often that row was touched.
    """
    g = grads.float()
    p = table[rows].float()
    if weight_decay:
        g = g + weight_decay * p
    step[rows] += 1
    t = step[rows].float().unsqueeze(1)
    m = exp_avg[rows].float() * beta1 + (1 - beta1) * g
    v = exp_avg_sq[rows].float() * beta2 + (1 - beta2) * g * g
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    table[rows] = (p - lr * m_hat / (v_hat.sqrt() + eps)).to(table.dtype)


def sparse_rowwise_adagrad_reference(table: torch.Tensor, state_sum: torch.Tensor, rows: torch.Tensor,
                                     grads: torch.Tensor, lr: float, eps: float = 1e-8,
                                     weight_decay: float = 0.0) -> None:
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row, state_sum (N,) fp32.

    g = grad + weight_decay * p;  G[row] += mean(g**2);  p -= lr * g / (sqrt(G[row]) + eps)
    """
    p = table[rows].float()
    g = grads.float()
    if weight_decay:
        g = g + weight_decay * p
    state_sum[rows] += g.pow(2).mean(1)
    table[rows] = (p - lr * g / (state_sum[rows].sqrt().unsqueeze(1) + eps)).to(table.dtype)
