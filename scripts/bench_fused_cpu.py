"""CPU timings behind two choices: fused_update's `auto` (off on CPU) and the memory layer's lookup.

    .venv/bin/python scripts/bench_fused_cpu.py [--tokens 1024] [--slots 16384] [--reps 7] [--out bench_out/fused_cpu.json]

1. The memory layer's forward + backward (query projection, product-key search, softmax, balance
   loss, bag, Memory+ gate, W2) per `tokens` tokens, the default retrofit's memory (d 576, 4 heads,
   knn 16, k_dim 256, 128^2 slots, balance soft), three ways of getting the differentiable scores:
     recompute   search without autograd, then the chosen scores recomputed from gathered sub-keys
                 (the old `_half_key_scores`), balance statistics from a second pass over the sub-keys
     autograd    autograd through the reference search, balance from a second pass
     usage       autograd through the reference search, balance statistics from the same pass (today)
2. One value-pool update from a bag's output gradient, `slots` x 576 fp32, heads 4, knn 16:
     heal  sparse gradient + torch.optim.SparseAdam  vs  FusedSparseAdam (the kernels' CPU reference)
     smf   dense gradient + rows_of_grad + sparse_adam_ on 500 rows  vs  fused adam with row_mask
Variants are interleaved rep by rep (a shared machine drifts); min and median in ms, printed
as a table and written as JSON to --out (with the sizes and thread count).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slotwise import kernels
from slotwise.continual.smf import rows_of_grad
from slotwise.fused_update import FusedSparseAdam
from slotwise.memory import MemoryConfig, ProductKeyMemory


def half_key_scores(query, keys, ids):
    """The old path's differentiable scores of the chosen slots: q1 . k1[i] + q2 . k2[j]."""
    T, H, K = query.shape
    n_keys = keys.shape[2]
    q = query.view(T, H, 2, K // 2)
    i, j = ids // n_keys, ids % n_keys  # (T, H, knn)
    h = torch.arange(H).view(1, H, 1)
    return (torch.einsum("thd,thkd->thk", q[:, :, 0], keys[h, 0, i])
            + torch.einsum("thd,thkd->thk", q[:, :, 1], keys[h, 1, j]))


def layer_step(mem: ProductKeyMemory, x: torch.Tensor, how: str) -> None:
    q = mem.queries(x)
    if how == "recompute":
        with torch.no_grad():
            _, ids = kernels.pk_topk_reference(q, mem.keys, mem.cfg.knn)
        scores, usage = half_key_scores(q.float(), mem.keys.float(), ids), None
    elif how == "autograd":
        (scores, ids), usage = kernels.pk_topk(q, mem.keys, mem.cfg.knn), None
    else:
        scores, ids, usage = kernels.pk_topk(q, mem.keys, mem.cfg.knn, usage=True)
    y = mem.values.bag(ids, F.softmax(scores, dim=-1))
    out = mem.out_proj(y * F.silu(mem.gate(x)))
    (out.pow(2).mean() + 0.03 * mem.balance_loss(q, usage)).backward()


def timed(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for k, f in fns.items():  # warm-up
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}


def bench_layer(tokens: int, reps: int) -> dict:
    torch.manual_seed(0)
    mem = ProductKeyMemory(576, 576, MemoryConfig(out_init_std=0.02)).train()
    x = torch.randn(tokens, 576)

    def run(how):
        def f():
            mem.zero_grad(set_to_none=True)
            layer_step(mem, x, how)
        return f

    return timed({h: run(h) for h in ("recompute", "autograd", "usage")}, reps)


def bench_update(tokens: int, slots: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    D, H, knn = 576, 4, 16
    ids = torch.randint(0, slots, (tokens, H, knn), generator=g)
    w = torch.softmax(torch.randn(tokens, H, knn, generator=g), -1)
    grad_out = torch.randn(tokens, D, generator=g)
    pool = torch.nn.Parameter(torch.randn(slots, D, generator=g) * 0.02)
    sparse_adam = torch.optim.SparseAdam([pool], lr=1e-3)
    sink = kernels.DeferredBagGrads()
    fused = FusedSparseAdam([pool], {id(pool): sink}, lr=1e-3)
    m, v, step = torch.zeros(slots, D), torch.zeros(slots, D), torch.zeros(slots, dtype=torch.int64)
    chosen = torch.unique(ids)[:500]
    mask = torch.zeros(slots, dtype=torch.bool)
    mask[chosen] = True

    def heal_off():
        kernels.weighted_bag(pool, ids, w, sparse_grad=True).backward(grad_out)
        sparse_adam.step()
        pool.grad = None

    def heal_on():
        kernels.weighted_bag(pool, ids, w, defer=sink).backward(grad_out)
        fused.step()

    def smf_off():
        kernels.weighted_bag(pool, ids, w).backward(grad_out)
        with torch.no_grad():
            kernels.sparse_adam_(pool.data, m, v, step, chosen, rows_of_grad(pool.grad, chosen), 1e-3)
        pool.grad = None

    def smf_on():
        kernels.weighted_bag(pool, ids, w, defer=sink).backward(grad_out)
        kernels.weighted_bag_backward_adam_(pool.data, m, v, step, *sink.take(), 1e-3, row_mask=mask,
                                            return_rows=False, need_grad_w=False)

    return timed({"heal_sparse_adam": heal_off, "heal_fused": heal_on, "smf_dense_grad": smf_off,
                  "smf_fused": smf_on}, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/fused_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"tokens": a.tokens, "slots": a.slots, "threads": a.threads,
           "layer_fwd_bwd": bench_layer(a.tokens, a.reps), "pool_update": bench_update(a.tokens, a.slots, a.reps)}
    print(f"{'part':14s} {'variant':18s} (tokens {a.tokens}, slots {a.slots}, threads {a.threads}, reps {a.reps})")
    for part in ("layer_fwd_bwd", "pool_update"):
        for k, r in res[part].items():
            print(f"{part:14s} {k:18s} min {r['min_ms']:8.1f} ms   median {r['median_ms']:8.1f} ms")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
