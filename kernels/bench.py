"""Benchmark the memory kernels against the PyTorch reference path and the memory-bandwidth floor.

    python -m slotwise.kernels.bench [--json bench.json] [--quick] [--cases 1m-576,1m-1024,retrofit-896,moc-paper]

On CUDA, in one process: measures device copy bandwidth (the floor = bytes an op must move /
that bandwidth), then for each case times every op and the whole memory layer
(query projection -> pk_topk -> softmax -> weighted_bag -> backward -> sparse Adam on the touched
rows) on the reference path and on the Triton path; prints a table and writes JSON.
The moc-* cases time routed chapter cross-attention (bench_chapters.py: reference vs Triton vs
scaled_dot_product_attention on the gathered chapters, forward and backward).
Without CUDA it says so and exits 0; with --quick it first runs a tiny interpreted smoke check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from .bench_chapters import CHAPTER_CASES, bench_chapter_case, print_chapter_table

# (tokens, heads, knn, n_keys, D, k_dim, d_model): the shapes; N = n_keys**2 slots
CASES = {
    "1m-576": (8192, 4, 32, 1024, 576, 256, 576),
    "1m-1024": (8192, 4, 32, 1024, 1024, 256, 1024),
    "retrofit-896": (8192, 4, 32, 128, 896, 256, 896),
}
QUICK_CASE = (9, 3, 5, 13, 41, 10, 16)  # interpreter smoke shapes


def _timer(device: str):
    """ms per call: triton.testing.do_bench on CUDA (L2 flushed, CUDA events), wall clock elsewhere."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def wall(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def copy_bandwidth(device: str, bench) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the floor's yardstick."""
    n = (1 << 30) if device == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (bench(lambda: dst.copy_(src)) * 1e-3)


def _setup(case, device, dtype, seed=0):
    T, H, knn, n_keys, D, K, d_model = case
    g = torch.Generator(device=device).manual_seed(seed)
    N = n_keys * n_keys
    s = dict(
        x=torch.randn(T, d_model, device=device, generator=g, dtype=dtype),
        w_q=(torch.randn(d_model, H * K, device=device, generator=g) / d_model**0.5).to(dtype),
        keys=(torch.randn(H, 2, n_keys, K // 2, device=device, generator=g) / (K // 2) ** 0.5).to(dtype),
        values=(torch.randn(N, D, device=device, generator=g) * 0.02).to(dtype),
        exp_avg=torch.zeros(N, D, device=device),
        exp_avg_sq=torch.zeros(N, D, device=device),
        step=torch.zeros(N, dtype=torch.int64, device=device),
        grad_out=torch.randn(T, D, device=device, generator=g, dtype=dtype),
    )
    s["query"] = (s["x"] @ s["w_q"]).view(T, H, K)  # (T, H, K)
    return s


def _rows(results, name, shape, ref_ms, tri_ms, nbytes, bw):
    floor_ms = nbytes / bw * 1e3
    results.append(dict(op=name, shape=shape, reference_ms=ref_ms, triton_ms=tri_ms, speedup=ref_ms / tri_ms,
                        effective_tb_s=nbytes / (tri_ms * 1e-3) / 1e12, bytes=nbytes, floor_ms=floor_ms,
                        pct_of_floor=100 * floor_ms / tri_ms))


def bench_case(label, case, device, dtype, bench, bw, results):
    from . import pk_topk, sparse_adam_, weighted_bag
    from .embedding_bag import weighted_bag_backward_triton, weighted_bag_forward_triton
    from .embedding_bag_reference import weighted_bag_backward_reference, weighted_bag_reference
    from .product_key import pk_topk_triton
    from .product_key_reference import pk_topk_reference
    from .sparse_update import sparse_adam_triton, weighted_bag_backward_adam_triton
    from .sparse_update_reference import sparse_adam_reference

    T, H, knn, n_keys, D, K, d_model = case
    s = _setup(case, device, dtype)
    elt = s["values"].element_size()
    shape = f"T{T} H{H} knn{knn} N{n_keys}^2 D{D} {str(dtype).removeprefix('torch.')}"
    q, keys, values, g_out = s["query"], s["keys"], s["values"], s["grad_out"]
    state = (s["exp_avg"], s["exp_avg_sq"], s["step"])
    M = T * H * knn  # value-row reads per forward

    # 1. product-key lookup (bytes: queries and sub-keys in, ids and scores out)
    lookup_bytes = q.numel() * q.element_size() + keys.numel() * keys.element_size() + M * 12
    _rows(results, "pk_topk", shape, bench(lambda: pk_topk_reference(q, keys, knn)),
          bench(lambda: pk_topk_triton(q, keys, knn)), lookup_bytes, bw)
    scores, ids = pk_topk_triton(q, keys, knn)
    w = torch.softmax(scores, -1)  # (T, H, knn)

    # 2. weighted bag forward (bytes: the gathered rows, ids and weights, the output)
    fwd_bytes = M * (D * elt + 12) + T * D * elt
    _rows(results, "bag forward", shape, bench(lambda: weighted_bag_reference(values, ids, w)),
          bench(lambda: weighted_bag_forward_triton(values, ids, w)), fwd_bytes, bw)

    # 3. sparse backward (bytes: gathered rows again for grad weights, grad_out, the unique row grads)
    uniq, row_grads, _ = weighted_bag_backward_triton(values, ids, w, g_out)
    U = uniq.numel()
    bwd_bytes = M * (D * elt + 16) + T * D * elt + U * D * 4
    _rows(results, "bag backward (sparse)", shape, bench(lambda: weighted_bag_backward_reference(values, ids, w, g_out)),
          bench(lambda: weighted_bag_backward_triton(values, ids, w, g_out)), bwd_bytes, bw)

    # 4. sparse Adam on the U touched rows (bytes: row grads in; param, m, v read and written)
    upd_bytes = U * (D * (4 + 2 * elt + 16) + 16)
    _rows(results, f"sparse adam (U={U})", shape,
          bench(lambda: sparse_adam_reference(values, *state, uniq, row_grads, 1e-3)),
          bench(lambda: sparse_adam_triton(values, *state, uniq, row_grads, 1e-3)), upd_bytes, bw)

    # 5. backward fused with Adam: row grads never reach memory
    fused_bytes = M * (D * elt + 16) + T * D * elt + U * (D * (2 * elt + 16) + 16)

    def fused_ref():
        r, rg, _ = weighted_bag_backward_reference(values, ids, w, g_out)
        sparse_adam_reference(values, *state, r, rg, 1e-3)

    _rows(results, "bag backward + adam (fused)", shape, bench(fused_ref),
          bench(lambda: weighted_bag_backward_adam_triton(values, *state, ids, w, g_out, 1e-3)), fused_bytes, bw)

    # 6. the whole memory layer: forward + backward + sparse update of the touched value rows
    x, w_q = s["x"], s["w_q"].detach().requires_grad_()
    keys_p = keys.detach().requires_grad_()

    def layer(backend):
        query = (x @ w_q).view(T, H, K)  # (T, H, K)
        sc, ids_ = pk_topk(query, keys_p, knn, backend=backend)
        v = values.detach().requires_grad_()
        out = weighted_bag(v, ids_, torch.softmax(sc, -1), backend=backend, sparse_grad=True)
        out.backward(g_out)
        grad = v.grad.coalesce()
        sparse_adam_(values, *state, grad.indices()[0], grad.values(), 1e-3, backend=backend)

    def layer_fused():
        query = (x @ w_q).view(T, H, K)
        sc, ids_ = pk_topk(query, keys_p, knn, backend="triton")
        wts = torch.softmax(sc, -1)
        weighted_bag(values, ids_, wts.detach(), backend="triton")  # the output feeds the model
        # the model's backward hands back d loss / d out = g_out; the values update inside the backward
        grad_w, _ = weighted_bag_backward_adam_triton(values, *state, ids_, wts.detach(), g_out, 1e-3)
        wts.backward(grad_w.to(wts.dtype))  # on to the query projection and the sub-keys

    layer_bytes = lookup_bytes + fwd_bytes + fused_bytes
    ref_ms = bench(lambda: layer("torch"))
    _rows(results, "layer fwd+bwd+adam", shape, ref_ms, bench(lambda: layer("triton")), layer_bytes, bw)
    _rows(results, "layer fwd+bwd+adam (fused)", shape, ref_ms, bench(layer_fused), layer_bytes, bw)


def print_table(results, bw):
    print(f"\ndevice copy bandwidth: {bw / 1e12:.3f} TB/s (floor = bytes moved / this)")
    head = f"{'op':30s} {'shape':34s} {'ref ms':>9s} {'triton ms':>9s} {'speedup':>8s} {'TB/s':>6s} {'floor ms':>8s} {'% floor':>7s}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['op']:30s} {r['shape']:34s} {r['reference_ms']:9.3f} {r['triton_ms']:9.3f} {r['speedup']:7.1f}x "
              f"{r['effective_tb_s']:6.2f} {r['floor_ms']:8.3f} {r['pct_of_floor']:6.0f}%")


def smoke_check() -> list[dict]:
    """Tiny interpreted run of every Triton op against its reference (CPU, seconds)."""
    from . import slot_histogram, weighted_bag_backward
    from .embedding_bag_reference import weighted_bag_backward_reference
    from .histogram_reference import slot_histogram_reference
    from .product_key import pk_topk_triton
    from .product_key_reference import pk_topk_reference

    s = _setup(QUICK_CASE, "cpu", torch.float32)
    knn, n_keys = QUICK_CASE[2], QUICK_CASE[3]
    checks = []
    _, ids = pk_topk_triton(s["query"], s["keys"], knn)
    checks.append(("pk_topk ids", torch.equal(ids, pk_topk_reference(s["query"], s["keys"], knn)[1])))
    w = torch.softmax(torch.randn(ids.shape), -1)
    got = weighted_bag_backward(s["values"], ids, w, s["grad_out"], backend="triton")
    ref = weighted_bag_backward_reference(s["values"], ids, w, s["grad_out"])
    checks.append(("bag backward", all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(got, ref))))
    counts, _ = slot_histogram(ids, n_keys * n_keys, backend="triton")
    checks.append(("histogram", torch.equal(counts, slot_histogram_reference(ids, n_keys * n_keys)[0])))
    from .bench_chapters import smoke_check_chapters

    checks += smoke_check_chapters()
    for name, ok in checks:
        print(f"  smoke {name:14s} {'ok' if ok else 'MISMATCH'}")
    return [dict(check=n, ok=bool(ok)) for n, ok in checks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench_out/kernels_bench.json", help="where to write the results")
    p.add_argument("--quick", action="store_true", help="one case, fewer repetitions (CPU: interpreted smoke check)")
    p.add_argument("--cases", default=",".join([*CASES, *CHAPTER_CASES]),
                   help=f"comma-separated, from {list(CASES) + list(CHAPTER_CASES)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    meta = dict(torch=torch.__version__, python=platform.python_version(), argv=sys.argv[1:])

    if not torch.cuda.is_available():
        print("slotwise.kernels.bench: no CUDA device; the timings need a GPU (the Triton kernels run "
              "on CPU only interpreted, which says nothing about speed).")
        if args.quick:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels
            meta["smoke"] = smoke_check()
            _write(args.json, dict(meta, device="cpu", results=[]))
        return 0

    dtype = getattr(torch, args.dtype)
    meta["device"] = torch.cuda.get_device_name()
    bench = _timer("cuda")
    bw = copy_bandwidth("cuda", bench)
    results: list[dict] = []
    chapter_rows: list[dict] = []
    labels = args.cases.split(",")[:1] if args.quick else args.cases.split(",")
    for label in labels:
        print(f"case {label} ...", flush=True)
        if label in CHAPTER_CASES:
            chapter_rows += bench_chapter_case(label, CHAPTER_CASES[label], "cuda", dtype, bench)
        else:
            bench_case(label, CASES[label], "cuda", dtype, bench, bw, results)
        torch.cuda.empty_cache()
    if results:
        print_table(results, bw)
    if chapter_rows:
        print_chapter_table(chapter_rows)
    _write(args.json, dict(meta, copy_bandwidth_bytes_s=bw, results=results, chapter_attention=chapter_rows))
    return 0


def _write(path, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
