"""Product-key top-k, the PyTorch reference (the spec the Triton kernel must match).

A query of width k_dim is split into two halves; each half is scored against its own
n_keys sub-keys. Slot (i, j) of the N = n_keys**2 slots scores s1[i] + s2[j]. The top-knn
slots are always among the knn x knn sums of each half's top-knn, so that search is exact.
"""
from __future__ import annotations

import torch


def pk_topk_reference(query: torch.Tensor, keys: torch.Tensor, knn: int, usage: bool = False):
    """query (T, H, K), keys (H, 2, n_keys, K // 2) -> scores (T, H, knn) fp32, slot ids (T, H, knn) int64
    (and with usage=True the sub-key usage (H, 2, n_keys), see sub_key_usage_reference, from the same scores).

    Scores are sorted in descending order; slot id = i * n_keys + j. Differentiable (autograd
    through the two top-ks and the gathers).
    """
    T, H, K = query.shape
    n_keys = keys.shape[2]
    if keys.shape != (H, 2, n_keys, K // 2) or K % 2:
        raise ValueError(f"keys must be (H={H}, 2, n_keys, {K // 2}) for query {tuple(query.shape)}, got {tuple(keys.shape)}")
    if knn > n_keys:
        raise ValueError(f"knn={knn} exceeds n_keys={n_keys}")
    q = query.float().view(T, H, 2, K // 2)
    # (T, H, 2, n_keys): each half against its own sub-keys
    half_scores = torch.einsum("thsd,hsnd->thsn", q, keys.float())
    s1, i1 = half_scores[:, :, 0].topk(knn, dim=-1)  # (T, H, knn)
    s2, i2 = half_scores[:, :, 1].topk(knn, dim=-1)
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(T, H, knn * knn)  # (T, H, knn*knn)
    cand_ids = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).view(T, H, knn * knn)
    scores, best = cand.topk(knn, dim=-1)
    if usage:
        return scores, cand_ids.gather(-1, best), half_scores.softmax(dim=-1).mean(dim=0)
    return scores, cand_ids.gather(-1, best)


def pk_topk_bruteforce(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-knn over all N slots, materialising every score: a test oracle for small N only."""
    T, H, K = query.shape
    n_keys = keys.shape[2]
    q = query.float().view(T, H, 2, K // 2)
    half_scores = torch.einsum("thsd,hsnd->thsn", q, keys.float())
    full = (half_scores[:, :, 0].unsqueeze(-1) + half_scores[:, :, 1].unsqueeze(-2)).view(T, H, n_keys * n_keys)
    return full.topk(knn, dim=-1)


def sub_key_usage_reference(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of each half-query's softmax over its sub-keys -> (H, 2, n_keys) fp32.

    The statistic of the sub-key balancing loss (KL(usage || uniform)); differentiable.
    """
    T, H, K = query.shape
    scores = torch.einsum("thsd,hsnd->thsn", query.float().view(T, H, 2, K // 2), keys.float())  # (T, H, 2, n)
    return scores.softmax(dim=-1).mean(dim=0)
