"""slotwise.kernels: the shared memory ops, each a PyTorch reference (the spec) plus a Triton kernel.

Public ops (every one takes backend="auto" | "triton" | "torch", see _dispatch.py):

  pk_topk(query, keys, knn)            product-key top-k -> (scores, slot ids); scores are
                                       differentiable in query and keys
  weighted_bag(values, ids, weights)   softmax-weighted sum of value rows -> (T, D); gradients
                                       to values and weights
  slot_histogram(ids, n_slots, mask)   per-slot access counts and per-batch presence
  sparse_sgd_(...), sparse_adam_(...)  optimizer steps that touch only the given rows
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend, triton_available
from .embedding_bag_reference import weighted_bag_reference
from .histogram_reference import slot_histogram_reference
from .product_key_reference import pk_topk_bruteforce, pk_topk_reference
from .sparse_update_reference import sparse_adam_reference, sparse_sgd_reference

__all__ = [
    "pk_topk",
    "weighted_bag",
    "slot_histogram",
    "sparse_sgd_",
    "sparse_adam_",
    "pk_topk_reference",
    "pk_topk_bruteforce",
    "triton_available",
]


def _half_key_scores(query: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Differentiable scores of chosen slots: q1 . k1[i] + q2 . k2[j] for slot id = i * n_keys + j."""
    T, H, K = query.shape
    n_keys = keys.shape[2]
    q = query.view(T, H, 2, K // 2)
    i, j = ids // n_keys, ids % n_keys  # (T, H, knn)
    h = torch.arange(H, device=ids.device).view(1, H, 1)
    k1 = keys[h, 0, i]  # (T, H, knn, K/2)
    k2 = keys[h, 1, j]
    return torch.einsum("thd,thkd->thk", q[:, :, 0], k1) + torch.einsum("thd,thkd->thk", q[:, :, 1], k2)


def pk_topk(query: torch.Tensor, keys: torch.Tensor, knn: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """query (T, H, K), keys (H, 2, n_keys, K/2) -> scores (T, H, knn), slot ids (T, H, knn) int64.

    The search runs without autograd (a selection); the scores of the chosen slots are then
    recomputed from the gathered sub-keys, which is exact and carries gradients to query and keys.
    """
    with torch.no_grad():
        if resolve_backend(backend, query, keys) == "triton":
            from .product_key import pk_topk_triton

            _, ids = pk_topk_triton(query, keys, knn)
        else:
            _, ids = pk_topk_reference(query, keys, knn)
    return _half_key_scores(query.float(), keys.float(), ids), ids


def weighted_bag(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D): sum_hk weights * values[ids]."""
    if resolve_backend(backend, values, ids, weights) == "triton":
        from .embedding_bag import weighted_bag_triton

        return weighted_bag_triton(values, ids, weights)
    return weighted_bag_reference(values, ids, weights)


def slot_histogram(
    ids: torch.Tensor, n_slots: int, mask: torch.Tensor | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, ...) and mask (T,) (False = padding) -> counts (n_slots,) int64, presence (n_slots,) bool."""
    if resolve_backend(backend, ids) == "triton":
        from .histogram import slot_histogram_triton

        return slot_histogram_triton(ids, n_slots, mask)
    return slot_histogram_reference(ids, n_slots, mask)


def sparse_sgd_(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float, backend: str = "auto") -> None:
    """In place: table[rows] -= lr * grads; every other row is left bitwise unchanged."""
    if resolve_backend(backend, table, rows, grads) == "triton":
        from .sparse_update import sparse_sgd_triton

        return sparse_sgd_triton(table, rows, grads, lr)
    return sparse_sgd_reference(table, rows, grads, lr)


def sparse_adam_(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, backend: str = "auto") -> None:
    """In place Adam on the given rows only, with lazy per-row state (see sparse_update_reference)."""
    if resolve_backend(backend, table, rows, grads) == "triton":
        from .sparse_update import sparse_adam_triton

        return sparse_adam_triton(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1, beta2, eps, weight_decay)
    return sparse_adam_reference(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1, beta2, eps, weight_decay)
