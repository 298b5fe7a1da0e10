"""What the sharded pool sends: the byte model of docs/distributed.md against bytes measured on gloo."""
import pytest
import torch

from _scenarios import TRAFFIC, run_world
from slotwise.distributed.exchange_bytes import Scale, column_sharded, replicated, row_sharded

PAPER = Scale(world=8, tokens=8192, heads=4, knn=32, dim=1024, n_slots=1 << 20)


@pytest.mark.parametrize("world", [2, 3])
def test_measured_gloo_bytes_match_the_model(world):
    measured = torch.load(run_world(world) / f"traffic_w{world}.pt")
    s = Scale(world=world, tokens=TRAFFIC["tokens"], heads=TRAFFIC["heads"], knn=TRAFFIC["knn"], dim=TRAFFIC["dim"],
              n_slots=TRAFFIC["n_keys"] ** 2, value_bytes=4, weight_bytes=4)
    for rank, m in enumerate(measured):
        model = column_sharded(s, rank, backend="gloo")
        fwd = model["counts"] + model["ids"] + model["weights"] + model["outputs"]
        bwd = model["output_grads"] + model["weight_grads"]
        # gloo adds a few hundred bytes of framing per message
        assert m["forward"] == pytest.approx(fwd, rel=0.02, abs=4096), (rank, m, fwd)
        assert m["backward"] == pytest.approx(bwd, rel=0.02, abs=4096), (rank, m, bwd)
        assert fwd > 100_000 and bwd > 100_000


def test_at_the_papers_scale_column_sharding_sends_least():
    # worked by hand: W-1 = 7 peers, T H knn = 8192 * 128 = 1,048,576 reads per rank, bf16
    col = column_sharded(PAPER)
    assert col["ids"] == 7 * 1_048_576 * 4  # 29.4 MB
    assert col["weights"] == col["weight_grads"] == 7 * 1_048_576 * 2  # 14.7 MB each
    assert col["outputs"] == col["output_grads"] == 7 * 8192 * 128 * 2  # 14.7 MB each: D/W = 128 columns
    total = sum(col.values())
    assert 85e6 < total < 90e6
    assert 2 * total < sum(row_sharded(PAPER).values()) < 3 * total
    assert replicated(PAPER)["value_grad_allreduce"] == pytest.approx(7.5e9, rel=0.01)  # fp32: 2 * 7/8 * 4.3 GB
    assert sum(replicated(PAPER, sparse=True).values()) > 50 * total
