"""The heal on sparse value pools through the fused backward + SparseAdam equals the SparseAdam heal.

train.loop.optim.fused_update=on: the pools get no gradient; after each backward FusedSparseAdam
steps each pool once from its recorded reads (kernels.weighted_bag_backward_adam_). Against
torch.optim.SparseAdam on the pools' sparse gradients (fused_update=off): the same rows move and the
same weights come out, up to float summation order, over several steps of the real train loop;
a killed and resumed fused heal ends with the weights of an uninterrupted one. backend "triton"
runs the fused Triton kernel under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU).
"""
import json

import pytest
import torch

from conftest import tiny_model, tiny_retrofit_cfg
from slotwise import kernels
from slotwise.fused_update import FusedSparseAdam, deferred_reads, fused_enabled, pool_sinks
from slotwise.optim import OptimParams
from slotwise.retrofit import memory_layers, retrofit
from slotwise.training import LoopParams, train

STEPS = 5


def sparse_model(shared: bool):
    """Memory in layers 1 and 3, 256 slots each (or one shared pool): a step reads some of them, so rows
    first read in a later step test SparseAdam's per-pool step count (not a per-row one)."""
    model = tiny_model("llama", seed=0)
    return retrofit(model, tiny_retrofit_cfg(n_keys=16, sparse_grad=True, shared_values=shared, out_init_std=0.1))


def batch_at(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 101, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def loop(fused: str, max_steps: int = STEPS, save_every: int = 100) -> LoopParams:
    return LoopParams(max_steps=max_steps, eval_every=max_steps, early_stop_patience=None, save_every=save_every,
                      seed=0, balance_weight=0.03,
                      optim=OptimParams(lr_values=0.05, lr_memory=0.01, warmup_steps=2, fused_update=fused))


def pools_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("values.weight")}


# The interpreted fused walk takes seconds a call: Triton on the shared pool only (one call a step).
@pytest.mark.parametrize("backend,shared", [("torch", False), ("torch", True), ("triton", True)],
                         ids=["torch-per_layer_pools", "torch-shared_pool", "triton-shared_pool"], indirect=["backend"])
def test_fused_heal_equals_the_sparse_adam_heal(backend, shared, tmp_path):
    steps = 3 if backend == "triton" else STEPS
    evals = [batch_at(s) for s in range(steps)]  # the training batches: the last weights are the best
    ref, fused = sparse_model(shared), sparse_model(shared)
    start = pools_of(ref)
    rec_ref = train(ref, batch_at, evals, loop("off", steps), tmp_path / "ref", progress=False)
    rec = train(fused, batch_at, evals, loop("on", steps), tmp_path / "fused", progress=False)
    assert rec["best_step"] == rec_ref["best_step"] == steps
    assert rec["fused_update"] and not rec_ref["fused_update"]
    for a, b in zip(rec["history"], rec_ref["history"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    got, want = dict(fused.named_parameters()), dict(ref.named_parameters())
    for name, w0 in start.items():
        w, w_ref = got[name].detach(), want[name].detach()
        moved = (w != w0).any(dim=1)
        assert torch.equal(moved, (w_ref != w0).any(dim=1))  # the same rows touched
        assert 0 < int(moved.sum()) < w0.shape[0]  # sparse: not every row is read
        assert torch.equal(w[~moved], w0[~moved])
    for name in want:
        close_after_adam(got[name].detach(), want[name].detach(), lr=0.05 if name in start else 0.01, name=name)
    assert len(pools_of(fused)) == (1 if shared else 2)


def close_after_adam(got, want, lr, name):
    """Equal up to float summation order, after several Adam steps: Adam moves an element by ~lr whatever
    the size of its gradient, so where a gradient is ~0 the order shows; allow a hundredth of a step
    there, on under 1% of the elements (tests/distributed uses the same rule)."""
    torch.testing.assert_close(got, want, rtol=0, atol=lr / 100, msg=lambda m: f"{name}: {m}")
    off = ~torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert off.float().mean() < 0.01, f"{name}: {int(off.sum())} of {got.numel()} elements differ"


def test_fused_sparse_adam_is_sparse_adam(backend):
    """The optimizer alone, from identical row gradients: rows first read in step 4 get SparseAdam's
    bias correction for t = 4 (its per-pool count), not a fresh row's t = 1."""
    g = torch.Generator().manual_seed(0)
    N, D = 50, 41
    w0 = torch.randn(N, D, generator=g)
    ref, pool = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    sink = kernels.DeferredBagGrads()
    sparse_adam = torch.optim.SparseAdam([ref], lr=0.05, betas=(0.8, 0.99))
    fused = FusedSparseAdam([pool], {id(pool): sink}, lr=0.05, betas=(0.8, 0.99))
    for step in range(6):
        ids = torch.randint(0, N // 3 if step < 3 else N, (5, 2, 3), generator=g)  # rows >= 16: from step 4 on
        weights = torch.softmax(torch.randn(5, 2, 3, generator=g), -1)
        grad_out = torch.randn(5, D, generator=g)
        rows, row_grads, _ = kernels.weighted_bag_backward(ref.detach(), ids, weights, grad_out, backend="torch")
        ref.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), row_grads, ref.shape, is_coalesced=True,
                                           check_invariants=False)
        sparse_adam.step()
        sink.add(ids, weights, grad_out)
        fused.step()
        torch.testing.assert_close(pool.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    late = torch.zeros(N, dtype=torch.bool)
    late[N // 3:] = True
    assert ((pool.detach() != w0).any(1) & late).any()  # some rows were first stepped late
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fused.state[pool][k], sparse_adam.state[ref][k], rtol=1e-5, atol=1e-8)
    assert fused.state[pool]["step"] == sparse_adam.state[ref]["step"] == 6


class Killed(Exception):
    pass


def test_a_killed_fused_heal_resumes_to_the_uninterrupted_weights(tmp_path):
    """The fused step's state is the optimizer's (exp_avg, exp_avg_sq, step): the trainer state carries it.
    (The kernels' PyTorch path on CPU: the Triton one takes seconds a step interpreted.)"""
    params = loop("on", max_steps=6, save_every=2)
    evals = [batch_at(s) for s in range(6)]
    whole = sparse_model(shared=True)
    train(whole, batch_at, evals, params, tmp_path / "whole", progress=False)

    def dies_at_step_3(step):  # the process dies in its 4th step: the state on disk is the one after step 2
        if step == 3:
            raise Killed
        return batch_at(step)

    state = tmp_path / "state"
    with pytest.raises(Killed):
        train(sparse_model(shared=True), dies_at_step_3, evals, params, state, progress=False)
    assert json.loads((state / "state.json").read_text())["record"]["step"] == 2
    saved = torch.load(state / "trainer.pt", weights_only=True)  # tensors only: the record is in state.json
    adam = saved["optimizers"]["values"]["state"][0]  # the pool's fused Adam state travels with the run
    assert adam["step"] == 2 and adam["exp_avg"].abs().sum() > 0 and adam["exp_avg_sq"].abs().sum() > 0
    resumed = sparse_model(shared=True)  # a new process: the starting model again, then the saved state
    record = train(resumed, batch_at, evals, params, state, progress=False)
    assert record["step"] == 6 and record["best_step"] == 6
    for (n, a), (_, b) in zip(resumed.named_parameters(), whole.named_parameters()):
        assert torch.equal(a, b), n


def test_fused_sparse_adam_steps_a_shared_pool_once_per_step():
    """Two layers read one pool: one Adam step per pool and backward, whatever the number of readers."""
    model = sparse_model(shared=True)
    pool = next(iter(memory_layers(model).values())).values.weight
    sinks = pool_sinks(model)
    opt = FusedSparseAdam([pool], sinks, lr=1e-2)
    for step in range(3):
        with deferred_reads(model, sinks):
            loss = model(**batch_at(step)).loss
        loss.backward()
        assert pool.grad is None and len(sinks[id(pool)]) == 2  # both layers recorded, no gradient built
        opt.step()
        assert len(sinks[id(pool)]) == 0 and opt.state[pool]["step"] == step + 1
    assert fused_enabled("on", model, [pool]) and not fused_enabled("off", model, [pool])
    assert not fused_enabled("auto", model, [pool])  # CPU pools: auto leaves them unfused


def test_a_pool_without_a_recorder_is_refused():
    model = sparse_model(shared=False)
    pools = [m.values.weight for m in memory_layers(model).values()]
    with pytest.raises(ValueError, match="no recorder"):
        FusedSparseAdam(pools, {id(pools[0]): kernels.DeferredBagGrads()})
