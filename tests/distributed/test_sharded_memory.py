"""The column-sharded value pool on 2 and 3 gloo ranks against the single-process memory layer."""
import pytest
import torch

from _scenarios import (HEAL_LOOP, LAYER_CASES, V_DIM, heal_batch_at, heal_eval_batches, layer_loss, layer_setup,
                        memory_model, run_world)
from slotwise.distributed.memory import column_range, column_widths
from slotwise.training import train

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,world", [(41, 2), (41, 3), (41, 4), (576, 8), (7, 7)])
def test_columns_follow_torch_chunk(dim, world):
    # DTensor's Shard(1) splits like torch.chunk: the checkpoints depend on it
    chunks = torch.arange(dim).chunk(world)
    assert [column_range(dim, world, r) for r in range(world)] == [(int(c[0]), int(c[-1]) + 1) for c in chunks]


def test_a_split_that_leaves_a_rank_no_columns_is_refused():
    with pytest.raises(ValueError, match="leaves rank 3 no columns"):
        column_widths(6, 4)  # torch.chunk: 2, 2, 2, 0


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_sharded_layer_gives_the_single_process_outputs_and_gradients(world, case):
    got = torch.load(run_world(world) / f"layer_{case}_w{world}.pt")
    mem, x, grad_out = layer_setup(case)
    res = mem(x)
    layer_loss(res, grad_out).backward()
    torch.testing.assert_close(got["out"], res.out.detach(), **TOL)
    torch.testing.assert_close(got["balance"], res.balance.detach(), **TOL)
    for name, p in mem.named_parameters():
        ref = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(got["grads"][name], ref, **TOL, msg=lambda m: f"{name}: {m}")
    assert got["grads"]["values.weight"].shape == (64, V_DIM)
    assert got["sparse"] == mem.cfg.sparse_grad  # a sparse pool's shard gets a sparse gradient too


@pytest.mark.parametrize("name", ["heal", "heal_fused"])
@pytest.mark.parametrize("world", [2, 3])
def test_two_heal_steps_on_sharded_pools_give_the_single_process_weights(world, name, tmp_path):
    """heal: dense pools (Adam); heal_fused: sparse pools, each rank's columns stepped by the fused
    backward + SparseAdam, against one process's torch.optim.SparseAdam on the sparse gradients."""
    got = torch.load(run_world(world) / f"{name}_w{world}.pt")
    assert got["record"]["fused_update"] == (name == "heal_fused")
    model = memory_model(sparse=name == "heal_fused")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = train(model, heal_batch_at, heal_eval_batches(), HEAL_LOOP, tmp_path / "state", progress=False)
    assert record["best_step"] == 2  # the final weights are the trained ones, not the start
    assert [h["grad_norm"] > HEAL_LOOP.optim.grad_clip for h in record["history"][1:]] == [True, True]  # clipped
    ref = model.state_dict()
    assert got["state"].keys() == ref.keys()
    changed = [k for k in ref if not torch.equal(ref[k], before[k])]
    assert any("values" in k for k in changed) and any("query" in k for k in changed)
    for k in ref:
        if k not in changed:  # frozen: bit for bit
            assert torch.equal(got["state"][k], ref[k]), k
            continue
        # Adam moves every element by ~lr whatever the size of its gradient, so where a gradient is
        # ~0 the float summation order shows: allow a hundredth of one step there, on few elements
        lr = HEAL_LOOP.optim.lr_values if "values" in k else HEAL_LOOP.optim.lr_memory
        torch.testing.assert_close(got["state"][k], ref[k], rtol=0, atol=lr / 100, msg=lambda m: f"{k}: {m}")
        off = ~torch.isclose(got["state"][k], ref[k], **TOL)
        assert off.float().mean() < 0.01, f"{k}: {int(off.sum())} elements beyond {TOL}"
    for a, b in zip(got["record"]["history"], record["history"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
