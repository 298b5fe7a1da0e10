"""The value pools' backward fused with their update: no pool gradient, one step per pool after the backward.

Inside `deferred_reads(model, sinks)` every memory layer reads its value pool with
`defer=sinks[<pool>]` (kernels.DeferredBagGrads): the backward hands the bag's weights their
gradient as usual but leaves the pool's `.grad` None and records (ids, weights, grad_out) instead.
After `loss.backward()` one fused backward + step per pool (kernels.weighted_bag_backward_adam_ /
_sgd_) walks the rows every layer read and updates each once, so a pool shared by several layers
gets ONE step with all layers' rows merged, and no (N, D) gradient (or sparse COO one) is built.

    sinks = pool_sinks(model)
    opt = FusedSparseAdam(pools, sinks, lr=2e-3)       # the heal's SparseAdam, fused
    with deferred_reads(model, sinks):
        loss = model(**batch).loss
    loss.backward()
    opt.step()                                        # each pool: one fused backward + Adam step

Used by the heal on sparse pools (slotwise.training, train.loop.optim.fused_update) and by SMF
(slotwise.continual.smf, smf.fused_update). `auto` fuses on CUDA tensors (the Triton walk) and not
on CPU, where the PyTorch reference of the fused op is no faster than autograd + the sparse step
(scripts/bench_fused_cpu.py measures both). The choice itself is slotwise.schema.FusedUpdate.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from slotwise import kernels
from slotwise.memory import ProductKeyMemory
from slotwise.retrofit import memory_layers


def fused_enabled(choice: str, model: nn.Module, weights: Iterable[torch.Tensor]) -> bool:
    """Whether the pools with these weights take the fused path. Only product-key layers read their
    pool by a weighted bag; a chapters bank (memory.kind chapters) is read by chapter attention."""
    weights = list(weights)
    if choice == "off" or not weights:
        return False
    if not all(isinstance(mem, ProductKeyMemory) for mem in memory_layers(model).values()):
        if choice == "on":
            raise ValueError("fused_update 'on' needs product-key memory layers (memory.kind product_key); "
                             "a chapters bank is read by chapter attention, not a weighted bag: use auto or off")
        return False
    if choice == "auto":
        return all(w.is_cuda for w in weights)
    return True


def pool_sinks(model: nn.Module) -> dict[int, kernels.DeferredBagGrads]:
    """One empty recorder per distinct value pool, keyed by id(pool weight)."""
    return {id(mem.values.weight): kernels.DeferredBagGrads() for mem in memory_layers(model).values()}


@contextlib.contextmanager
def deferred_reads(model: nn.Module, sinks: dict[int, kernels.DeferredBagGrads] | None) -> Iterator[None]:
    """Inside the block each memory layer's forward gets defer=<its pool's sink> (a forward pre-hook
    passes it; nothing is stored on the layers). sinks None: the block runs as it is."""
    if sinks is None:
        yield
        return

    def hook(sink):
        return lambda _module, args, kwargs: (args, {**kwargs, "defer": sink})

    handles = [mem.register_forward_pre_hook(hook(sinks[id(mem.values.weight)]), with_kwargs=True)
               for mem in memory_layers(model).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class FusedSparseAdam(torch.optim.Optimizer):
    """torch.optim.SparseAdam's update, from the pools' recorded reads by one fused backward + step.

    The same rule, state and state_dict as SparseAdam: a per-pool step count t bumped on every step
    that read the pool, exp_avg / exp_avg_sq shaped like the pool, and on the rows read in the step
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps).
    The fused kernel keeps a step count per row and writes p -= lr m_hat / (sqrt(v_hat) + eps'), so
    every read row's count is set to t - 1 before the call and eps' = eps / sqrt(1 - b2^t): the same
    arithmetic up to float rounding. A resumed run needs only this optimizer's state_dict.
    """

    def __init__(self, params: list[nn.Parameter], sinks: dict[int, kernels.DeferredBagGrads], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        missing = [tuple(p.shape) for p in params if id(p) not in sinks]
        if missing:
            raise ValueError(f"FusedSparseAdam: no recorder for the value pools of shapes {missing}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, maximize=False))
        self.sinks = sinks
        self._row_steps: dict[int, torch.Tensor] = {}  # scratch (N,) int64 per pool, not state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                sink = self.sinks[id(p)]
                if not len(sink):  # the pool was not read: SparseAdam's "no gradient", no step
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                rows_t = self._row_steps.get(id(p))
                if rows_t is None:
                    rows_t = self._row_steps[id(p)] = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
                rows_t.fill_(t - 1)
                kernels.weighted_bag_backward_adam_(
                    p.data, state["exp_avg"], state["exp_avg_sq"], rows_t, *sink.take(), float(group["lr"]),
                    beta1, beta2, group["eps"] / math.sqrt(1 - beta2**t), need_grad_w=False, return_rows=False)
        return loss
