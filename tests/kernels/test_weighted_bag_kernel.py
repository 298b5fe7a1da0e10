"""Weighted embedding bag: Triton forward and every backward path against the reference."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import weighted_bag, weighted_bag_backward
from slotwise.kernels.weighted_bag_reference import weighted_bag_backward_reference, weighted_bag_reference

DTYPES = [torch.float32, torch.bfloat16]
# (tokens, heads, knn, N, D): D 41 is one masked block, D 576 two blocks of 512 (the second masked);
# N 7 forces long runs of repeated rows (segments longer than one tile)
SHAPES = [(9, 3, 5, 50, 41), (5, 2, 3, 20, 576), (9, 3, 5, 7, 33)]


def _inputs(shape, dtype, device, seed=0):
    T, H, knn, N, D = shape
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=g).to(dtype).to(device)
    ids = torch.randint(0, N, (T, H, knn), generator=g).to(device)
    weights = torch.softmax(torch.randn(T, H, knn, generator=g), -1).to(device)
    grad_out = torch.randn(T, D, generator=g).to(device)
    return values, ids, weights, grad_out


def _reference_grads(values, ids, weights, grad_out):
    v = values.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    out = weighted_bag_reference(v, ids, w)
    out.backward(grad_out.to(out.dtype))
    return out, v.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["dense", "dense_deterministic", "sparse"])
def test_weighted_bag_autograd(device, close, dtype, shape, mode):
    values, ids, weights, grad_out = _inputs(shape, dtype, device)
    ref_out, ref_gv, ref_gw = _reference_grads(values, ids, weights, grad_out)
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = weighted_bag(v, ids, w, backend="triton", sparse_grad=mode == "sparse",
                       deterministic=mode == "dense_deterministic")
    assert out.dtype == dtype and out.shape == ref_out.shape
    close(out, ref_out, dtype)
    out.backward(grad_out.to(out.dtype))
    grad_v = v.grad
    if mode == "sparse":
        assert grad_v.is_sparse  # one entry per touched row, sorted:
        assert torch.equal(grad_v._indices()[0], torch.unique(ids))
        grad_v = grad_v.to_dense()
    assert grad_v.dtype == dtype
    close(grad_v, ref_gv, dtype)
    close(w.grad, ref_gw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_weighted_bag_sparse_backward(device, close, dtype, shape):
    values, ids, weights, grad_out = _inputs(shape, dtype, device, seed=1)
    uniq, rows, grad_w = weighted_bag_backward(values, ids, weights, grad_out, backend="triton")
    ref_uniq, ref_rows, ref_grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
    assert torch.equal(uniq, ref_uniq)
    assert rows.dtype == torch.float32 and grad_w.dtype == torch.float32
    close(rows, ref_rows)  # row grads do not depend on the values: fp32 tolerance for both dtypes
    close(grad_w, ref_grad_w, dtype)


def test_weighted_bag_only_weights_need_grad(device, close):
    values, ids, weights, grad_out = _inputs(SHAPES[0], torch.float32, device)
    w = weights.clone().requires_grad_()
    weighted_bag(values, ids, w, backend="triton").backward(grad_out)
    close(w.grad, _reference_grads(values, ids, weights, grad_out)[2])


@pytest.mark.parametrize("deterministic", [False, True])
def test_dense_backward_accumulates_into_buffer(device, close, deterministic):
    from slotwise.kernels.weighted_bag import weighted_bag_backward_dense_triton

    values, ids, weights, grad_out = _inputs(SHAPES[2], torch.float32, device)
    start = torch.randn(values.shape, generator=torch.Generator().manual_seed(3)).to(device)
    buf = start.clone()
    out, _ = weighted_bag_backward_dense_triton(values, ids, weights, grad_out, out=buf, deterministic=deterministic)
    assert out is buf
    close(buf, start + _reference_grads(values, ids, weights, grad_out)[1])


def test_deterministic_backward_is_bitwise_reproducible(device):
    values, ids, weights, grad_out = _inputs(SHAPES[2], torch.float32, device)
    runs = []
    for _ in range(2):
        v = values.clone().requires_grad_()
        weighted_bag(v, ids, weights, backend="triton", deterministic=True).backward(grad_out)
        runs.append(v.grad)
    assert torch.equal(runs[0], runs[1])
