"""A value pool read by several layers: grad weights flow during backward, the pool gets one fused step after."""
from __future__ import annotations

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import DeferredBagGrads, weighted_bag, weighted_bag_backward_adam_
from slotwise.kernels.sparse_update_reference import sparse_adam_reference
from slotwise.kernels.weighted_bag_reference import weighted_bag_reference

N, D, H, KNN = 30, 41, 2, 3


def _layers(device):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(N, D, generator=g).to(device)
    ids = [torch.randint(0, N // 2, (T, H, KNN), generator=g).to(device) for T in (7, 5)]  # rows overlap
    weights = [torch.softmax(torch.randn(T, H, KNN, generator=g), -1).to(device) for T in (7, 5)]
    target = torch.randn(7, D, generator=g).to(device)
    return pool, ids, weights, target


def _loss(y1, y2, target):
    return ((y1 - target) ** 2).sum() + (y2 * y2).sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_pool_gets_one_merged_step(device, close, backend):
    pool, ids, weights, target = _layers(device)
    kw = dict(lr=1e-2, weight_decay=0.01)
    # deferred: the weights' grads during backward, then one step with both layers' rows
    p = pool.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    sink = DeferredBagGrads()
    ys = [weighted_bag(p, i, w, backend=backend, defer=sink) for i, w in zip(ids, ws)]
    _loss(*ys, target).backward()
    assert p.grad is None and len(sink) == 2
    state = [torch.zeros(N, D, device=device), torch.zeros(N, D, device=device),
             torch.zeros(N, dtype=torch.int64, device=device)]
    grad_w, rows = weighted_bag_backward_adam_(p.data, *state, *sink.take(), **kw, backend=backend,
                                               need_grad_w=False)
    assert grad_w is None and len(sink) == 0
    # reference: ordinary autograd (the pool's gradient summed over both layers), Adam on the touched rows
    r = pool.clone().requires_grad_()
    rws = [w.clone().requires_grad_() for w in weights]
    _loss(*[weighted_bag_reference(r, i, w) for i, w in zip(ids, rws)], target).backward()
    touched = torch.unique(torch.cat([i.reshape(-1) for i in ids]))
    ref_state = [torch.zeros(N, D, device=device), torch.zeros(N, D, device=device),
                 torch.zeros(N, dtype=torch.int64, device=device)]
    ref = pool.clone()
    sparse_adam_reference(ref, *ref_state, touched, r.grad[touched], **kw)
    assert torch.equal(rows, touched)
    for a, b in zip(ws, rws):
        close(a.grad, b.grad)
    close(p.data, ref)
    close(state[0], ref_state[0])
    assert torch.equal(state[2], ref_state[2]) and int(state[2].max()) == 1  # one step per row, not per layer
    untouched = torch.ones(N, dtype=torch.bool, device=device)
    untouched[touched] = False
    assert torch.equal(p.data[untouched], pool[untouched])


def test_take_without_records_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing recorded"):
        DeferredBagGrads().take()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_lookup_still_records(device, close, backend):
    """SMF: only the pool requires grad (the lookup is frozen); the backward still records for the step."""
    pool, ids, weights, target = _layers(device)
    p = pool.clone().requires_grad_()
    sink = DeferredBagGrads()
    y = weighted_bag(p, ids[0], weights[0], backend=backend, defer=sink)
    ((y - target) ** 2).sum().backward()
    got_ids, got_w, got_g = sink.take()
    assert p.grad is None
    assert torch.equal(got_ids, ids[0]) and torch.equal(got_w, weights[0])
    close(got_g, 2 * (weighted_bag_reference(pool, ids[0], weights[0]) - target))
