"""Defer a value pool's update to after the backward: one fused step per pool, all layers' rows merged.

Inside loss.backward() a weighted bag must hand back its weights' gradient at once (it flows on to
the scores, the queries, the model), but the pool it reads should be stepped only once every layer
reading it has been differentiated: several layers share one pool (the 1M-slot setup), and a step
inside one layer's backward would change rows another layer has yet to differentiate through, and
step a row once per layer. With defer=DeferredBagGrads() the bag's backward computes only the
grad weights and records (ids, weights, grad_out); after the backward, take() concatenates every
record along tokens and one fused backward + step updates each touched row once:

    sink = DeferredBagGrads()
    y = kernels.weighted_bag(pool, ids, w, defer=sink)   # in every layer that reads the pool
    loss.backward()                                      # grad weights flow on; pool.grad stays None
    kernels.weighted_bag_backward_adam_(pool, m, v, step, *sink.take(), lr, need_grad_w=False)

The price against a single layer's fully fused backward: the grad weights are a separate gather of
the M read rows (weighted_bag's grad-weights kernel) instead of coming from the walk's loads.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .weighted_bag_reference import weighted_bag_grad_weights_reference, weighted_bag_reference


class DeferredBagGrads:
    """The (ids, weights, grad_out) of every deferred weighted bag since the last take()."""

    def __init__(self):
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor) -> None:
        self._parts.append((ids, weights, grad_out))

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (ids (sum T, H, knn), weights (sum T, H, knn), grad_out (sum T, D)), and forget them."""
        if not self._parts:
            raise ValueError("DeferredBagGrads.take(): nothing recorded (was backward run on a deferred bag?)")
        shapes = {p[0].shape[1:] for p in self._parts}
        if len(shapes) > 1:
            raise ValueError(f"deferred bags of one pool must read as many slots per token; got {sorted(shapes)}")
        parts, self._parts = self._parts, []
        return tuple(torch.cat(xs) for xs in zip(*parts))


class _DeferredBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, ids, weights, sink: DeferredBagGrads, backend: str):
        ctx.save_for_backward(values, ids, weights)
        ctx.sink, ctx.backend = sink, backend
        if backend == "triton":
            from .weighted_bag_triton import weighted_bag_forward_triton

            return weighted_bag_forward_triton(values, ids, weights)
        with torch.no_grad():
            return weighted_bag_reference(values, ids, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, ids, weights = ctx.saved_tensors
        ctx.sink.add(ids, weights.detach(), grad_out)
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None
        if ctx.backend == "triton":
            from .weighted_bag_triton import weighted_bag_grad_weights_triton

            grad_w = weighted_bag_grad_weights_triton(values, ids, grad_out)
        else:
            grad_w = weighted_bag_grad_weights_reference(values, ids, grad_out)
        return None, None, grad_w.to(weights.dtype), None, None


def deferred_weighted_bag(values, ids, weights, sink: DeferredBagGrads, backend: str = "auto") -> torch.Tensor:
    """weighted_bag whose values get no gradient: the backward records into `sink` instead."""
    return _DeferredBag.apply(values, ids, weights, sink, resolve_backend(backend, values, ids, weights))
