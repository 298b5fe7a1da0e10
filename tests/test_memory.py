import math
import os

import pytest
import torch
import torch.nn.functional as F

from slotwise import kernels
from slotwise.memory import MemoryConfig, ProductKeyMemory, ValuePool, memory_param_counts


@pytest.mark.parametrize("T,H,n_keys,K,knn", [(9, 3, 13, 10, 4), (33, 4, 32, 64, 16), (5, 1, 7, 6, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_product_key_topk_equals_bruteforce(T, H, n_keys, K, knn, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, K, generator=g)
    keys = torch.randn(H, 2, n_keys, K // 2, generator=g)
    brute_scores, brute_ids = kernels.pk_topk_bruteforce(q, keys, knn)
    for scores, ids in (kernels.pk_topk_reference(q, keys, knn), kernels.pk_topk(q, keys, knn)):
        assert torch.equal(ids, brute_ids)
        torch.testing.assert_close(scores, brute_scores, rtol=1e-5, atol=1e-5)


def _layer(d=24, **kw):
    cfg = MemoryConfig(**{**dict(n_keys=8, heads=2, knn=4, k_dim=16, out_init_std=0.02), **kw})
    torch.manual_seed(0)
    return ProductKeyMemory(d, d, cfg)


def test_forward_matches_explicit_computation():
    mem = _layer()
    x = torch.randn(2, 5, 24)
    res = mem(x)
    out, ids, weights = res.out, res.ids, res.weights
    assert ids.shape == weights.shape == (2, 5, 2, 4)
    assert ids.min() >= 0 and ids.max() < 64
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 2))
    # Written out independently: gather the rows, weight them, sum over heads and knn, gate, project.
    rows = mem.values.weight[ids]  # (B, S, H, knn, D)
    y = (rows * weights.unsqueeze(-1)).sum(dim=(2, 3))
    expected = F.linear(y * F.silu(F.linear(x, mem.gate.weight)), mem.out_proj.weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ids_are_the_top_scoring_slots():
    mem = _layer()
    x = torch.randn(7, 24)
    ids = mem(x).ids
    q = mem.query_norm(mem.query(x).view(7, 2, 16))
    _, brute_ids = kernels.pk_topk_bruteforce(q, mem.keys, 4)
    assert torch.equal(ids, brute_ids)


@pytest.mark.parametrize("memory_plus", [True, False])
def test_gradients_reach_every_part(memory_plus):
    mem = _layer(memory_plus=memory_plus)
    out = mem(torch.randn(3, 6, 24)).out
    (out * torch.randn_like(out)).sum().backward()
    named = dict(mem.named_parameters())
    expected = ["query.weight", "keys", "values.weight", "out_proj.weight", "query_norm.weight"]
    expected += ["gate.weight"] if memory_plus else []
    for name in expected:
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"


def test_zero_output_projection_blocks_all_but_itself():
    """With W2 = 0 (the retrofit init) the first step can only move W2; this is why healing works."""
    mem = _layer(out_init_std=0.0)
    out = mem(torch.randn(3, 6, 24)).out
    assert out.abs().max() == 0
    out.sum().backward()
    assert mem.out_proj.weight.grad.abs().sum() > 0
    assert mem.values.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("v_dim", [576, 896, 41])
def test_value_width_need_not_be_a_power_of_two(v_dim):
    cfg = MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8, v_dim=v_dim, out_init_std=0.02)
    mem = ProductKeyMemory(32, 32, cfg)
    assert mem.values.weight.shape == (36, v_dim)
    assert mem(torch.randn(4, 32)).out.shape == (4, 32)


def test_shared_pool_is_one_tensor_counted_once():
    cfg = MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8, shared_values=True)
    pool = ValuePool(36, 32)
    a, b = ProductKeyMemory(32, 32, cfg, values=pool), ProductKeyMemory(32, 32, cfg, values=pool)
    assert a.values.weight is b.values.weight
    assert memory_param_counts(a)["values"] == 36 * 32
    with pytest.raises(ValueError, match="shared value pool"):
        ProductKeyMemory(32, 32, MemoryConfig(n_keys=5, heads=2, knn=3, k_dim=8), values=pool)


@pytest.mark.parametrize("bad,match", [(dict(k_dim=15), "even"), (dict(knn=9), "must not exceed"), (dict(balance="switch"), "balance")])
def test_bad_memory_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ProductKeyMemory(16, 16, MemoryConfig(**{**dict(n_keys=8, heads=2, knn=4, k_dim=16), **bad}))


def test_balance_loss_is_zero_for_uniform_use_and_positive_for_collapse():
    mem = _layer()
    mem.train()
    assert mem(torch.randn(5, 24)).balance is not None
    mem.eval()
    assert mem(torch.randn(5, 24)).balance is None
    # All sub-keys equal -> every token's softmax over sub-keys is uniform -> KL to uniform = 0.
    with torch.no_grad():
        mem.keys.zero_()
    q = mem.queries(torch.randn(5, 24))
    assert mem.balance_loss(q).abs() < 1e-6
    # One sub-key far ahead of the rest for every query -> usage collapses onto it -> close to log(n_keys).
    with torch.no_grad():
        mem.keys.zero_()
        mem.keys[:, :, 0] = 50.0 * torch.sign(q.mean(0)).view(2, 2, 8)
    assert mem.balance_loss(q) > 0.5 * torch.log(torch.tensor(8.0))


def _one_head_half_keys(mem, key_values):
    """Sub-keys of a 1-head memory with k_dim 2: each half scores q_half * key (a scalar product)."""
    with torch.no_grad():
        mem.keys.copy_(torch.tensor(key_values, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 2, -1, 1))


def test_hard_balance_is_switch_loss_on_the_top_k_picks():
    mem = ProductKeyMemory(4, 4, MemoryConfig(n_keys=4, heads=1, knn=1, k_dim=2, query_norm=False, balance="hard"))
    _one_head_half_keys(mem, [1.0, 2.0, 3.0, 4.0])
    q = torch.ones(6, 1, 2)  # every token scores [1, 2, 3, 4] in both halves -> all pick sub-key 3
    e = [math.exp(v) for v in (1.0, 2.0, 3.0, 4.0)]
    expected = 4 * e[3] / sum(e)  # n * f_3 * P_3 with f = (0, 0, 0, 1): the same in both halves
    assert mem.balance_loss(q).item() == pytest.approx(expected, rel=1e-6)
    # Equal scores: P uniform, so n * sum_i f_i / n = 1 whatever the (tied) picks are.
    _one_head_half_keys(mem, [0.0, 0.0, 0.0, 0.0])
    assert mem.balance_loss(q).item() == pytest.approx(1.0, rel=1e-6)
    # Its gradient lowers the over-picked sub-key's score and raises the others'.
    _one_head_half_keys(mem, [1.0, 2.0, 3.0, 4.0])
    mem.keys.grad = None
    mem.balance_loss(q).backward()
    g = mem.keys.grad[0, 0, :, 0]
    assert g[3] > 0 and (g[:3] < 0).all()  # gradient descent: key 3 down, the rest up


def test_balance_none_gives_no_loss():
    mem = _layer(balance="none").train()
    assert mem(torch.randn(5, 24)).balance is None


def test_sparse_grad_gives_sparse_value_gradients():
    mem = _layer(sparse_grad=True)
    out = mem(torch.randn(4, 24)).out
    out.sum().backward()
    grad = mem.values.weight.grad
    assert grad.is_sparse
    touched = grad.coalesce().indices()[0].unique()
    assert 0 < touched.numel() <= 4 * 2 * 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("balance", ["soft", "hard", "none"])
def test_balance_from_the_searchs_usage_equals_scoring_every_sub_key_again(balance, backend, monkeypatch):
    """The forward takes the balance statistics from pk_topk(usage=True) (no extra pass over the
    sub-keys for the soft usage): the same loss and the same gradients as balance_loss's own pass."""
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # these tensors live on the CPU (tests/gpu: CUDA)
            pytest.skip("the CPU tests run the Triton kernels interpreted (TRITON_INTERPRET=1)")
    monkeypatch.setenv("SLOTWISE_KERNELS", backend)
    mem = _layer(balance=balance).train()
    x = torch.randn(6, 24)
    got = mem(x).balance
    if balance == "none":
        assert got is None and mem.balance_loss(mem.queries(x)) is None
        return
    got.backward()
    grads = {n: p.grad.clone() for n, p in mem.named_parameters() if p.grad is not None}
    mem.zero_grad(set_to_none=True)
    want = mem.balance_loss(mem.queries(x))  # usage=None: every sub-key scored here
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == {"keys", "query.weight", "query_norm.weight", "query_norm.bias"}
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(mem.named_parameters())[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
