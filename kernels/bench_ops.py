"""The ops the benchmark times, as (name, ours, baseline) pairs of zero-argument callables (CUDA).

Ours: the Triton kernels. The baseline: the best plain PyTorch a user would write for the same
step -- bf16 matmul + torch.topk for the lookup (autograd for its backward), F.embedding_bag with
per_sample_weights (sparse=True for the backward), torch.optim.SparseAdam for the update. Both
sides start from the same tensors; in-place updates drift the values a little between runs, which
does not change the work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def setup(case, dtype: torch.dtype, g: torch.Generator, dev: str = "cuda") -> dict:
    T, H, knn, n_keys, D, K, d_model = case
    s = dict(
        x=torch.randn(T, d_model, device=dev, generator=g).to(dtype),
        w_q=(torch.randn(d_model, H * K, device=dev, generator=g) / d_model**0.5).to(dtype),
        keys=(torch.randn(H, 2, n_keys, K // 2, device=dev, generator=g) / (K // 2) ** 0.5).to(dtype),
        values=(torch.randn(n_keys * n_keys, D, device=dev, generator=g) * 0.02).to(dtype),
        grad_out=torch.randn(T, D, device=dev, generator=g).to(dtype),
        grad_scores=torch.randn(T, H, knn, device=dev, generator=g),
        weights=torch.softmax(torch.randn(T, H, knn, device=dev, generator=g), -1),
    )
    s["query"] = (s["x"] @ s["w_q"]).view(T, H, K)  # (T, H, K)
    with torch.no_grad():
        s["ids"] = torch_lookup(s["query"], s["keys"], knn)[1]
    return s


def torch_lookup(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-PyTorch product-key lookup: bf16 half scores, torch.topk twice; differentiable."""
    T, H, K = q.shape
    n_keys = keys.shape[2]
    s = torch.einsum("thsd,hsnd->thsn", q.view(T, H, 2, K // 2), keys)  # (T, H, 2, n_keys)
    s1, i1 = s[:, :, 0].topk(knn, dim=-1)  # (T, H, knn)
    s2, i2 = s[:, :, 1].topk(knn, dim=-1)
    cand = (s1.float().unsqueeze(-1) + s2.float().unsqueeze(-2)).flatten(-2)  # (T, H, knn*knn)
    scores, best = cand.topk(knn, dim=-1)
    return scores, (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).flatten(-2).gather(-1, best)


def _embedding_bag(ids, values, weights, sparse=False):
    T = ids.shape[0]
    return F.embedding_bag(ids.view(T, -1), values, per_sample_weights=weights.reshape(T, -1).to(values.dtype),
                           mode="sum", sparse=sparse)


def pairs(s: dict, case):
    """-> [(op name, ours, baseline)] for one case's tensors."""
    from . import pk_topk, weighted_bag_backward_adam_
    from .product_key import pk_topk_triton
    from .weighted_bag_triton import weighted_bag_backward_triton, weighted_bag_forward_triton

    T, H, knn, n_keys, D, K, d_model = case
    q, keys, values, ids, w = s["query"], s["keys"], s["values"], s["ids"], s["weights"]
    g_out, g_scores = s["grad_out"], s["grad_scores"]
    dev = values.device
    state = (torch.zeros(values.shape, device=dev), torch.zeros(values.shape, device=dev),
             torch.zeros(values.shape[0], dtype=torch.int64, device=dev))
    out = []

    # 1. lookup, forward and forward + backward
    def lookup_grad(fn):
        def run():
            q_, k_ = q.detach().requires_grad_(), keys.detach().requires_grad_()
            torch.autograd.grad(fn(q_, k_)[0], (q_, k_), g_scores)
        return run

    out.append(("pk_topk forward", lambda: pk_topk_triton(q, keys, knn), lambda: torch_lookup(q, keys, knn)))
    out.append(("pk_topk fwd+bwd", lookup_grad(lambda a, b: pk_topk(a, b, knn, backend="triton")),
                lookup_grad(lambda a, b: torch_lookup(a, b, knn))))

    # 2. bag forward
    out.append(("bag forward", lambda: weighted_bag_forward_triton(values, ids, w),
                lambda: _embedding_bag(ids, values, w)))

    # 3. sparse backward alone: the baseline's graph is built once and replayed
    v_leaf = values.detach().requires_grad_()
    w_leaf = w.to(values.dtype).requires_grad_()
    bag = _embedding_bag(ids, v_leaf, w_leaf, sparse=True)
    base_bwd = lambda: torch.autograd.grad(bag, (v_leaf, w_leaf), g_out, retain_graph=True)  # noqa: E731
    out.append(("bag backward (sparse)", lambda: weighted_bag_backward_triton(values, ids, w, g_out), base_bwd))

    # 4. backward + Adam on the touched rows
    opt = torch.optim.SparseAdam([v_leaf], lr=1e-3)

    def base_fused():
        v_leaf.grad = base_bwd()[0]
        opt.step()

    out.append(("bag backward + adam (fused)",
                lambda: weighted_bag_backward_adam_(values, *state, ids, w, g_out, 1e-3, backend="triton",
                                                    return_rows=False), base_fused))

    # 5. the whole memory layer: query projection, lookup, softmax, bag, backward, update
    w_q, x = s["w_q"].detach().requires_grad_(), s["x"]
    keys_p = keys.detach().requires_grad_()

    def ours_layer():
        w_q.grad = keys_p.grad = None
        sc, ids_ = pk_topk((x @ w_q).view(T, H, K), keys_p, knn, backend="triton")
        wts = torch.softmax(sc, -1)
        weighted_bag_forward_triton(values, ids_, wts.detach())  # (T, D): feeds the model
        # the model's backward hands back d loss / d out = g_out; the values step inside the backward
        grad_w, _ = weighted_bag_backward_adam_(values, *state, ids_, wts.detach(), g_out, 1e-3, backend="triton",
                                                return_rows=False)
        wts.backward(grad_w)  # on to the query projection and the sub-keys

    def base_layer():
        w_q.grad = keys_p.grad = None
        sc, ids_ = torch_lookup((x @ w_q).view(T, H, K), keys_p, knn)
        _embedding_bag(ids_, v_leaf, torch.softmax(sc, -1), sparse=True).backward(g_out)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out.append(("layer fwd+bwd+adam", ours_layer, base_layer))
    return out
