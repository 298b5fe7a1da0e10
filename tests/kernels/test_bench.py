"""The benchmark's CPU behaviour, and its ops (ours and the PyTorch baselines) run once, interpreted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import bench

TINY = (9, 3, 5, 13, 41, 10, 16)  # (tokens, heads, knn, n_keys, D, k_dim, d_model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_cuda_says_so_and_exits_0(capsys, tmp_path):
    assert bench.main(["--json", str(tmp_path / "b.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "b.json").exists()  # nothing measured, nothing written


def test_bench_rejects_unknown_case(capsys):
    assert bench.main(["--cases", "1m-577"]) == 2
    assert "unknown case" in capsys.readouterr().err


def test_zipf_ids_are_skewed():
    g = torch.Generator().manual_seed(0)
    ids = bench.zipf_ids((4096, 4, 8), 1 << 16, bench.ZIPF_S, g, device="cpu")
    counts = torch.bincount(ids.reshape(-1), minlength=1 << 16)
    assert ids.shape == (4096, 4, 8) and int(ids.max()) < 1 << 16
    assert counts.max() > 0.05 * ids.numel()  # one hot row
    assert (counts > 0).sum() < 0.3 * ids.numel()  # few unique rows per entry


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_bench_ops_run_and_agree(device, close, dist):
    """Every timed pair runs; the lookups and bag forwards of ours and the baseline agree."""
    from slotwise.kernels import bench_ops

    g = torch.Generator(device=device).manual_seed(0)
    s = bench_ops.setup(TINY, torch.float32, g, dev=device)
    if dist == "zipf":
        s["ids"] = bench.zipf_ids(s["ids"].shape, TINY[3] ** 2, bench.ZIPF_S, g, device=device)
    results = {name: (ours(), base()) for name, ours, base in bench_ops.pairs(s, TINY)}
    (ours_scores, ours_ids), (base_scores, base_ids) = results["pk_topk forward"]
    close(ours_scores, base_scores)
    assert (ours_ids == base_ids).float().mean() > 0.95
    close(*results["bag forward"])
    assert len(results) == 6


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_quick_runs_the_interpreted_smoke_check(tmp_path):
    out = tmp_path / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "slotwise.kernels.bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["smoke"] and all(c["ok"] for c in payload["smoke"])


@pytest.mark.slow
def test_hot_kernels_compile_for_h100_without_spills(tmp_path):
    """Triton's bundled ptxas compiles for sm_90 without a GPU: the bag forward and the backward walk
    at the 1M x 576 widths must compile and keep every value in registers."""
    out = tmp_path / "cc.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "slotwise.kernels.compile_check", "--cases", "1m-576",
                           "--kernels", "_bag_fwd,_walk", "--json", str(out)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = json.loads(out.read_text())["kernels"]
    assert {k["kernel"] for k in kernels} == {"_bag_fwd_kernel", "_walk_kernel"}
    for k in kernels:
        assert not k["spills"] and k["reg"] <= 128, k
