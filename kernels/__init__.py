"""slotwise.kernels: the shared memory ops, each a PyTorch reference (the spec) plus a Triton kernel.

Public ops (every one takes backend="auto" | "triton" | "torch", see _dispatch.py):

  pk_topk(query, keys, knn)            product-key top-k -> (scores, slot ids[, sub-key usage]);
                                       scores and usage are differentiable in query and keys
  weighted_bag(values, ids, weights)   softmax-weighted sum of value rows -> (T, D); gradients
                                       to values (dense, or sparse_grad=True) and weights
  weighted_bag_backward(...)           its backward as (unique row ids, row grads, grad weights)
  weighted_bag_backward_sgd_ / _adam_ / _rowwise_adagrad_
                                       that backward fused with the optimizer step on the rows
  DeferredBagGrads                     weighted_bag(..., defer=sink): grad weights during backward,
                                       the pool's fused step once after it (a pool shared by layers)
  slot_histogram(ids, n_slots, mask)   per-slot access counts and per-batch presence
  sparse_sgd_, sparse_adam_, sparse_rowwise_adagrad_
                                       optimizer steps that touch only the given rows
  chapter_cross_attention(q, keys,     routed chapter cross-attention (Mixture of Chapters): one
      values, offsets, chapters,       softmax per chapter read straight from the bank, outputs
      weights, CT)                     mixed by router weights; gradients to q, bank rows, weights
                                       (not named chapter_attention: that is its Triton module)
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend, triton_available
from .chapter_attention_reference import chapter_accesses, chapter_attention_reference
from .deferred import DeferredBagGrads, deferred_weighted_bag
from .weighted_bag_reference import weighted_bag_backward_reference, weighted_bag_reference
from .histogram_reference import slot_histogram_reference
from .product_key_reference import pk_topk_bruteforce, pk_topk_reference
from .sparse_update_reference import (
    sparse_adam_reference,
    sparse_rowwise_adagrad_reference,
    sparse_sgd_reference,
)

__all__ = [
    "pk_topk",
    "weighted_bag",
    "weighted_bag_backward",
    "weighted_bag_backward_sgd_",
    "weighted_bag_backward_adam_",
    "weighted_bag_backward_rowwise_adagrad_",
    "slot_histogram",
    "sparse_sgd_",
    "sparse_adam_",
    "sparse_rowwise_adagrad_",
    "DeferredBagGrads",
    "chapter_cross_attention",
    "chapter_attention_reference",
    "chapter_accesses",
    "pk_topk_reference",
    "pk_topk_bruteforce",
    "triton_available",
]


def pk_topk(query: torch.Tensor, keys: torch.Tensor, knn: int, backend: str = "auto", tf32: bool = False,
            usage: bool = False):
    """query (T, H, K), keys (H, 2, n_keys, K/2) -> scores (T, H, knn) fp32, slot ids (T, H, knn) int64;
    with usage=True also usage (H, 2, n_keys): the mean over tokens of the softmax over sub-keys,
    the statistic of the sub-key balancing loss, from the same pass on the Triton path.

    Scores (and usage) are differentiable in query and keys: on the Triton path by an exact custom
    backward (no recomputed scores), on the torch path by autograd through the reference search.
    tf32: let the Triton search score fp32 inputs with TF32 (faster; near-ties may differ).
    """
    if resolve_backend(backend, query, keys) == "triton":
        from .product_key_grad import pk_topk_autograd

        return pk_topk_autograd(query, keys, knn, tf32=tf32, usage=usage)
    return pk_topk_reference(query, keys, knn, usage=usage)


def weighted_bag(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str = "auto",
                 sparse_grad: bool = False, defer: DeferredBagGrads | None = None) -> torch.Tensor:
    """values (N, D), ids (T, H, knn), weights (T, H, knn) -> (T, D): sum_hk weights * values[ids].

    sparse_grad: values.grad is a sparse COO tensor of the touched rows (what the sparse
    optimizers want at N ~ 1M) instead of a dense (N, D) one. The Triton backward is deterministic.
    defer: values get no gradient; the backward records (ids, weights, grad_out) there for one fused
    backward + step after loss.backward() (deferred.py: a pool shared by several layers).
    """
    if defer is not None:
        return deferred_weighted_bag(values, ids, weights, defer, backend)
    if resolve_backend(backend, values, ids, weights) == "triton":
        from .weighted_bag_triton import weighted_bag_triton

        return weighted_bag_triton(values, ids, weights, sparse_grad=sparse_grad)
    return weighted_bag_reference(values, ids, weights, sparse_grad=sparse_grad)


def weighted_bag_backward(values, ids, weights, grad_out, backend: str = "auto"):
    """The weighted bag's backward, sparse and deterministic on both paths:
    -> (unique row ids (U,), row grads (U, D) fp32, grad weights (T, H, knn) fp32)."""
    if resolve_backend(backend, values, ids, weights, grad_out) == "triton":
        from .weighted_bag_triton import weighted_bag_backward_triton

        return weighted_bag_backward_triton(values, ids, weights, grad_out)
    return weighted_bag_backward_reference(values, ids, weights, grad_out)


def _backward_step(optimizer, values, state, ids, weights, grad_out, backend, row_mask, return_rows, need_grad_w,
                   **hyper):
    """Backward fused with an optimizer step on the touched rows (those in row_mask, if given)."""
    if resolve_backend(backend, values, ids, weights, grad_out) == "triton":
        from .sparse_update import weighted_bag_backward_step_triton

        return weighted_bag_backward_step_triton(optimizer, values, state, ids, weights, grad_out, row_mask=row_mask,
                                                 return_rows=return_rows, need_grad_w=need_grad_w, **hyper)
    rows, row_grads, grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
    if row_mask is not None:
        keep = row_mask[rows]
        rows, row_grads = rows[keep], row_grads[keep]
    lr = hyper.pop("lr")
    if optimizer == "sgd":
        sparse_sgd_reference(values, rows, row_grads, lr)
    elif optimizer == "adam":
        sparse_adam_reference(values, *state, rows, row_grads, lr, **hyper)
    else:
        sparse_rowwise_adagrad_reference(values, *state, rows, row_grads, lr, **hyper)
    return grad_w if need_grad_w else None, rows if return_rows else None


def weighted_bag_backward_sgd_(values, ids, weights, grad_out, lr: float, backend: str = "auto",
                               row_mask=None, return_rows: bool = True, need_grad_w: bool = True):
    """Backward fused with an in-place SGD step on the touched rows of values.

    -> (grad weights (T, H, knn) fp32, from the values before the step, or None with
    need_grad_w=False; stepped row ids (U,), or None with return_rows=False: then the Triton path
    never waits on the device). row_mask (N,) bool: step only those rows (the grad weights still
    cover every entry).
    """
    return _backward_step("sgd", values, (), ids, weights, grad_out, backend, row_mask, return_rows, need_grad_w,
                          lr=lr)


def weighted_bag_backward_adam_(values, exp_avg, exp_avg_sq, step, ids, weights, grad_out, lr, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, backend: str = "auto", row_mask=None,
                                return_rows: bool = True, need_grad_w: bool = True):
    """Backward fused with an in-place lazy Adam step on the touched rows (state as in sparse_adam_;
    exp_avg / exp_avg_sq fp32 or bf16). Returns and row_mask as in weighted_bag_backward_sgd_."""
    return _backward_step("adam", values, (exp_avg, exp_avg_sq, step), ids, weights, grad_out, backend, row_mask,
                          return_rows, need_grad_w, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay)


def weighted_bag_backward_rowwise_adagrad_(values, state_sum, ids, weights, grad_out, lr, eps=1e-8,
                                           weight_decay=0.0, backend: str = "auto", row_mask=None,
                                           return_rows: bool = True, need_grad_w: bool = True):
    """Backward fused with an in-place row-wise Adagrad step (state_sum (N,) fp32, one float per row:
    the optimizer state is 4 bytes a row instead of Adam's 8 per element). Returns as above."""
    return _backward_step("adagrad", values, (state_sum,), ids, weights, grad_out, backend, row_mask, return_rows,
                          need_grad_w, lr=lr, eps=eps, weight_decay=weight_decay)


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
        from .sparse_update import sparse_step_triton

        return sparse_step_triton("sgd", table, (), rows, grads, lr)
    return sparse_sgd_reference(table, rows, grads, lr)


def sparse_adam_(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, backend: str = "auto") -> None:
    """In place Adam on the given rows only, with lazy per-row state (see sparse_update_reference)."""
    if resolve_backend(backend, table, rows, grads) == "triton":
        from .sparse_update import sparse_step_triton

        return sparse_step_triton("adam", table, (exp_avg, exp_avg_sq, step), rows, grads, lr, beta1, beta2, eps,
                                  weight_decay)
    return sparse_adam_reference(table, exp_avg, exp_avg_sq, step, rows, grads, lr, beta1, beta2, eps, weight_decay)


def sparse_rowwise_adagrad_(table, state_sum, rows, grads, lr, eps=1e-8, weight_decay=0.0,
                            backend: str = "auto") -> None:
    """In place row-wise Adagrad on the given rows only (state_sum (N,) fp32; sparse_update_reference)."""
    if resolve_backend(backend, table, rows, grads) == "triton":
        from .sparse_update import sparse_step_triton

        return sparse_step_triton("adagrad", table, (state_sum,), rows, grads, lr, eps=eps, weight_decay=weight_decay)
    return sparse_rowwise_adagrad_reference(table, state_sum, rows, grads, lr, eps, weight_decay)


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
