"""The compiled Triton kernels on a real GPU against their PyTorch references, at benchmark-like shapes.

    make test-gpu        # = TRITON_INTERPRET=0 pytest -m gpu tests/gpu

Skipped without CUDA. (The CPU suite checks the same kernels under TRITON_INTERPRET=1 on small shapes.)
"""
import os

import pytest
import torch

from slotwise import kernels
from slotwise.kernels.weighted_bag_reference import weighted_bag_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 to test compiled kernels"),
]


@pytest.mark.parametrize("n_keys,D,dtype", [(128, 896, torch.bfloat16), (1024, 576, torch.bfloat16), (1024, 1024, torch.float32)])
def test_lookup_and_bag_match_reference(n_keys, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, K, knn = 2048, 4, 256, 32
    q = torch.randn(T, H, K, device="cuda", generator=g)
    keys = torch.randn(H, 2, n_keys, K // 2, device="cuda", generator=g)
    s_ref, i_ref = kernels.pk_topk(q, keys, knn, backend="torch")
    s_tri, i_tri = kernels.pk_topk(q, keys, knn, backend="triton")
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-4, atol=1e-4)
    assert (i_tri == i_ref).float().mean() > 0.999  # ties aside
    values = (torch.randn(n_keys**2, D, device="cuda", generator=g) * D**-0.5).to(dtype).requires_grad_()
    w = s_ref.softmax(-1).to(dtype).requires_grad_()
    out = kernels.weighted_bag(values, i_ref, w, backend="triton")
    ref_values = values.detach().clone().requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    ref = weighted_bag_reference(ref_values, i_ref, ref_w)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(values.grad.float(), ref_values.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), ref_w.grad.float(), **tol)


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
