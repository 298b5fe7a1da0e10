"""SMF through the fused backward + update equals SMF through the pool's gradient and the sparse step.

The fused path (smf.fused_update: on) records each pool's reads in the forward, gives the pool no
gradient, and steps the chosen rows R in one fused call per pool (all layers sharing a pool merged).
Against the default CPU path (autograd's pool gradient, then kernels.sparse_sgd_ / sparse_adam_ on
R): the same rows selected and changed, unselected rows and their optimizer state bitwise unchanged,
selected rows equal up to float summation order. backend "triton" runs the fused Triton kernels
under TRITON_INTERPRET=1 (tests/conftest.py sets it on a machine without a GPU).
"""
import copy

import pytest
import torch
from _continual_helpers import fact_batch, random_background, retrofitted
from conftest import tiny_model

from slotwise import kernels
from slotwise.continual.hf_trainer import SparseMemoryOptimizer
from slotwise.continual.pools import value_pools
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner
from slotwise.memory import ChapterConfig, MemoryConfig
from slotwise.retrofit import RetrofitConfig, retrofit

STEPS = 3


def _stream(model, cfg):
    pools = value_pools(model)
    backgrounds = {p.layers[0]: random_background(p.weight.shape[0], seed=i) for i, p in enumerate(pools)}
    smf = SparseMemoryFinetuner(model, backgrounds, cfg)
    outs = [smf.step(fact_batch(seed=1 + s)) for s in range(STEPS)]
    return smf, outs


# The interpreted fused walk takes seconds a call: Triton on the shared pool only (one call a step).
@pytest.mark.parametrize("backend,shared", [("torch", False), ("torch", True), ("triton", True)],
                         ids=["torch-per_layer_pools", "torch-shared_pool", "triton-shared_pool"], indirect=["backend"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 2.0), ("adam", 1e-2)])
def test_fused_smf_equals_the_gradient_path(backend, shared, optimizer, lr):
    model = retrofitted(shared_values=shared)
    start = {p.name: p.weight.detach().clone() for p in value_pools(model)}
    fused_model = copy.deepcopy(model)
    cfg = dict(top_t=10, score="tfidf", optimizer=optimizer, lr=lr, weight_decay=0.01 if optimizer == "adam" else 0.0)
    ref, ref_outs = _stream(model, SMFConfig(**cfg, fused_update="off"))
    fused, outs = _stream(fused_model, SMFConfig(**cfg, fused_update="on"))
    assert ref.sinks is None and fused.sinks is not None
    assert len(fused.pools) == (1 if shared else 2)
    for a, b in zip(outs, ref_outs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["selected"].keys() == b["selected"].keys()
        for k in a["selected"]:
            assert torch.equal(a["selected"][k], b["selected"][k])  # the same rows chosen every step
    for pool, ref_pool in zip(fused.pools, ref.pools):
        assert pool.weight.grad is None  # the fused path never materialises the pool's gradient
        chosen = torch.zeros(pool.weight.shape[0], dtype=torch.bool)
        for o in outs:
            chosen[o["selected"][pool.layers[0]]] = True
        w, w_ref, w0 = pool.weight.detach(), ref_pool.weight.detach(), start[pool.name]
        changed = (w != w0).any(dim=1)
        assert torch.equal(changed, (w_ref != w0).any(dim=1))  # the same rows touched
        assert torch.equal(changed, chosen)
        assert torch.equal(w[~chosen], w0[~chosen])  # unselected rows: bit for bit
        torch.testing.assert_close(w[chosen], w_ref[chosen], rtol=1e-5, atol=1e-6)
        if optimizer == "adam":
            s, s_ref = fused.state[pool.name], ref.state[pool.name]
            assert torch.equal(s["step"], s_ref["step"])  # one step per row and SMF step, also on a shared pool
            assert int(s["step"].max()) <= STEPS
            assert (s["exp_avg"][~chosen] == 0).all() and (s["exp_avg_sq"][~chosen] == 0).all()
            torch.testing.assert_close(s["exp_avg"], s_ref["exp_avg"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s["exp_avg_sq"], s_ref["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert sum(len(s) for s in fused.sinks.values()) == 0  # every record consumed


def test_fused_update_auto_stays_off_for_cpu_pools():
    smf = SparseMemoryFinetuner(retrofitted(), None, SMFConfig(score="tf", fused_update="auto"))
    assert smf.sinks is None


def test_fused_on_is_refused_where_no_weighted_bag_reads_the_pool():
    """A chapters bank is read by chapter attention and a Trainer's backward gives the pools their
    gradient: `on` is an error there (one line naming the choice), `auto` runs the gradient path."""
    chapters = retrofit(tiny_model("llama", 0), RetrofitConfig(layers=[1], memory=MemoryConfig(
        kind="chapters", heads=2, chapters=ChapterConfig(n_chapters=6, chapter_tokens=5, top_c=2, chunk_len=4, access_k=3))))
    with pytest.raises(ValueError, match="fused_update 'on' needs product-key memory"):
        SparseMemoryFinetuner(chapters, None, SMFConfig(top_t=4, score="tf", fused_update="on"))
    assert SparseMemoryFinetuner(chapters, None, SMFConfig(top_t=4, score="tf", fused_update="auto")).sinks is None
    with pytest.raises(ValueError, match="fused_update='on' is not supported"):
        SparseMemoryOptimizer(retrofitted(), SMFConfig(top_t=4, score="tf", fused_update="on"))
    opt = SparseMemoryOptimizer(retrofitted(), SMFConfig(top_t=4, score="tf", fused_update="auto"))
    assert opt.smf.sinks is None
    opt.close()
