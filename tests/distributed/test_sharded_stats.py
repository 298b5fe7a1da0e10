"""Slot statistics counted on 2 and 3 ranks equal the single-process table, exactly."""
import pytest
import torch

from _scenarios import memory_model, run_world, stats_batches
from slotwise.slot_stats import collect


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("unit", ["batch", "sequence"])
def test_sharded_statistics_equal_the_single_process_table(world, shared, unit):
    got = torch.load(run_world(world) / f"stats_w{world}.pt")[(shared, unit)]
    batches, masks = stats_batches()
    per_layer, per_pool = collect(memory_model(shared=shared), batches, masks, doc_unit=unit)
    assert got["layers"].keys() == per_layer.keys() and got["pools"].keys() == per_pool.keys()
    for mine, ref in [*zip(got["layers"].values(), per_layer.values()), *zip(got["pools"].values(), per_pool.values())]:
        assert torch.equal(mine["counts"], ref.counts)
        assert torch.equal(mine["df"], ref.df)
        assert (mine["n_batches"], mine["n_tokens"]) == (ref.n_batches, ref.n_tokens)
        assert ref.counts.sum() > 0 and (ref.df > 1).any()
