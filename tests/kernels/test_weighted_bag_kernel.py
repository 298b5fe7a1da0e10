"""Weighted embedding bag: Triton forward and every backward path against the reference."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import weighted_bag, weighted_bag_backward
from slotwise.kernels.weighted_bag_reference import weighted_bag_backward_reference, weighted_bag_reference

DTYPES = [torch.float32, torch.bfloat16]
# (tokens, heads, knn, N, D): D 41 = 32 + 9 of a 16-wide slice, D 576 = 512 + 64 (the 1M pool's width),
# D 33 = 32 + 1; N 7 makes every row a long run that crosses windows (combined across programs)
SHAPES = [(9, 3, 5, 50, 41), (5, 2, 3, 20, 576), (9, 3, 5, 7, 33)]


def _inputs(shape, dtype, device, seed=0):
    T, H, knn, N, D = shape
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=g).to(dtype).to(device)
    ids = torch.randint(0, N, (T, H, knn), generator=g).to(device)
    weights = torch.softmax(torch.randn(T, H, knn, generator=g), -1).to(device)
    grad_out = torch.randn(T, D, generator=g).to(dtype).to(device)
    return values, ids, weights, grad_out


def _reference_grads(values, ids, weights, grad_out):
    v = values.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    out = weighted_bag_reference(v, ids, w)
    out.backward(grad_out.to(out.dtype))
    return out, v.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_weighted_bag_autograd(device, close, dtype, shape, mode):
    values, ids, weights, grad_out = _inputs(shape, dtype, device)
    ref_out, ref_gv, ref_gw = _reference_grads(values, ids, weights, grad_out)
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = weighted_bag(v, ids, w, backend="triton", sparse_grad=mode == "sparse")
    assert out.dtype == dtype and out.shape == ref_out.shape
    close(out, ref_out, dtype)
    out.backward(grad_out)
    grad_v = v.grad
    if mode == "sparse":
        assert grad_v.is_sparse  # one entry per touched row, sorted:
        assert torch.equal(grad_v._indices()[0], torch.unique(ids))
        grad_v = grad_v.to_dense()
    assert grad_v.dtype == dtype
    close(grad_v, ref_gv, dtype)
    close(w.grad, ref_gw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [64, 4], ids=["one-window", "split-runs"])
def test_weighted_bag_sparse_backward(device, close, dtype, chunk):
    """Runs split across windows of 4 entries (summed by the combine kernel) give the same rows."""
    from slotwise.kernels.weighted_bag_triton import weighted_bag_backward_triton

    values, ids, weights, grad_out = _inputs(SHAPES[2], dtype, device, seed=1)
    uniq, rows, grad_w = weighted_bag_backward_triton(values, ids, weights, grad_out, chunk=chunk)
    ref_uniq, ref_rows, ref_grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
    assert torch.equal(uniq, ref_uniq)
    assert rows.dtype == torch.float32 and grad_w.dtype == torch.float32
    close(rows, ref_rows)  # row grads do not depend on the values: fp32 tolerance for both dtypes
    close(grad_w, ref_grad_w, dtype)


def test_public_sparse_backward_matches_reference(device, close):
    values, ids, weights, grad_out = _inputs(SHAPES[0], torch.float32, device, seed=2)
    got = weighted_bag_backward(values, ids, weights, grad_out, backend="triton")
    ref = weighted_bag_backward(values, ids, weights, grad_out, backend="torch")
    assert torch.equal(got[0], ref[0])
    close(got[1], ref[1])
    close(got[2], ref[2])


def test_skewed_ids_one_hot_row(device, close):
    """Zipf-like: most entries read one row, whose run spans many windows."""
    from slotwise.kernels.weighted_bag_triton import weighted_bag_backward_dense_triton

    values, ids, weights, grad_out = _inputs(SHAPES[0], torch.float32, device, seed=3)
    ids = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)).to(device) < 0.8, 3, ids)
    dense, grad_w = weighted_bag_backward_dense_triton(values, ids, weights, grad_out, chunk=8)
    _, ref_gv, ref_gw = _reference_grads(values, ids, weights, grad_out)
    close(dense, ref_gv)
    close(grad_w, ref_gw)


def test_weighted_bag_only_weights_need_grad(device, close):
    values, ids, weights, grad_out = _inputs(SHAPES[1], torch.float32, device)
    w = weights.clone().requires_grad_()
    weighted_bag(values, ids, w, backend="triton").backward(grad_out)
    close(w.grad, _reference_grads(values, ids, weights, grad_out)[2])


def test_dense_backward_accumulates_into_buffer(device, close):
    from slotwise.kernels.weighted_bag_triton import weighted_bag_backward_dense_triton

    values, ids, weights, grad_out = _inputs(SHAPES[2], torch.float32, device)
    start = torch.randn(values.shape, generator=torch.Generator().manual_seed(3)).to(device)
    buf = start.clone()
    out, grad_w = weighted_bag_backward_dense_triton(values, ids, weights, grad_out, out=buf, need_grad_w=False,
                                                     chunk=4)
    assert out is buf and grad_w is None
    close(buf, start + _reference_grads(values, ids, weights, grad_out)[1])


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_is_bitwise_reproducible(device, sparse):
    values, ids, weights, grad_out = _inputs(SHAPES[2], torch.float32, device)
    runs = []
    for _ in range(2):
        v = values.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        weighted_bag(v, ids, w, backend="triton", sparse_grad=sparse).backward(grad_out)
        runs.append((v.grad.to_dense() if sparse else v.grad, w.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_bad_shapes_are_clear_errors(device):
    from slotwise.kernels.weighted_bag_triton import weighted_bag_backward_triton

    values, ids, weights, grad_out = _inputs(SHAPES[0], torch.float32, device)
    with pytest.raises(ValueError, match="grad_out must be"):
        weighted_bag_backward_triton(values, ids, weights, grad_out[:, :-1])
    with pytest.raises(ValueError, match="one shape"):
        weighted_bag(values, ids, weights[:, :, :-1], backend="triton")
