"""Product-key top-k: the fused Triton search against the reference and the brute-force oracle."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import pk_topk, pk_topk_bruteforce, pk_topk_reference

# (tokens, heads, k_dim, n_keys, knn): awkward sizes; n_keys 40 with block_n 16 streams 3 key blocks
SHAPES = [(9, 3, 10, 13, 5), (17, 2, 24, 40, 8)]


def _true_scores(query, keys, ids):
    """fp64 score of each chosen slot, from the full score table (the oracle for ties)."""
    T, H, K = query.shape
    n_keys = keys.shape[2]
    q = query.double().view(T, H, 2, K // 2)
    half = torch.einsum("thsd,hsnd->thsn", q, keys.double())  # (T, H, 2, n_keys)
    full = (half[:, :, 0].unsqueeze(-1) + half[:, :, 1].unsqueeze(-2)).reshape(T, H, n_keys * n_keys)
    return full.gather(-1, ids)


def _check_search(query, keys, knn, scores, ids, dtype, close):
    ref_scores, ref_ids = pk_topk_reference(query, keys, knn)
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    close(scores, ref_scores, dtype)
    # ids identical, ties aside: where they differ, both slots must score the same
    differ = ids != ref_ids
    assert differ.float().mean() < 0.05, f"{int(differ.sum())} of {ids.numel()} ids differ"
    close(_true_scores(query, keys, ids)[differ], _true_scores(query, keys, ref_ids)[differ], dtype)
    # and the kernel's own scores are the scores of the ids it returns
    close(scores, _true_scores(query, keys, ids), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pk_topk_matches_reference(device, close, dtype, shape):
    from slotwise.kernels.product_key import pk_topk_triton

    T, H, K, n_keys, knn = shape
    g = torch.Generator().manual_seed(sum(shape))
    query = torch.randn(T, H, K, generator=g).to(dtype).to(device)
    keys = torch.randn(H, 2, n_keys, K // 2, generator=g).to(dtype).to(device)
    scores, ids = pk_topk_triton(query, keys, knn, block_n=16)
    _check_search(query, keys, knn, scores, ids, dtype, close)


def test_pk_topk_is_exact_against_bruteforce(device, close):
    """The product-key search finds the true top-knn of all n_keys**2 slots."""
    from slotwise.kernels.product_key import pk_topk_triton

    g = torch.Generator().manual_seed(1)
    query = torch.randn(5, 2, 8, generator=g, device="cpu").to(device)
    keys = torch.randn(2, 2, 11, 4, generator=g).to(device)
    scores, ids = pk_topk_triton(query, keys, 4)
    bf_scores, bf_ids = pk_topk_bruteforce(query, keys, 4)
    close(scores, bf_scores)
    assert torch.equal(ids, bf_ids)


def test_pk_topk_public_op_gradients(device, close):
    """The public op recomputes the chosen scores in torch: gradients match the reference path."""
    g = torch.Generator().manual_seed(2)
    query = torch.randn(9, 3, 10, generator=g).to(device).requires_grad_()
    keys = torch.randn(3, 2, 13, 5, generator=g).to(device).requires_grad_()
    grad = torch.randn(9, 3, 5, generator=g).to(device)
    results = {}
    for backend in ("triton", "torch"):
        scores, ids = pk_topk(query, keys, 5, backend=backend)
        dq, dk = torch.autograd.grad(scores, (query, keys), grad)
        results[backend] = (scores, ids, dq, dk)
    assert torch.equal(results["triton"][1], results["torch"][1])
    for a, b in zip(results["triton"], results["torch"]):
        close(a, b)


def test_pk_topk_rejects_bad_shapes(device):
    from slotwise.kernels.product_key import pk_topk_triton

    with pytest.raises(ValueError, match="knn"):
        pk_topk_triton(torch.randn(2, 1, 4, device=device), torch.randn(1, 2, 3, 2, device=device), 5)
    with pytest.raises(ValueError, match="keys must be"):
        pk_topk_triton(torch.randn(2, 1, 4, device=device), torch.randn(2, 2, 3, 2, device=device), 2)
