"""slotwise.kernels: the shared memory ops, each a PyTorch reference (the spec) plus a Triton kernel.

Public ops (every one takes backend="auto" | "triton" | "torch", see _dispatch.py):

  pk_topk(query, keys, knn)            product-key top-k -> (scores, slot ids); scores are
                                       differentiable in query and keys
  weighted_bag(values, ids, weights)   softmax-weighted sum of value rows -> (T, D); gradients
                                       to values (dense, or sparse_grad=True) and weights
  weighted_bag_backward(...)           its backward as (unique row ids, row grads, grad weights)
  weighted_bag_backward_sgd_/_adam_    that backward fused with the optimizer step on the rows
  slot_histogram(ids, n_slots, mask)   per-slot access counts and per-batch presence
  sparse_sgd_(...), sparse_adam_(...)  optimizer steps that touch only the given rows
  chapter_cross_attention(q, keys,     routed chapter cross-attention (Mixture of Chapters): one
      values, offsets, chapters,       softmax per chapter read straight from the bank, outputs
      weights, CT)                     mixed by router weights; gradients to q, bank rows, weights
                                       (not named chapter_attention: that is its Triton module)
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend, triton_available
from .chapter_attention_reference import chapter_accesses, chapter_attention_reference
from .embedding_bag_reference import weighted_bag_backward_reference, weighted_bag_reference
from .histogram_reference import slot_histogram_reference
from .product_key_reference import pk_topk_bruteforce, pk_topk_reference
from .sparse_update_reference import sparse_adam_reference, sparse_sgd_reference

__all__ = [
    "pk_topk",
    "weighted_bag",
    "weighted_bag_backward",
    "weighted_bag_backward_sgd_",
    "weighted_bag_backward_adam_",
    "slot_histogram",
    "sparse_sgd_",
    "sparse_adam_",
    "chapter_cross_attention",
    "chapter_attention_reference",
    "chapter_accesses",
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


def pk_topk(query: torch.Tensor, keys: torch.Tensor, knn: int, backend: str = "auto",
            tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """query (T, H, K), keys (H, 2, n_keys, K/2) -> scores (T, H, knn), slot ids (T, H, knn) int64.

    The search runs without autograd (a selection); the scores of the chosen slots are then
    recomputed from the gathered sub-keys, which is exact and carries gradients to query and keys.
    tf32: let the Triton search score fp32 inputs with TF32 (faster; near-ties may differ).
    """
    with torch.no_grad():
        if resolve_backend(backend, query, keys) == "triton":
            from .product_key import pk_topk_triton

            _, ids = pk_topk_triton(query, keys, knn, tf32=tf32)
        else:
            _, ids = pk_topk_reference(query, keys, knn)
    return _half_key_scores(query.float(), keys.float(), ids), ids


def weighted_bag(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str = "auto",
                 sparse_grad: bool = False, deterministic: bool = False) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D): sum_hk weights * values[ids].

    sparse_grad: values.grad is a sparse COO tensor of the touched rows (what the sparse
    optimizers want at N ~ 1M) instead of a dense (N, D) one. deterministic: Triton's dense
    gradient sums each row in a fixed order (sorted segments) instead of with atomic adds.
    """
    if resolve_backend(backend, values, ids, weights) == "triton":
        from .embedding_bag import weighted_bag_triton

        return weighted_bag_triton(values, ids, weights, sparse_grad=sparse_grad, deterministic=deterministic)
    return weighted_bag_reference(values, ids, weights, sparse_grad=sparse_grad)


def weighted_bag_backward(values, ids, weights, grad_out, backend: str = "auto"):
    """The weighted bag's backward, sparse and deterministic on both paths:
    -> (unique row ids (U,), row grads (U, D) fp32, grad weights (T, H, knn) fp32)."""
    if resolve_backend(backend, values, ids, weights, grad_out) == "triton":
        from .embedding_bag import weighted_bag_backward_triton

        return weighted_bag_backward_triton(values, ids, weights, grad_out)
    return weighted_bag_backward_reference(values, ids, weights, grad_out)


def weighted_bag_backward_sgd_(values, ids, weights, grad_out, lr: float, backend: str = "auto"):
    """Backward fused with an in-place SGD step on the touched rows of values.

    -> (grad weights (T, H, knn) fp32, from the values before the step; unique row ids (U,)).
    """
    if resolve_backend(backend, values, ids, weights, grad_out) == "triton":
        from .sparse_update import weighted_bag_backward_sgd_triton

        return weighted_bag_backward_sgd_triton(values, ids, weights, grad_out, lr)
    rows, row_grads, grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
    sparse_sgd_reference(values, rows, row_grads, lr)
    return grad_w, rows


def weighted_bag_backward_adam_(values, exp_avg, exp_avg_sq, step, ids, weights, grad_out, lr, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, backend: str = "auto"):
    """Backward fused with an in-place lazy Adam step on the touched rows (state as in sparse_adam_).

    -> (grad weights (T, H, knn) fp32, from the values before the step; unique row ids (U,)).
    """
    if resolve_backend(backend, values, ids, weights, grad_out) == "triton":
        from .sparse_update import weighted_bag_backward_adam_triton

        return weighted_bag_backward_adam_triton(values, exp_avg, exp_avg_sq, step, ids, weights, grad_out, lr,
                                                 beta1, beta2, eps, weight_decay)
    rows, row_grads, grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
    sparse_adam_reference(values, exp_avg, exp_avg_sq, step, rows, row_grads, lr, beta1, beta2, eps, weight_decay)
    return grad_w, rows


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


def chapter_cross_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                      chapters: torch.Tensor, weights: torch.Tensor, chapter_tokens: int, scale: float | None = None,
                      max_seg_len: int | None = None, sparse_grad: bool = False, backend: str = "auto") -> torch.Tensor:
    """q (T, H, M), keys/values (N, M) bank rows (may be one tensor), offsets (R + 1,) token segments,
    chapters (R, C) int64 (-1 = empty), weights (R, C) -> out (T, H, M); see chapter_attention_reference.

    max_seg_len: the longest segment, when the caller knows it (saves a device-to-host sync).
    sparse_grad: the bank's gradient is a sparse COO tensor of the rows of the chapters read.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolve_backend(backend, q, keys, values, offsets, chapters, weights) == "triton":
        from .chapter_attention import chapter_attention_triton

        return chapter_attention_triton(q, keys, values, offsets, chapters, weights, chapter_tokens, scale,
                                        max_seg_len, sparse_grad)
    return chapter_attention_reference(q, keys, values, offsets, chapters, weights, chapter_tokens, scale, sparse_grad)
