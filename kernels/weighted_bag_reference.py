"""Weighted embedding bag, the PyTorch reference.

out[t] = sum_{h, k} weights[t, h, k] * values[ids[t, h, k]]: every head's knn value rows,
softmax-weighted, summed into one row of width D. Accumulation is fp32 whatever the value dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_bag_reference(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                           sparse_grad: bool = False) -> torch.Tensor:
    """values (N, D), ids (T, H, knn) int, weights (T, H, knn) -> (T, D) in values' dtype.

    Differentiable in values (dense gradient, or sparse COO with sparse_grad) and weights.
    """
    if sparse_grad:
        return _SparseGradBag.apply(values, ids, weights)
    T = ids.shape[0]
    flat_ids = ids.reshape(T, -1)
    flat_w = weights.reshape(T, -1)
    out = F.embedding_bag(flat_ids, values.float(), per_sample_weights=flat_w.float(), mode="sum")
    return out.to(values.dtype)


class _SparseGradBag(torch.autograd.Function):
    """The same op with values' gradient as a coalesced sparse COO tensor of the touched rows."""

    @staticmethod
    def forward(ctx, values, ids, weights):
        ctx.save_for_backward(values, ids, weights)
        with torch.no_grad():
            return weighted_bag_reference(values, ids, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, ids, weights = ctx.saved_tensors
        uniq, rows, grad_w = weighted_bag_backward_reference(values, ids, weights, grad_out)
        grad_values = torch.sparse_coo_tensor(uniq.unsqueeze(0), rows.to(values.dtype), values.shape,
                                              is_coalesced=True, check_invariants=False)
        return grad_values, None, grad_w.to(weights.dtype)


def weighted_bag_backward_reference(
    values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse gradient of weighted_bag: (unique row ids (U,), row grads (U, D) fp32, grad weights (T, H, knn) fp32)."""
    T, H, knn = ids.shape
    g = grad_out.float()
    grad_w = weighted_bag_grad_weights_reference(values, ids, g)
    uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    contrib = weights.float().reshape(T, H * knn, 1) * g.unsqueeze(1)  # (T, H*knn, D)
    row_grads = torch.zeros(uniq.numel(), values.shape[1], dtype=torch.float32, device=values.device)
    row_grads.index_add_(0, inverse, contrib.reshape(T * H * knn, -1))
    return uniq, row_grads, grad_w


def weighted_bag_grad_weights_reference(values: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d out / d weights[t, h, k] = values[ids[t, h, k]] . grad_out[t] -> (T, H, knn) fp32."""
    return torch.einsum("thkd,td->thk", values[ids].float(), grad_out.float())
