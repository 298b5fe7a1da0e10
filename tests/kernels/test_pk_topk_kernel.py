"""Product-key top-k: the threshold-and-prune Triton search against the reference and the brute-force oracle."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import pk_topk, pk_topk_bruteforce, pk_topk_reference
from slotwise.kernels.product_key_reference import sub_key_usage_reference

# (tokens, heads, k_dim, n_keys, knn): awkward sizes; n_keys 40 streams three blocks of 16 sub-keys
SHAPES = [(9, 3, 10, 13, 5), (17, 2, 24, 40, 8)]


def _inputs(shape, dtype, device, seed=None):
    T, H, K, n_keys, knn = shape
    g = torch.Generator().manual_seed(sum(shape) if seed is None else seed)
    query = torch.randn(T, H, K, generator=g).to(dtype).to(device)
    keys = torch.randn(H, 2, n_keys, K // 2, generator=g).to(dtype).to(device)
    return query, keys, knn


def _true_scores(query, keys, ids):
    """fp64 score of each chosen slot, from the full score table (the oracle for ties)."""
    T, H, K = query.shape
    n_keys = keys.shape[2]
    q = query.double().view(T, H, 2, K // 2)
    half = torch.einsum("thsd,hsnd->thsn", q, keys.double())  # (T, H, 2, n_keys)
    full = (half[:, :, 0].unsqueeze(-1) + half[:, :, 1].unsqueeze(-2)).reshape(T, H, n_keys * n_keys)
    return full.gather(-1, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pk_topk_and_usage_match_reference(device, close, dtype, shape):
    from slotwise.kernels.product_key import pk_topk_triton

    query, keys, knn = _inputs(shape, dtype, device)
    scores, ids, usage, lse = pk_topk_triton(query, keys, knn, usage=True, block_n=16)
    ref_scores, ref_ids, ref_usage = pk_topk_reference(query, keys, knn, usage=True)
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    close(scores, ref_scores, dtype)
    # ids identical, ties aside: where they differ, both slots must score the same
    differ = ids != ref_ids
    assert differ.float().mean() < 0.05, f"{int(differ.sum())} of {ids.numel()} ids differ"
    close(_true_scores(query, keys, ids)[differ], _true_scores(query, keys, ref_ids)[differ], dtype)
    # the kernel's scores are the scores of the ids it returns
    close(scores, _true_scores(query, keys, ids), dtype)
    close(usage, ref_usage)
    T, H, K = query.shape
    half_scores = torch.einsum("thsd,hsnd->thsn", query.float().view(T, H, 2, K // 2), keys.float())
    close(lse, half_scores.logsumexp(-1))


def test_pk_topk_bisection_fallback_is_exact(device, close):
    """With room for only 8 survivors most tokens overflow the cap: the bisection fallback must still
    find the true top-knn of all n_keys**2 slots."""
    from slotwise.kernels.product_key import pk_topk_triton

    query, keys, knn = _inputs((9, 2, 24, 40, 8), torch.float32, device, seed=1)
    scores, ids = pk_topk_triton(query, keys, knn, cap=8, block_n=16)
    bf_scores, bf_ids = pk_topk_bruteforce(query, keys, knn)
    close(scores, bf_scores)
    assert torch.equal(ids, bf_ids)


def test_pk_topk_all_ties(device):
    """A zero query ties every slot: every sub-key survives the bound (over the cap), the bisection
    runs to the end, and the tie rule (smaller index first) gives the knn smallest slot ids."""
    from slotwise.kernels.product_key import pk_topk_triton

    query, keys, knn = _inputs((5, 1, 10, 13, 5), torch.float32, device, seed=2)
    query[3] = 0.0
    scores, ids = pk_topk_triton(query, keys, knn, cap=8)
    assert torch.equal(scores[3], torch.zeros_like(scores[3]))
    assert torch.equal(ids[3], torch.arange(knn, device=device).expand(query.shape[1], knn))
    assert torch.equal(ids[4:], pk_topk_bruteforce(query[4:], keys, knn)[1])  # neighbours unaffected


@pytest.mark.parametrize("dtype,usage", [(torch.float32, True), (torch.bfloat16, False)])
def test_pk_topk_custom_backward(device, close, dtype, usage):
    """Exact custom backward (scores, and usage) against autograd through the reference search."""
    query, keys, knn = _inputs(SHAPES[0], dtype, device, seed=3)
    g = torch.Generator().manual_seed(4)
    grad_scores = torch.randn(*query.shape[:2], knn, generator=g).to(device)
    grad_usage = torch.randn(keys.shape[:3], generator=g).to(device)
    results = {}
    for backend in ("triton", "torch"):
        q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        out = pk_topk(q, k, knn, backend=backend, usage=usage)
        loss = (out[0] * grad_scores).sum() + ((out[2] * grad_usage).sum() if usage else 0)
        results[backend] = (*out[:1], *out[2:], *torch.autograd.grad(loss, (q, k)), out[1])
    assert torch.equal(results["triton"][-1], results["torch"][-1])
    for a, b in zip(results["triton"][:-1], results["torch"][:-1]):
        assert a.dtype == b.dtype
        close(a, b, dtype)


def test_usage_reference_is_the_mean_softmax():
    q = torch.randn(6, 2, 8)
    keys = torch.randn(2, 2, 5, 4)
    usage = sub_key_usage_reference(q, keys)
    assert usage.shape == (2, 2, 5)
    torch.testing.assert_close(usage.sum(-1), torch.ones(2, 2))
    s00 = q[:, 0, :4] @ keys[0, 0].T  # head 0, half 0
    torch.testing.assert_close(usage[0, 0], s00.softmax(-1).mean(0))


def test_pruned_pairs_are_the_dominance_frontier():
    from slotwise.kernels.product_key import pruned_pairs

    a, b, n = pruned_pairs(32, "cpu")
    assert n == 119 and a.numel() == 128  # 119 candidates instead of 32 * 32 = 1,024
    assert all((x + 1) * (y + 1) <= 32 for x, y in zip(a[:n].tolist(), b[:n].tolist()))


def test_pk_topk_rejects_bad_shapes(device):
    from slotwise.kernels.product_key import pk_topk_triton

    with pytest.raises(ValueError, match="knn"):
        pk_topk_triton(torch.randn(2, 1, 4, device=device), torch.randn(1, 2, 3, 2, device=device), 5)
    with pytest.raises(ValueError, match="keys must be"):
        pk_topk_triton(torch.randn(2, 1, 4, device=device), torch.randn(2, 2, 3, 2, device=device), 2)
