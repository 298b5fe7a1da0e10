"""Sparse row updates: touched rows match the reference, every other row (and its state) is bitwise unchanged."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import (
    sparse_adam_,
    sparse_sgd_,
    weighted_bag_backward_adam_,
    weighted_bag_backward_sgd_,
)
from slotwise.kernels.weighted_bag_reference import weighted_bag_backward_reference
from slotwise.kernels.sparse_update_reference import sparse_adam_reference, sparse_sgd_reference

DTYPES = [torch.float32, torch.bfloat16]
N, D = 37, 41


def _table(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N, D, generator=g).to(dtype).to(device)
    state = [torch.randn(N, D, generator=g).to(device) * 0.1,           # exp_avg
             torch.rand(N, D, generator=g).to(device) * 0.01,           # exp_avg_sq
             torch.randint(0, 4, (N,), generator=g).to(device)]         # step: some rows seen before
    return table, state


def _rows(device, n=11, seed=0):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n].to(device)


def _assert_untouched(after, before, rows):
    keep = torch.ones(before.shape[0], dtype=torch.bool, device=before.device)
    keep[rows] = False
    assert torch.equal(after[keep], before[keep]), "a row outside `rows` changed"


def _adam_kwargs():
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_sgd(device, close, dtype):
    table, _ = _table(dtype, device)
    rows = _rows(device)
    grads = torch.randn(rows.numel(), D, generator=torch.Generator().manual_seed(5)).to(device)
    ours, ref = table.clone(), table.clone()
    sparse_sgd_(ours, rows, grads, lr=0.3, backend="triton")
    sparse_sgd_reference(ref, rows, grads, lr=0.3)
    close(ours, ref, dtype)
    _assert_untouched(ours, table, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adam_two_steps(device, close, dtype):
    """Two steps on overlapping row sets: the per-row step counters (lazy bias correction) must track."""
    table, state = _table(dtype, device)
    ours, ours_state = table.clone(), [s.clone() for s in state]
    ref, ref_state = table.clone(), [s.clone() for s in state]
    all_rows = []
    for seed in (1, 2):
        rows = _rows(device, seed=seed)
        all_rows.append(rows)
        grads = torch.randn(rows.numel(), D, generator=torch.Generator().manual_seed(seed)).to(device)
        sparse_adam_(ours, *ours_state, rows, grads, **_adam_kwargs(), backend="triton")
        sparse_adam_reference(ref, *ref_state, rows, grads, **_adam_kwargs())
    close(ours, ref, dtype)
    # the second step's state sees the first step's (rounded) weights through weight decay
    close(ours_state[0], ref_state[0], dtype)
    close(ours_state[1], ref_state[1], dtype)
    assert torch.equal(ours_state[2], ref_state[2])
    touched = torch.cat(all_rows)
    _assert_untouched(ours, table, touched)
    for after, before in zip(ours_state, state):
        _assert_untouched(after, before, touched)


def _bag_inputs(device, seed=3):
    g = torch.Generator().manual_seed(seed)
    T, H, knn = 9, 3, 5
    ids = torch.randint(0, N // 2, (T, H, knn), generator=g).to(device)  # half the table never touched
    weights = torch.softmax(torch.randn(T, H, knn, generator=g), -1).to(device)
    grad_out = torch.randn(T, D, generator=g).to(device)
    return ids, weights, grad_out


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backward_sgd(device, close, dtype):
    table, _ = _table(dtype, device)
    ids, weights, grad_out = _bag_inputs(device)
    ours, ref = table.clone(), table.clone()
    grad_w, rows = weighted_bag_backward_sgd_(ours, ids, weights, grad_out, lr=0.5, backend="triton")
    ref_rows, ref_row_grads, ref_grad_w = weighted_bag_backward_reference(table, ids, weights, grad_out)
    sparse_sgd_reference(ref, ref_rows, ref_row_grads, lr=0.5)
    assert torch.equal(rows, ref_rows)
    close(grad_w, ref_grad_w, dtype)
    close(ours, ref, dtype)
    _assert_untouched(ours, table, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backward_adam(device, close, dtype):
    table, state = _table(dtype, device)
    ids, weights, grad_out = _bag_inputs(device)
    ours, ours_state = table.clone(), [s.clone() for s in state]
    ref, ref_state = table.clone(), [s.clone() for s in state]
    grad_w, rows = weighted_bag_backward_adam_(ours, *ours_state, ids, weights, grad_out, **_adam_kwargs(),
                                               backend="triton")
    ref_grad_w, ref_rows = weighted_bag_backward_adam_(ref, *ref_state, ids, weights, grad_out, **_adam_kwargs(),
                                                       backend="torch")
    assert torch.equal(rows, ref_rows)
    close(grad_w, ref_grad_w, dtype)
    close(ours, ref, dtype)
    close(ours_state[0], ref_state[0])
    close(ours_state[1], ref_state[1])
    assert torch.equal(ours_state[2], ref_state[2])
    _assert_untouched(ours, table, rows)
    for after, before in zip(ours_state, state):
        _assert_untouched(after, before, rows)


def test_empty_rows_is_a_no_op(device):
    table, state = _table(torch.float32, device)
    before = table.clone()
    rows = torch.empty(0, dtype=torch.int64, device=device)
    sparse_sgd_(table, rows, torch.empty(0, D, device=device), lr=1.0, backend="triton")
    sparse_adam_(table, *state, rows, torch.empty(0, D, device=device), lr=1.0, backend="triton")
    assert torch.equal(table, before)
