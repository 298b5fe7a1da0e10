"""The compiled Triton kernels on a real GPU against their PyTorch references, at the bench's shapes.

    make test-gpu        # = TRITON_INTERPRET=0 pytest -m gpu tests/gpu
    make bench-gpu       # these tests, then python -m slotwise.kernels.bench (JSON under bench_out/)

Skipped without CUDA. (The CPU suite checks the same kernels under TRITON_INTERPRET=1 on small
shapes.) Widths, heads and knn are the bench's (4 heads, knn 32, 1024 sub-keys, D 576 / 1024), so
the kernels compiled here are the ones the bench reuses; token counts are smaller so the fp32
references fit next to them.
"""
import os

import pytest
import torch

from slotwise import kernels
from slotwise.kernels.product_key_reference import pk_topk_reference
from slotwise.kernels.sparse_update_reference import sparse_adam_reference
from slotwise.kernels.weighted_bag_reference import weighted_bag_backward_reference, weighted_bag_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 to test compiled kernels"),
]
H, K, KNN, N_KEYS = 4, 256, 32, 1024
BF16 = dict(rtol=2e-2, atol=2e-2)
FP32 = dict(rtol=1e-4, atol=1e-4)


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _zipf(shape, n, g, s=1.15):
    p = torch.arange(1, n + 1, dtype=torch.float64, device="cuda").pow(-s)
    ranks = torch.multinomial((p / p.sum()).float(), int(torch.Size(shape).numel()), replacement=True, generator=g)
    return torch.randperm(n, device="cuda", generator=g)[ranks].view(shape)


def _chosen_scores(q, keys, ids):
    """Differentiable fp32 scores of given slots: q1 . k1[i] + q2 . k2[j] (the backward's oracle)."""
    T = q.shape[0]
    qh = q.float().view(T, H, 2, K // 2)
    i, j = ids // N_KEYS, ids % N_KEYS
    h = torch.arange(H, device="cuda").view(1, H, 1)
    return (torch.einsum("thd,thkd->thk", qh[:, :, 0], keys.float()[h, 0, i])
            + torch.einsum("thd,thkd->thk", qh[:, :, 1], keys.float()[h, 1, j]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pk_topk_search_usage_and_backward(dtype):
    g = _gen(0)
    T = 1024
    q = torch.randn(T, H, K, device="cuda", generator=g).to(dtype)
    keys = (torch.randn(H, 2, N_KEYS, K // 2, device="cuda", generator=g) / 8).to(dtype)
    weight = torch.linspace(-1, 1, KNN, device="cuda")
    q_, k_ = q.clone().requires_grad_(), keys.clone().requires_grad_()
    scores, ids, usage = kernels.pk_topk(q_, k_, KNN, backend="triton", usage=True)
    grads = torch.autograd.grad((scores * weight).sum() + (usage * usage).sum() * 1e3, (q_, k_))
    ref_scores, ref_ids, ref_usage = pk_topk_reference(q, keys, KNN, usage=True)
    assert (ids == ref_ids).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(scores, ref_scores, **FP32)
    torch.testing.assert_close(usage, ref_usage, **FP32)
    # the custom backward against autograd through the same slots' scores and the usage reference
    q_, k_ = q.clone().requires_grad_(), keys.clone().requires_grad_()
    from slotwise.kernels.product_key_reference import sub_key_usage_reference

    ref_loss = (_chosen_scores(q_, k_, ids) * weight).sum() + sub_key_usage_reference(q_, k_).pow(2).sum() * 1e3
    for a, b in zip(grads, torch.autograd.grad(ref_loss, (q_, k_))):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **(BF16 if dtype == torch.bfloat16 else FP32))


def test_pk_topk_bisection_fallback_is_exact():
    """cap 32: nearly every token overflows and goes through the fallback kernel."""
    from slotwise.kernels.product_key import pk_topk_triton

    g = _gen(1)
    q = torch.randn(256, H, K, device="cuda", generator=g).bfloat16()
    keys = torch.randn(H, 2, N_KEYS, K // 2, device="cuda", generator=g).bfloat16()
    q[7] = 0  # all ties
    scores, ids = pk_topk_triton(q, keys, KNN, cap=32)
    ref_scores, ref_ids = pk_topk_reference(q, keys, KNN)
    torch.testing.assert_close(scores, ref_scores, **FP32)
    others = torch.arange(q.shape[0], device=q.device) != 7
    assert (ids[others] == ref_ids[others]).float().mean() > 0.99  # ties aside
    assert torch.equal(ids[7], torch.arange(KNN, device="cuda").expand(H, KNN))


@pytest.mark.parametrize("D,dtype,dist", [(576, torch.bfloat16, "uniform"), (576, torch.bfloat16, "zipf"),
                                          (1024, torch.float32, "zipf")])
def test_weighted_bag_at_bench_widths(D, dtype, dist):
    g = _gen(2)
    T, N = 2048, N_KEYS**2
    values = (torch.randn(N, D, device="cuda", generator=g) * D**-0.5).to(dtype)
    ids = torch.randint(0, N, (T, H, KNN), device="cuda", generator=g) if dist == "uniform" else \
        _zipf((T, H, KNN), N, g)
    w = torch.softmax(torch.randn(T, H, KNN, device="cuda", generator=g), -1)
    grad_out = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    tol = BF16 if dtype == torch.bfloat16 else FP32
    torch.testing.assert_close(kernels.weighted_bag(values, ids, w, backend="triton").float(),
                               weighted_bag_reference(values, ids, w).float(), **tol)
    uniq, rows, grad_w = kernels.weighted_bag_backward(values, ids, w, grad_out, backend="triton")
    ref_uniq, ref_rows, ref_grad_w = weighted_bag_backward_reference(values, ids, w, grad_out)
    assert torch.equal(uniq, ref_uniq)
    torch.testing.assert_close(rows, ref_rows, **FP32)
    torch.testing.assert_close(grad_w, ref_grad_w, **tol)
    # the dense autograd path, twice: bitwise the same
    runs = []
    for _ in range(2):
        v = values.clone().requires_grad_()
        kernels.weighted_bag(v, ids, w, backend="triton").backward(grad_out)
        runs.append(v.grad)
    assert torch.equal(runs[0], runs[1])
    dense = torch.zeros(N, D, device="cuda")
    dense[ref_uniq] = ref_rows
    torch.testing.assert_close(runs[0].float(), dense, **tol)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_adam_skewed_ids(state_dtype):
    g = _gen(3)
    T, N, D = 2048, N_KEYS**2, 576
    values = (torch.randn(N, D, device="cuda", generator=g) * 0.02).bfloat16()
    ids = _zipf((T, H, KNN), N, g)
    w = torch.softmax(torch.randn(T, H, KNN, device="cuda", generator=g), -1)
    grad_out = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    state = (torch.zeros(N, D, device="cuda", dtype=state_dtype), torch.zeros(N, D, device="cuda", dtype=state_dtype),
             torch.zeros(N, dtype=torch.int64, device="cuda"))
    ours, ours_state = values.clone(), [s.clone() for s in state]
    grad_w, rows = kernels.weighted_bag_backward_adam_(ours, *ours_state, ids, w, grad_out, 1e-3, backend="triton")
    again, again_state = values.clone(), [s.clone() for s in state]
    kernels.weighted_bag_backward_adam_(again, *again_state, ids, w, grad_out, 1e-3, backend="triton")
    assert torch.equal(ours, again) and all(torch.equal(a, b) for a, b in zip(ours_state, again_state))
    ref_rows, ref_row_grads, ref_grad_w = weighted_bag_backward_reference(values, ids, w, grad_out)
    ref, ref_state = values.clone(), [s.clone() for s in state]
    sparse_adam_reference(ref, *ref_state, ref_rows, ref_row_grads, 1e-3)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(grad_w, ref_grad_w, **BF16)
    torch.testing.assert_close(ours.float(), ref.float(), **BF16)
    untouched = torch.ones(N, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert torch.equal(ours[untouched], values[untouched])
    assert all(torch.equal(a[untouched], b[untouched]) for a, b in zip(ours_state, state))


def test_sparse_adam_leaves_other_rows_bitwise_equal():
    N, D = 1 << 20, 576
    table = torch.randn(N, D, device="cuda")
    before = table.clone()
    m, v, step = torch.zeros_like(table), torch.zeros_like(table), torch.zeros(N, dtype=torch.long, device="cuda")
    rows = torch.randperm(N, device="cuda")[:5000].sort().values
    kernels.sparse_adam_(table, m, v, step, rows, torch.randn(len(rows), D, device="cuda"), 1e-3, backend="triton")
    untouched = torch.ones(N, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert torch.equal(table[untouched], before[untouched])
    assert not torch.equal(table[rows], before[rows])
