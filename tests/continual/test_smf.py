"""SMF: only the selected value rows (and their optimizer state) ever change, and the loss falls."""
import pytest
import torch
from _continual_helpers import fact_batch, random_background, retrofitted, snapshot

from slotwise import kernels
from slotwise.continual.pools import value_pools
from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner, count_mask, loss_positions, rows_of_grad


def _run(model, cfg, steps, backgrounds="random"):
    pools = value_pools(model)
    if backgrounds == "random":
        backgrounds = {p.layers[0]: random_background(p.weight.shape[0], seed=i) for i, p in enumerate(pools)}
    smf = SparseMemoryFinetuner(model, backgrounds, cfg)
    batch = fact_batch()
    before = snapshot(model)
    outs = [smf.step(batch) for _ in range(steps)]
    return smf, pools, before, outs


def _check_sparse(model, pools, before, outs, smf=None):
    names = {p.name for p in pools}
    for n, p in model.named_parameters():  # embeddings, attention, MLP, keys, query, gate, out_proj, norms
        if n not in names:
            assert torch.equal(p, before[n]), n
    for pool in pools:
        touched = torch.zeros(pool.weight.shape[0], dtype=torch.bool)
        for o in outs:
            touched[o["selected"][pool.layers[0]]] = True
        changed = (pool.weight != before[pool.name]).any(dim=1)
        assert not changed[~touched].any(), "an unselected row moved"
        assert changed[touched].all(), "a selected row did not change"
        assert torch.equal(pool.weight[~touched], before[pool.name][~touched])
        if smf is not None and smf.cfg.optimizer == "adam":
            s = smf.state[pool.name]
            assert (s["step"][~touched] == 0).all() and (s["exp_avg"][~touched] == 0).all()
            assert (s["exp_avg_sq"][~touched] == 0).all() and (s["step"][touched] > 0).all()


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 2.0)])
def test_only_selected_rows_change_and_loss_falls(optimizer, lr):
    model = retrofitted()
    cfg = SMFConfig(top_t=6, score="tfidf", optimizer=optimizer, lr=lr)
    smf, pools, before, outs = _run(model, cfg, steps=6)
    assert [p.layers for p in pools] == [(1,), (3,)]
    assert all(o["n_selected"] == {1: 6, 3: 6} for o in outs)
    _check_sparse(model, pools, before, outs, smf)
    losses = [o["loss"] for o in outs]
    assert losses[-1] < losses[0] - 1e-3, losses


def test_shared_pool_counts_over_its_layers():
    model = retrofitted(shared_values=True)
    cfg = SMFConfig(top_t=5, score="kl", count_on="all")
    smf, pools, before, outs = _run(model, cfg, steps=3)
    assert len(pools) == 1 and pools[0].layers == (1, 3)
    assert all(o["n_selected"] == {1: 5} for o in outs)
    _check_sparse(model, pools, before, outs, smf)


def test_rare_rows_and_random_selection():
    model = retrofitted()
    pools = value_pools(model)
    bgs = {p.layers[0]: random_background(p.weight.shape[0], seed=7) for p in pools}
    cfg = SMFConfig(top_t=50, score="random", max_df_fraction=0.3, optimizer="sgd", lr=1.0)
    smf = SparseMemoryFinetuner(model, bgs, cfg)
    out = smf.step(fact_batch())
    for layer, ids in out["selected"].items():
        assert (bgs[layer].df[ids] <= 0.3 * 20).all()


def test_selection_counts_only_loss_positions():
    b = fact_batch()
    m = loss_positions(b["labels"], b["attention_mask"])
    # row 0: 10 real tokens, labels on tokens 6..9 -> positions 5..8 predict them
    assert m[0].nonzero().squeeze(1).tolist() == [5, 6, 7, 8]
    assert m[1].nonzero().squeeze(1).tolist() == [6, 7, 8, 9]
    assert count_mask(b, "all")[0].sum() == 10 and count_mask(b, "all")[1].sum() == 11


def test_count_on_subject_counts_the_subject_tokens_only():
    b = fact_batch()
    b["subject_mask"] = torch.zeros_like(b["input_ids"], dtype=torch.bool)
    b["subject_mask"][0, 1:3] = True
    b["subject_mask"][0, 10] = True  # row 0's last token is padding: not counted
    b["subject_mask"][1, 2] = True
    m = count_mask(b, "subject")
    assert m[0].nonzero().squeeze(1).tolist() == [1, 2]
    assert m[1].nonzero().squeeze(1).tolist() == [2]
    with pytest.raises(ValueError, match="count_on='subject' needs each fact's subject"):
        count_mask(fact_batch(), "subject")


def test_missing_background_is_a_clear_error():
    model = retrofitted()
    with pytest.raises(ValueError, match="no background table"):
        SparseMemoryFinetuner(model, None, SMFConfig(score="tfidf"))
    with pytest.raises(ValueError, match="smf.score"):
        SMFConfig(score="bm25")


def test_rows_of_grad_dense_and_sparse_agree():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(30, 5, generator=g)
    ids = torch.randint(0, 30, (7, 2, 3), generator=g)
    w = torch.rand(7, 2, 3, generator=g)
    grads = []
    for sparse in (False, True):
        v = values.clone().requires_grad_(True)
        kernels.weighted_bag(v, ids, w, sparse_grad=sparse).pow(2).sum().backward()
        grads.append(v.grad)
    assert grads[1].is_sparse
    rows = torch.tensor([0, 3, 4, 17, 29])
    rows = torch.cat([rows, ids.reshape(-1)[:4]]).unique()
    torch.testing.assert_close(rows_of_grad(grads[1], rows), rows_of_grad(grads[0], rows))
