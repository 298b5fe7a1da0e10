"""The training paths on CUDA: fused_update=auto fuses there, and equals the unfused path.

    make test-gpu        # = TRITON_INTERPRET=0 pytest -m gpu tests/gpu

A tiny retrofitted Llama on the GPU (256-slot pools, compiled Triton kernels): the heal on sparse
pools through FusedSparseAdam against torch.optim.SparseAdam, and SMF through the fused backward +
update against the pool's gradient and the sparse step. (tests/test_fused_update.py and
tests/continual/test_smf_fused.py check the same on CPU, the fused kernels interpreted.)
"""
import copy
import os

import pytest
import torch

from conftest import tiny_model, tiny_retrofit_cfg
from slotwise.continual.pools import value_pools
from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner
from slotwise.optim import OptimParams
from slotwise.retrofit import retrofit
from slotwise.training import LoopParams, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 to test compiled kernels"),
]
DEV = "cuda"
STEPS = 5


def model_on_gpu(shared: bool):
    model = retrofit(tiny_model("llama", seed=0), tiny_retrofit_cfg(n_keys=16, sparse_grad=True, shared_values=shared,
                                                                    out_init_std=0.1))
    return model.to(DEV)


def batch_at(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 101, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def close_after_adam(got, want, lr, name):
    """As in tests/test_fused_update.py: a hundredth of an Adam step where float order shows, on < 1%."""
    torch.testing.assert_close(got, want, rtol=0, atol=lr / 100, msg=lambda m: f"{name}: {m}")
    off = ~torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert off.float().mean() < 0.01, f"{name}: {int(off.sum())} of {got.numel()} elements differ"


@pytest.mark.parametrize("shared", [False, True])
def test_fused_heal_on_cuda_equals_the_sparse_adam_heal(shared, tmp_path):
    evals = [{k: v.to(DEV) for k, v in batch_at(s).items()} for s in range(STEPS)]
    recs, models = {}, {}
    for fused in ("auto", "off"):
        models[fused] = model_on_gpu(shared)
        loop = LoopParams(max_steps=STEPS, eval_every=STEPS, early_stop_patience=None, save_every=100, seed=0,
                          optim=OptimParams(lr_values=0.05, lr_memory=0.01, warmup_steps=2, fused_update=fused))
        recs[fused] = train(models[fused], batch_at, evals, loop, tmp_path / fused, device=DEV, progress=False)
    assert recs["auto"]["fused_update"] and not recs["off"]["fused_update"]
    want = dict(models["off"].named_parameters())
    for name, p in models["auto"].named_parameters():
        close_after_adam(p.detach(), want[name].detach(), 0.05 if "values" in name else 0.01, name)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 2.0), ("adam", 1e-2)])
def test_fused_smf_on_cuda_equals_the_gradient_path(optimizer, lr):
    model = model_on_gpu(shared=True)
    other = copy.deepcopy(model)
    start = value_pools(model)[0].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    df = torch.randint(0, 21, (256,), generator=g)
    bg = {1: Background(df * torch.randint(1, 5, (256,), generator=g), df, 20)}
    runs = {}
    for fused, m in (("auto", model), ("off", other)):
        smf = SparseMemoryFinetuner(m, bg, SMFConfig(top_t=10, optimizer=optimizer, lr=lr, fused_update=fused))
        assert (smf.sinks is not None) == (fused == "auto")
        runs[fused] = (smf, [smf.step({k: v.to(DEV) for k, v in batch_at(s).items()}) for s in range(3)])
    for a, b in zip(runs["auto"][1], runs["off"][1]):
        assert torch.equal(a["selected"][1], b["selected"][1])
    chosen = torch.zeros(256, dtype=torch.bool, device=DEV)
    for o in runs["auto"][1]:
        chosen[o["selected"][1].to(DEV)] = True
    w, w_ref = value_pools(model)[0].weight.detach(), value_pools(other)[0].weight.detach()
    assert torch.equal(w[~chosen], start[~chosen]) and torch.equal(w_ref[~chosen], start[~chosen])
    torch.testing.assert_close(w[chosen], w_ref[chosen], rtol=1e-5, atol=1e-5)
