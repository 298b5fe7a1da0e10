"""Product-key top-k's gradients: an exact custom backward for the Triton search.

The kernel returns fp32 scores s[t, h, k] = q1[t, h] . k1[h, i] + q2[t, h] . k2[h, j] of the chosen
slots (id = i * n_keys + j) and, optionally, the sub-key usage (mean over tokens of each half's
softmax over its sub-keys). Nothing is recomputed to differentiate the scores:

    grad_q[t, h, half] = sum_k g[t, h, k] * sub_key[h, half, i_half(k)]   a weighted-bag forward
    grad_keys[h, half, n] = sum_(t, k: i_half(k) = n) g[t, h, k] * q_half[t, h]
                                                         that bag's sorted-run backward
over the sub-key table keys.view(H * 2 * n_keys, K / 2), one "token" per (t, h, half): the same
deterministic kernels as the value pool's (no atomics, no dense (T, n_keys) gradient matrix). The
usage's gradient recomputes the scores block by block in PyTorch (a dense softmax backward).
"""
from __future__ import annotations

import torch

from .product_key import pk_topk_triton


def pk_topk_backward_triton(query: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, grad_scores: torch.Tensor,
                            chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gradients of scores[t, h, k] = q1 . k1[i] + q2 . k2[j] (slot ids[t, h, k] = i * n_keys + j)
    -> (grad query (T, H, K) fp32, grad keys (H, 2, n_keys, K // 2) fp32)."""
    from .weighted_bag_triton import weighted_bag_backward_dense_triton, weighted_bag_forward_triton

    T, H, K = query.shape
    n_keys, half = keys.shape[2], K // 2
    i, j = ids // n_keys, ids % n_keys  # (T, H, knn) each
    base = (torch.arange(H, device=ids.device) * 2 * n_keys).view(1, H, 1)
    sub = torch.stack([base + i, base + n_keys + j], dim=2)  # (T, H, 2, knn) rows of the sub-key table
    table = keys.reshape(H * 2 * n_keys, half)
    bag_ids = sub.view(T * H * 2, 1, -1)
    bag_w = grad_scores.float().unsqueeze(2).expand(T, H, 2, -1).reshape(T * H * 2, 1, -1)
    grad_q = weighted_bag_forward_triton(table, bag_ids, bag_w, out_dtype=torch.float32)  # (T*H*2, K/2)
    grad_k, _ = weighted_bag_backward_dense_triton(table, bag_ids, bag_w, query.reshape(T * H * 2, half),
                                                   need_grad_w=False, chunk=chunk)
    return grad_q.view(T, H, K), grad_k.view(keys.shape)


def usage_backward(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, grad_usage: torch.Tensor,
                   block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of usage = mean_t softmax_n(q_half[t] . k[n]) from the saved lse, recomputing the
    scores block by block in PyTorch -> (grad query (T, H, K) fp32, grad keys fp32)."""
    T, H, K = query.shape
    q = query.float().view(T, H, 2, K // 2)
    k = keys.float()
    c = grad_usage.float() / T  # (H, 2, n_keys)
    grad_q = torch.empty(T, H, 2, K // 2, device=query.device)
    grad_k = torch.zeros_like(k)
    for t0 in range(0, T, block):
        qb = q[t0:t0 + block]  # (B, H, 2, K/2)
        p = torch.exp(torch.einsum("thsd,hsnd->thsn", qb, k) - lse[t0:t0 + block, :, :, None])  # (B, H, 2, n)
        ds = p * (c - (p * c).sum(-1, keepdim=True))
        grad_q[t0:t0 + block] = torch.einsum("thsn,hsnd->thsd", ds, k)
        grad_k += torch.einsum("thsn,thsd->hsnd", ds, qb)
    return grad_q.view(T, H, K), grad_k


class _PKTopK(torch.autograd.Function):
    """The search as a differentiable op: scores (and usage) carry exact gradients to query and keys."""

    @staticmethod
    def forward(ctx, query, keys, knn: int, tf32: bool, usage: bool):
        out = pk_topk_triton(query, keys, knn, tf32=tf32, usage=usage)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out[1])
        ctx.save_for_backward(query, keys, out[1], out[3] if usage else None)
        return out[:3]

    @staticmethod
    def backward(ctx, grad_scores, _grad_ids, grad_usage=None):
        query, keys, ids, lse = ctx.saved_tensors
        grads = []
        if grad_scores is not None:
            grads.append(pk_topk_backward_triton(query, keys, ids, grad_scores))
        if grad_usage is not None:
            grads.append(usage_backward(query, keys, lse, grad_usage))
        if not grads:
            return None, None, None, None, None
        grad_q = sum(g[0] for g in grads)
        grad_k = sum(g[1] for g in grads)
        return grad_q.to(query.dtype), grad_k.to(keys.dtype), None, None, None


def pk_topk_autograd(query: torch.Tensor, keys: torch.Tensor, knn: int, tf32: bool = False, usage: bool = False):
    """-> (scores, ids) or, with usage, (scores, ids, usage); differentiable in query and keys."""
    return _PKTopK.apply(query, keys, knn, tf32, usage)
