"""GRIT, one part at a time: K-FAC preconditioning, reprojection, rank from the spectrum, a step."""
import pytest
import torch
import torch.nn as nn
from _continual_helpers import fact_batch, retrofitted, snapshot

from slotwise.continual.grit import (
    GritParams,
    GritUpdater,
    energy_rank,
    kfac_precondition,
    precondition_lora,
    rank_basis,
    relative_damping,
    reproject,
    second_moment,
)


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_preconditioning_is_the_kronecker_inverse():
    L, R = _spd(3, 0), _spd(4, 1)
    X = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dl, dr = 0.1, 0.2
    got = kfac_precondition(X, L, R, dl, dr)
    # the explicit K-FAC Fisher (row-major vec): (L + dl I) (x) (R + dr I)^T, inverted on vec(X)
    F = torch.kron(L + dl * torch.eye(3, dtype=torch.float64), (R + dr * torch.eye(4, dtype=torch.float64)).T.contiguous())
    want = torch.linalg.solve(F, X.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_lora_preconditioning_uses_the_rank_space_factors():
    r, d_in, d_out = 3, 5, 4
    A_r, G_r = _spd(r, 3).float(), _spd(r, 4).float()
    g = torch.Generator().manual_seed(5)
    gA, gB = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    nat_A, nat_B = precondition_lora(gA, gB, A_r, G_r, damping=0.1)
    lg, la = relative_damping(G_r, 0.1), relative_damping(A_r, 0.1)
    assert la == pytest.approx(0.1 * torch.trace(A_r).item() / r)
    FA = torch.kron(G_r + lg * torch.eye(r), torch.eye(d_in))  # lora_A: G_r on the output side only
    FB = torch.kron(torch.eye(d_out), (A_r + la * torch.eye(r)).T.contiguous())  # lora_B: A_r on the input side only
    torch.testing.assert_close(nat_A.reshape(-1), torch.linalg.solve(FA, gA.reshape(-1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nat_B.reshape(-1), torch.linalg.solve(FB, gB.reshape(-1)), rtol=1e-4, atol=1e-5)


def test_energy_rank_from_a_hand_made_spectrum():
    lam = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # total 10; cumulative 0.5, 0.8, 0.9, 0.95, 1.0
    assert energy_rank(lam, 0.8, 1, 5) == 2
    assert energy_rank(lam, 0.5, 1, 5) == 1
    assert energy_rank(lam, 0.85, 1, 5) == 3
    assert energy_rank(lam, 0.95, 1, 5) == 4
    assert energy_rank(lam, 1.0, 1, 5) == 5
    assert energy_rank(lam[[3, 0, 4, 2, 1]], 0.8, 1, 5) == 2  # order of the input does not matter
    assert energy_rank(lam, 0.8, 3, 5) == 3  # r_min
    assert energy_rank(lam, 0.95, 1, 3) == 3  # r_max


def test_reprojection_keeps_the_dominant_subspace():
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out, T = 4, 10, 6, 400
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    # activations whose bottleneck covariance has a clear top-2 subspace
    Q = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
    a = torch.randn(T, r, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 0.3, 0.1], dtype=torch.float64)
    a = a @ Q.T  # (T, r): the big directions are Q[:, 0], Q[:, 1]
    x = torch.linalg.lstsq(A, a.T).solution.T  # inputs with A x = a
    A_r = second_moment(x @ A.T).double()
    vals, vecs = rank_basis(A_r, torch.eye(r), "activation")
    assert (vals[:-1] >= vals[1:]).all()
    k = energy_rank(vals, 0.9, 1, r)
    assert k == 2
    U_k = vecs[:, :k].double()
    # the subspace is the top eigenvectors' span: the same projector as from an explicit eigh
    e_vals, e_vecs = torch.linalg.eigh(A_r)
    top = e_vecs[:, -2:]
    torch.testing.assert_close(U_k @ U_k.T, top @ top.T, atol=1e-5, rtol=0)
    A2, B2 = reproject(A, B, U_k)
    assert A2.shape == (2, d_in) and B2.shape == (d_out, 2)
    P = top @ top.T
    torch.testing.assert_close(B2 @ A2, B @ P @ A, atol=1e-5, rtol=0)  # B A's component in the subspace
    # the new bottleneck activations are the old ones in the eigenbasis: covariance diag(top-2 eigenvalues)
    torch.testing.assert_close(second_moment(x @ A2.T).double(), torch.diag(vals[:2].double()), atol=1e-3, rtol=1e-4)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return self.proj(x)


def _regression(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Toy()
    target = torch.randn(6, 2, generator=g) @ torch.randn(2, 8, generator=g)  # a rank-2 correction
    x = torch.randn(n, 8, generator=g)
    y = model(x).detach() + x @ target.T
    return model, {"x": x, "y": y}


def _mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def test_a_grit_step_is_the_preconditioned_sgd_step():
    model, batch = _regression()
    up = GritUpdater(model, GritParams(r=4, alpha=4, lr=0.1, optimizer="sgd", targets=["proj"], damping=0.1,
                                       match_grad_norm=False, reproject_every=0), loss_fn=_mse)
    name, layer = next(iter(up.layers.items()))
    with torch.no_grad():  # a non-zero B so that both factors carry signal
        layer.lora_B["default"].weight.normal_(0, 0.1)
    wA, wB = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A0, B0 = wA.detach().clone(), wB.detach().clone()
    # the raw gradients and the factors, by hand
    x = batch["x"]
    A_, B_ = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    a = x @ A_.T
    W = model.proj.base_layer.weight  # peft replaced proj in place; the frozen base weight
    loss = ((x @ W.T + a @ B_.T - batch["y"]) ** 2).mean()
    ga, gA, gB = torch.autograd.grad(loss, [a, A_, B_])
    A_r, G_r = second_moment(a.detach()), second_moment(ga * ga.shape[0])
    nat_A, nat_B = precondition_lora(gA, gB, A_r, G_r, 0.1)
    out = up.step(batch)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(wA.detach(), A0 - 0.1 * nat_A, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wB.detach(), B0 - 0.1 * nat_B, rtol=1e-4, atol=1e-6)


def test_grit_reduces_a_regression_loss_and_adapts_the_rank():
    model, batch = _regression()
    up = GritUpdater(model, GritParams(r=4, alpha=4, lr=0.05, targets=["proj"], reproject_every=10, energy=0.9),
                     loss_fn=_mse)
    outs = [up.step(batch) for _ in range(60)]
    losses = [o["loss"] for o in outs]
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert all(r <= 4 for r in outs[-1]["ranks"].values())
    assert outs[-1]["n_trainable"] <= outs[0]["n_trainable"]
    # the reprojected adapters still merge into the base weight (peft's r and shapes stay consistent)
    with torch.no_grad():
        y = up.model(batch["x"])
        merged = up.model.merge_and_unload()
        assert merged.proj.weight.shape == (6, 8)
        torch.testing.assert_close(merged(batch["x"]), y, rtol=1e-4, atol=1e-5)


def test_reprojecting_twice_never_grows_the_rank():
    model, batch = _regression()
    up = GritUpdater(model, GritParams(r=4, alpha=4, lr=0.05, targets=["proj"], reproject_every=10, energy=0.9),
                     loss_fn=_mse)
    for _ in range(10):
        up.step(batch)
    ranks_before = up.ranks()
    up.reproject_all()  # the factors now in the rotated basis: reprojecting again keeps the product
    assert all(up.ranks()[n] <= ranks_before[n] for n in ranks_before)


def test_grit_on_a_retrofitted_decoder_leaves_the_memory_alone():
    model = retrofitted()
    base = snapshot(model)
    up = GritUpdater(model, GritParams(r=4, alpha=8, lr=1e-2, reproject_every=3, energy=0.6))
    batch = fact_batch()
    outs = [up.step(batch) for _ in range(6)]
    assert outs[-1]["loss"] < outs[0]["loss"]
    assert min(outs[-1]["ranks"].values()) < 4  # some layer's rank shrank
    assert outs[-1]["n_trainable"] < outs[0]["n_trainable"]
    for n, p in up.model.named_parameters():
        if "lora_" not in n:
            key = n.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, base[key]), key


def test_grit_adapter_with_shrunk_ranks_saves_and_reloads_exactly(tmp_path):
    """After reprojection the layers have different ranks; peft's save_pretrained + from_pretrained
    rebuild them (rank_pattern) at the same scale alpha / r_initial (alpha_pattern)."""
    from peft import PeftModel

    up = GritUpdater(retrofitted(), GritParams(r=4, alpha=8, lr=1e-2, reproject_every=3, energy=0.6))
    batch = fact_batch()
    for _ in range(6):
        up.step(batch)
    ranks = up.ranks()
    assert min(ranks.values()) < 4
    path = up.save_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(retrofitted(), path).eval()
    got_ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert got_ranks == ranks
    with torch.no_grad():
        want = up.model.eval()(input_ids=batch["input_ids"]).logits
        got = loaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # alpha * k / r / k: alpha / r up to one rounding
