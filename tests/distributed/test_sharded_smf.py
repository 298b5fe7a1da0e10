"""A sharded SMF step touches the rows a single process touches and writes the same sparse delta,
through the pool's gradient ("smf") and through the fused backward + update on each rank's columns
("smf_fused"); the single-process reference takes the gradient path."""
import copy

import pytest
import torch

from _scenarios import SMF_CFG, memory_model, run_world, smf_background, smf_batches
from slotwise.continual.delta import extract_delta, load_delta
from slotwise.continual.smf import SparseMemoryFinetuner


@pytest.fixture(scope="module")
def single_process():
    model = memory_model(shared=True)
    base = copy.deepcopy(model)
    smf = SparseMemoryFinetuner(model, smf_background(), SMF_CFG)
    steps = [smf.step(b) for b in smf_batches()]
    return steps, extract_delta(base, model)


@pytest.mark.parametrize("name", ["smf", "smf_fused"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_smf_selects_the_same_rows(world, name, single_process):
    steps, _ = single_process
    got = torch.load(run_world(world) / f"{name}_w{world}.pt")
    assert got["fused"] == (name == "smf_fused")
    for mine, ref in zip(got["selected"], [s["selected"] for s in steps]):
        assert mine.keys() == ref.keys() == {1}  # one pool shared by layers 1 and 3
        assert torch.equal(mine[1], ref[1])
        assert mine[1].numel() == SMF_CFG.top_t
    assert got["loss"] == pytest.approx([s["loss"] for s in steps], rel=1e-6)


@pytest.mark.parametrize("name", ["smf", "smf_fused"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_smf_writes_the_single_process_delta(world, name, single_process):
    _, ref = single_process
    got = load_delta(run_world(world) / f"{name}_delta_w{world}")
    assert got.base_hash == ref.base_hash  # the unsharded state, hashed from the shards
    assert got.pools.keys() == ref.pools.keys()
    for name, pd in ref.pools.items():
        mine = got.pools[name]
        assert torch.equal(mine.rows, pd.rows)
        assert mine.n_slots == pd.n_slots and mine.new.shape == pd.new.shape and mine.new.dtype == pd.new.dtype
        torch.testing.assert_close(mine.new, pd.new, rtol=1e-5, atol=1e-6)
    assert 12 <= got.n_rows[name] <= 24  # two steps of top_t=12 rows
