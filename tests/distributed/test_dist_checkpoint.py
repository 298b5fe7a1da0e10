"""DCP checkpoints of sharded models move between world sizes 1, 2, 3 (and 4, slow)."""
from pathlib import Path

import pytest
import torch

import _scenarios
from _scenarios import checkpoint_model, results_dir, run_world, torchrun
from slotwise.distributed.checkpoint import load_sharded
from slotwise.errors import CheckpointError


def _assert_equal_states(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("written,read", [(1, 2), (1, 3), (2, 3)])
def test_a_checkpoint_written_at_one_world_size_loads_at_another(written, read):
    got = torch.load(run_world(max(written, read)) / f"ckpt_from_dcp_w{written}_w{read}.pt")
    _assert_equal_states(got, checkpoint_model().state_dict())


@pytest.mark.parametrize("written", [2, 3])
def test_a_sharded_checkpoint_loads_in_one_process(written):
    run_world(written)
    torch.manual_seed(123)
    model, _ = load_sharded(results_dir() / f"dcp_w{written}")
    ref = checkpoint_model()
    _assert_equal_states(model.state_dict(), ref.state_dict())
    pools = {id(m.mlp.memory.values) for m in (model.model.layers[1], model.model.layers[3])}
    assert len(pools) == 1  # the shared pool is still one pool


@pytest.mark.slow
def test_checkpoints_load_at_world_size_4():
    out = run_world(3)  # dcp_w1, dcp_w2, dcp_w3 exist
    proc = torchrun(4, str(Path(_scenarios.__file__).resolve()), str(out), "ckpt")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for written in (1, 2, 3):
        _assert_equal_states(torch.load(out / f"ckpt_from_dcp_w{written}_w4.pt"), checkpoint_model().state_dict())


def test_a_directory_without_dcp_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no .metadata"):
        load_sharded(tmp_path)
