"""Sparse row updates: touched rows match the reference, every other row (and its state) is bitwise unchanged."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import (
    sparse_adam_,
    sparse_rowwise_adagrad_,
    sparse_sgd_,
    weighted_bag_backward_adam_,
    weighted_bag_backward_rowwise_adagrad_,
    weighted_bag_backward_sgd_,
)
from slotwise.kernels.sparse_update_reference import (
    sparse_adam_reference,
    sparse_rowwise_adagrad_reference,
    sparse_sgd_reference,
)

DTYPES = [torch.float32, torch.bfloat16]
N, D = 37, 41
OPTIMIZERS = ["sgd", "adam", "adam-bf16-state", "adagrad"]


def _table(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g).to(dtype).to(device)


def _state(optimizer, device, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    if optimizer.startswith("adam"):
        sd = torch.bfloat16 if optimizer == "adam-bf16-state" else torch.float32
        return [(torch.randn(N, D, generator=g) * 0.1).to(sd).to(device),     # exp_avg
                (torch.rand(N, D, generator=g) * 0.01).to(sd).to(device),     # exp_avg_sq
                torch.randint(0, 4, (N,), generator=g).to(device)]            # step: some rows seen before
    if optimizer == "adagrad":
        return [torch.rand(N, generator=g).to(device)]                        # per-row sum of mean squares
    return []


def _hyper(optimizer):
    if optimizer == "sgd":
        return dict(lr=0.3)
    if optimizer == "adagrad":
        return dict(lr=0.1, eps=1e-6, weight_decay=0.01)
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _rows(device, n=11, seed=0):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n].to(device)


def _assert_untouched(after, before, rows):
    keep = torch.ones(before.shape[0], dtype=torch.bool, device=before.device)
    keep[rows] = False
    assert torch.equal(after[keep], before[keep]), "a row outside `rows` changed"


def _reference_step(optimizer, table, state, rows, grads, hyper):
    if optimizer == "sgd":
        sparse_sgd_reference(table, rows, grads, **hyper)
    elif optimizer == "adagrad":
        sparse_rowwise_adagrad_reference(table, *state, rows, grads, **hyper)
    else:
        sparse_adam_reference(table, *state, rows, grads, **hyper)


def _triton_step(optimizer, table, state, rows, grads, hyper):
    if optimizer == "sgd":
        sparse_sgd_(table, rows, grads, **hyper, backend="triton")
    elif optimizer == "adagrad":
        sparse_rowwise_adagrad_(table, *state, rows, grads, **hyper, backend="triton")
    else:
        sparse_adam_(table, *state, rows, grads, **hyper, backend="triton")


def _compare(close, dtype, ours, ref, ours_state, ref_state, before, before_state, rows):
    if any(s.dtype == torch.bfloat16 for s in ours_state):
        dtype = torch.bfloat16  # one rounding flip of bf16 state moves the next step by a bf16 ulp
    close(ours, ref, dtype)
    for a, b in zip(ours_state, ref_state):
        if a.dtype == torch.int64:
            assert torch.equal(a, b)
        else:  # the state sees the (rounded) weights through weight decay
            close(a, b, torch.bfloat16 if torch.bfloat16 in (dtype, a.dtype) else torch.float32)
    _assert_untouched(ours, before, rows)
    for after, b in zip(ours_state, before_state):
        _assert_untouched(after, b, rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sparse_step_two_steps(device, close, dtype, optimizer):
    """Two steps on overlapping row sets: per-row state (lazy Adam's step counts, Adagrad's sums) must track."""
    table, state = _table(dtype, device), _state(optimizer, device)
    ours, ours_state = table.clone(), [s.clone() for s in state]
    ref, ref_state = table.clone(), [s.clone() for s in state]
    touched = []
    for seed in (1, 2):
        rows = _rows(device, seed=seed)
        touched.append(rows)
        grads = torch.randn(rows.numel(), D, generator=torch.Generator().manual_seed(seed)).to(device)
        _triton_step(optimizer, ours, ours_state, rows, grads, _hyper(optimizer))
        _reference_step(optimizer, ref, ref_state, rows, grads, _hyper(optimizer))
    _compare(close, dtype, ours, ref, ours_state, ref_state, table, state, torch.cat(touched))


def _bag_inputs(device, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    T, H, knn = 9, 3, 5
    ids = torch.randint(0, N // 2, (T, H, knn), generator=g).to(device)  # half the table never touched
    weights = torch.softmax(torch.randn(T, H, knn, generator=g), -1).to(device)
    grad_out = torch.randn(T, D, generator=g).to(dtype).to(device)
    return ids, weights, grad_out


def _fused(optimizer, table, state, ids, weights, grad_out, backend, **kw):
    hyper = _hyper(optimizer)
    if optimizer == "sgd":
        return weighted_bag_backward_sgd_(table, ids, weights, grad_out, **hyper, backend=backend, **kw)
    if optimizer == "adagrad":
        return weighted_bag_backward_rowwise_adagrad_(table, *state, ids, weights, grad_out, **hyper, backend=backend,
                                                      **kw)
    return weighted_bag_backward_adam_(table, *state, ids, weights, grad_out, **hyper, backend=backend, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_backward_step(device, close, dtype, optimizer):
    table, state = _table(dtype, device), _state(optimizer, device)
    ids, weights, grad_out = _bag_inputs(device, dtype)
    ours, ours_state = table.clone(), [s.clone() for s in state]
    ref, ref_state = table.clone(), [s.clone() for s in state]
    grad_w, rows = _fused(optimizer, ours, ours_state, ids, weights, grad_out, "triton")
    ref_grad_w, ref_rows = _fused(optimizer, ref, ref_state, ids, weights, grad_out, "torch")
    assert torch.equal(rows, ref_rows) and torch.equal(rows, torch.unique(ids))
    close(grad_w, ref_grad_w, dtype)
    _compare(close, dtype, ours, ref, ours_state, ref_state, table, state, rows)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_fused_split_runs_and_row_mask(device, close, optimizer):
    """Windows of 4 entries split every run (the combine kernel steps those rows); row_mask limits the step."""
    from slotwise.kernels.sparse_update import weighted_bag_backward_step_triton

    table, state = _table(torch.float32, device), _state(optimizer, device)
    ids, weights, grad_out = _bag_inputs(device, torch.float32, seed=4)
    ids = ids % 6  # six hot rows: every run crosses windows
    row_mask = torch.zeros(N, dtype=torch.bool, device=device)
    row_mask[[0, 2, 3, 30]] = True  # 30 is never read: stays untouched
    ours, ours_state = table.clone(), [s.clone() for s in state]
    ref, ref_state = table.clone(), [s.clone() for s in state]
    grad_w, rows = weighted_bag_backward_step_triton(optimizer, ours, tuple(ours_state), ids, weights, grad_out,
                                                     row_mask=row_mask, chunk=4, **_hyper(optimizer))
    ref_grad_w, ref_rows = _fused(optimizer, ref, ref_state, ids, weights, grad_out, "torch", row_mask=row_mask)
    assert rows.tolist() == ref_rows.tolist() == [0, 2, 3]
    close(grad_w, ref_grad_w)
    _compare(close, torch.float32, ours, ref, ours_state, ref_state, table, state, rows)


def test_fused_is_bitwise_reproducible_without_host_sync(device):
    ids, weights, grad_out = _bag_inputs(device, torch.float32, seed=5)
    ids = ids % 5
    results = []
    for _ in range(2):
        table, state = _table(torch.float32, device), _state("adam", device)
        grad_w, rows = weighted_bag_backward_adam_(table, *state, ids, weights, grad_out, **_hyper("adam"),
                                                   backend="triton", return_rows=False)
        assert rows is None
        results.append((table, *state, grad_w))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_empty_rows_is_a_no_op(device):
    table, state = _table(torch.float32, device), _state("adam", device)
    before = table.clone()
    rows = torch.empty(0, dtype=torch.int64, device=device)
    sparse_sgd_(table, rows, torch.empty(0, D, device=device), lr=1.0, backend="triton")
    sparse_adam_(table, *state, rows, torch.empty(0, D, device=device), lr=1.0, backend="triton")
    assert torch.equal(table, before)


def test_bad_state_is_a_clear_error(device):
    table, state = _table(torch.float32, device), _state("adam", device)
    rows = _rows(device)
    grads = torch.zeros(rows.numel(), D, device=device)
    with pytest.raises(ValueError, match="Adam state"):
        sparse_adam_(table, state[0].half(), state[1], state[2], rows, grads, lr=1.0, backend="triton")
    with pytest.raises(ValueError, match="row-wise Adagrad state"):
        sparse_rowwise_adagrad_(table, torch.zeros(N, 1, device=device), rows, grads, lr=1.0, backend="triton")
